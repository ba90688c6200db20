"""Weight initialisation schemes selectable with ``init=<name>``: a small table of functions ``init(model)``.

Papers:
    Xavier / Glorot  Glorot & Bengio 2010, "Understanding the Difficulty of Training Deep Feedforward Neural
                     Networks": Var(w) = gain² · 2 / (fan_in + fan_out)
    Kaiming / He     He, Zhang, Ren & Sun 2015, "Delving Deep into Rectifiers": Var(w) = gain² / fan
                     (gain = sqrt(2 / (1 + a²)) for (leaky) ReLU, fan = fan_in or fan_out)

Every scheme but ``default`` and ``pytorch`` walks ``model.modules()`` and, using ``torch.nn.init``:

- gives each Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear weight the scheme's distribution and sets its bias to 0
  (a convolution's fans include the kernel area: fan_in = C_in/groups · k_h · k_w; for a transposed
  convolution ``torch.nn.init`` reads the weight's layout [C_in, C_out/groups, k, k] the same way, so its "fan_in"
  counts output channels);
- sets each affine norm layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, SwitchableNorm2d) to weight 1,
  bias 0.

Other parameters (embeddings, position embeddings, attention in-projections stored as raw parameters, the mixing
weights of Switchable Normalization) keep the values the model gave them.

``default`` returns None: the model keeps its paper's initialisation (e.g. ResNet's Kaiming normal, fan_out).
``pytorch`` calls every module's own ``reset_parameters()``; for Conv and Linear that is
``kaiming_uniform_(weight, a=sqrt(5))`` — gain sqrt(2 / (1 + 5)) = sqrt(1/3), bound gain · sqrt(3 / fan_in) —
i.e. weights ~ U(−1/sqrt(fan_in), 1/sqrt(fan_in)), and biases ~ U(−1/sqrt(fan_in), 1/sqrt(fan_in)) too (not 0).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from cvlab.layers.norm import SwitchableNorm2d, bind_options, check_choice
from cvlab.layers.typing import ModelInit

_WEIGHTED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    SwitchableNorm2d,
)

# name -> weight initialiser(tensor, **options), defaults written out so that they read as the scheme's definition.
_WEIGHT_INITS: dict[str, Callable[..., torch.Tensor]] = {
    "zeros": nn.init.zeros_,
    "normal": functools.partial(nn.init.normal_, mean=0.0, std=1.0),
    "xavier_uniform": functools.partial(nn.init.xavier_uniform_, gain=1.0),
    "xavier_normal": functools.partial(nn.init.xavier_normal_, gain=1.0),
    "kaiming_uniform": functools.partial(nn.init.kaiming_uniform_, a=0.0, mode="fan_in", nonlinearity="relu"),
    "kaiming_normal": functools.partial(nn.init.kaiming_normal_, a=0.0, mode="fan_in", nonlinearity="relu"),
}
INIT_SCHEMES: tuple[str, ...] = ("default", "pytorch", *_WEIGHT_INITS)


def restore_own_inits(model: nn.Module) -> None:
    """Modules whose starting values are part of their design (``keeps_own_init = True``: the non-local block's
    zeroed output norm, a detector's prior-biased output conv) re-apply their own init after a whole-model pass
    has overwritten it."""
    for module in model.modules():
        if getattr(module, "keeps_own_init", False):
            module.reset_parameters()


def reset_to_pytorch_defaults(model: nn.Module) -> None:
    """Call each module's own ``reset_parameters()`` (PyTorch's per-layer default initialisation)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    restore_own_inits(model)


def init_weights(model: nn.Module, weight_init: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``weight_init`` on every conv / linear weight, biases 0; affine norm layers to weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, _WEIGHTED_LAYERS):
            weight_init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _NORM_LAYERS):
            if getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    restore_own_inits(model)


def get_init(name: str, **options) -> ModelInit | None:
    """The function ``init(model)`` for ``init=<name>``, which initialises ``model`` in place; ``options`` go to
    the ``torch.nn.init`` function (``std`` for ``normal``, ``gain`` for Xavier, ``a`` / ``mode`` /
    ``nonlinearity`` for Kaiming). ``"default"`` returns None: the model keeps its paper's initialisation.
    """
    check_choice(name, INIT_SCHEMES, "init")
    if name == "default":
        return None
    if name == "pytorch":
        return bind_options(reset_to_pytorch_defaults, options, "init=pytorch", supplied_args=1)
    weight_init = bind_options(_WEIGHT_INITS[name], options, f"init={name}", supplied_args=1)
    return functools.partial(init_weights, weight_init=weight_init)
