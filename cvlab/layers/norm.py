"""Normalisation layers selectable with ``norm=<name>``: a small table of factories ``norm(num_channels)``.

Papers:
    BatchNorm      Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
                   Internal Covariate Shift"
    LayerNorm      Ba, Kiros & Hinton 2016, "Layer Normalization"
    InstanceNorm   Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing Ingredient for Fast
                   Stylization"
    GroupNorm      Wu & He 2018, "Group Normalization"
    SwitchableNorm Luo, Ren, Peng, Zhang & Li 2018, "Differentiable Learning-to-Normalize via Switchable
                   Normalization"

PyTorch provides all of them except Switchable Normalization, which no library offers; :class:`SwitchableNorm2d`
is written here by hand.

The module also holds the two helpers the ``norm``, ``activation`` and ``init`` factories share: checking an
option name against its table (:func:`check_choice`) and binding the option's keyword arguments
(:func:`bind_options`), both answering bad input with a :class:`~cvlab.utils.errors.UserError`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Collection
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.typing import NormFactory
from cvlab.utils.errors import UserError, suggest


def check_choice(name: str, choices: Collection[str], group: str) -> None:
    """Raise a UserError naming the closest valid options when ``name`` is not one of ``choices``."""
    if name in choices:
        return
    raise UserError(f"unknown {group} {name!r}.{suggest(name, choices)} Valid: {', '.join(choices)}.")


def bind_options(builder: Callable, options: dict, label: str, supplied_args: int = 0) -> Callable:
    """``functools.partial(builder, **options)``, refusing option names ``builder`` does not take.

    Checking here means a typo in ``norm.eps=`` style overrides is reported when the option is read, in one line,
    rather than as a TypeError deep inside model construction. The first ``supplied_args`` parameters (the channel
    count, the tensor, the model) are passed by the caller of the factory, so they are not options. A ``**kwargs``
    catch-all (``nn.Module.__init__``) does not count as taking an option.
    """
    params = list(inspect.signature(builder).parameters.values())[supplied_args:]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(named))
    if unknown:
        takes = f"its options are {', '.join(named)}" if named else "it takes no options"
        raise UserError(f"{label} has no option {', '.join(map(repr, unknown))}; {takes}.")
    return functools.partial(builder, **options)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def group_norm(num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups, or — when ``num_channels`` is not divisible by it — the largest divisor
    of ``num_channels`` not above ``num_groups`` (e.g. 24 channels → 24 groups, 48 → 24), so that every width of
    every model can take ``norm=gn`` instead of failing on the first odd layer.
    """
    return nn.GroupNorm(_largest_divisor_at_most(num_channels, num_groups), num_channels, eps, affine)


def layer_norm(num_channels: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """Ba et al.'s LayerNorm for Tensor[N, C, H, W]: statistics per sample over (C, H, W).

    Built as GroupNorm with one group, which normalises exactly that way. ``nn.LayerNorm`` would need (C, H, W)
    as its shape when the layer is built — the factory only knows C — and would learn an affine per position;
    here the affine is per channel, as for every other norm in the table.
    """
    return nn.GroupNorm(1, num_channels, eps, affine)


def instance_norm(num_channels: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """Ulyanov et al.'s InstanceNorm: statistics per sample and channel over (H, W), with a per-channel affine.

    Built as GroupNorm with one channel per group, which computes exactly that. ``nn.InstanceNorm2d`` refuses a
    1×1 feature map in training, which the deepest stage of a CNN reaches on small inputs (8×8 digits); GroupNorm
    returns the affine bias there, the limit of the same formula.
    """
    return nn.GroupNorm(num_channels, num_channels, eps, affine)


def single_pixel_instance_norms(net: nn.Module, images: torch.Tensor) -> list[str]:
    """Names of ``net``'s per-channel norms (a GroupNorm with one channel per group: ``norm=in``, or ``norm=gn`` on
    a layer with fewer channels than groups) that see a 1×1 map when ``net`` runs on ``images`` (Tensor[N, C, H, W])
    in eval form. Such a norm subtracts the only value it normalises, so its output is its bias whatever the input:
    nothing before it reaches the output, and the model cannot learn (``norm=in`` on 8 px digits: chance accuracy).
    Empty, without running ``net``, when it has no such norm."""
    per_channel = {module: name for name, module in net.named_modules()
                   if isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels > 1}
    if not per_channel:
        return []
    hits: list[str] = []

    def record(module: nn.Module, inputs: tuple) -> None:
        if inputs[0].shape[2:].numel() == 1:
            hits.append(per_channel[module])

    handles = [module.register_forward_pre_hook(record) for module in per_channel]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(images)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(hits))


def no_norm(num_channels: int) -> nn.Identity:
    """``norm=none``: the layer stays in the model but leaves its input unchanged."""
    return nn.Identity()


class SwitchableNorm2d(nn.Module):
    """Switchable Normalization (Luo et al. 2018): a learned mixture of IN, LN and BN statistics.

    For Tensor[N, C, H, W] with per-(sample, channel) statistics over (H, W) as IN's::

        mean = softmax(mean_weight) · [mu_in, mu_ln, mu_bn]
        var  = softmax(var_weight)  · [var_in, var_ln, var_bn]
        y    = gamma · (x − mean) / sqrt(var + eps) + beta       (gamma, beta per channel)

    ``mean_weight`` and ``var_weight`` are separate learnable 3-vectors (order IN, LN, BN), initialised equal so
    that each statistic starts with weight 1/3. As in the paper, LN and BN statistics are derived from IN's
    (LN averages over channels, BN over the batch, each using the second moment ``var_in + mu_in²``), so one
    pass over the input gives all three. All variances are biased (divide by the element count), as the paper
    defines them.

    Training: BN statistics come from the batch and update ``running_mean`` / ``running_var`` with
    ``running = (1 − momentum) · running + momentum · batch``, following ``nn.BatchNorm2d``, including its
    convention of storing the unbiased variance (× n/(n − 1), n = N·H·W). Eval: the BN part uses the running
    statistics (the paper's "moving average" inference), so a sample's output does not depend on the rest of
    the batch; IN and LN statistics are always computed from the input.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.mean_weight = nn.Parameter(torch.empty(3))
        self.var_weight = nn.Parameter(torch.empty(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)  # [N, C, 1]
        var_in = flat.var(-1, unbiased=False, keepdim=True)
        second_moment_in = var_in + mean_in.square()
        mean_ln = mean_in.mean(1, keepdim=True)  # [N, 1, 1]
        var_ln = second_moment_in.mean(1, keepdim=True) - mean_ln.square()
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)  # [1, C, 1]
            var_bn = second_moment_in.mean(0, keepdim=True) - mean_bn.square()
            count = flat.shape[0] * flat.shape[2]
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.flatten(), self.momentum)
                self.running_var.lerp_(var_bn.flatten() * (count / max(count - 1, 1)), self.momentum)
        else:
            mean_bn = self.running_mean.view(1, c, 1)
            var_bn = self.running_var.view(1, c, 1)
        mean_mix = F.softmax(self.mean_weight, 0)
        var_mix = F.softmax(self.var_weight, 0)
        mean = mean_mix[0] * mean_in + mean_mix[1] * mean_ln + mean_mix[2] * mean_bn
        var = var_mix[0] * var_in + var_mix[1] * var_ln + var_mix[2] * var_bn
        normalised = ((flat - mean) * torch.rsqrt(var + self.eps)).view_as(x)
        affine_shape = (1, c) + (1,) * (x.dim() - 2)
        return normalised * self.weight.view(affine_shape) + self.bias.view(affine_shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


# name -> builder(num_channels, **options); None keeps the model's own (paper) norm.
_NORMS: dict[str, Callable[..., nn.Module] | None] = {
    "default": None,
    "bn": nn.BatchNorm2d,
    "ln": layer_norm,
    "in": instance_norm,
    "gn": group_norm,
    "sn": SwitchableNorm2d,
    "none": no_norm,
}
NORM_LAYERS: tuple[str, ...] = tuple(_NORMS)


def get_norm_layer(name: str, **options) -> NormFactory | None:
    """The factory ``norm(num_channels) -> nn.Module`` for ``norm=<name>``; ``options`` go to the layer
    (e.g. ``eps``, ``momentum``, ``num_groups`` for ``gn``). ``"default"`` returns None: the model keeps its
    paper's norm.
    """
    check_choice(name, NORM_LAYERS, "norm")
    builder = _NORMS[name]
    if builder is None:
        return None
    return bind_options(builder, options, f"norm={name}", supplied_args=1)
