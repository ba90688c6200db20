"""Activation functions selectable with ``activation=<name>``: a small table of factories ``act()``.

Papers:
    ReLU         Nair & Hinton 2010, "Rectified Linear Units Improve Restricted Boltzmann Machines"
    Leaky ReLU   Maas, Hannun & Ng 2013, "Rectifier Nonlinearities Improve Neural Network Acoustic Models"
    PReLU        He, Zhang, Ren & Sun 2015, "Delving Deep into Rectifiers"
    ELU          Clevert, Unterthiner & Hochreiter 2016, "Fast and Accurate Deep Network Learning by Exponential
                 Linear Units (ELUs)"
    GELU         Hendrycks & Gimpel 2016, "Gaussian Error Linear Units (GELUs)" (exact erf form and tanh approximation)
    Swish        Ramachandran, Zoph & Le 2017, "Searching for Activation Functions" (x·sigmoid(βx), β fixed or learned)
    Mish         Misra 2019, "Mish: A Self Regularized Non-Monotonic Activation Function"
    Hard-swish   Howard et al. 2019, "Searching for MobileNetV3"

All come from ``torch.nn`` except Swish with a β other than 1 or a learnable β, which PyTorch lacks (``nn.SiLU`` is
the fixed β = 1 case); :class:`Swish` is written here and uses ``F.silu`` for that case.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.norm import bind_options, check_choice
from cvlab.layers.typing import ActFactory


class Swish(nn.Module):
    """``x · sigmoid(beta · x)`` on a tensor of any shape.

    ``learnable=True`` makes ``beta`` a parameter (one scalar, initialised to ``beta``), which the paper calls
    Swish-β; with a fixed ``beta == 1`` this is SiLU and runs as the fused ``F.silu``.
    """

    def __init__(self, beta: float = 1.0, learnable: bool = False):
        super().__init__()
        self.learnable = learnable
        self.beta = nn.Parameter(torch.tensor(float(beta))) if learnable else float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learnable and self.beta == 1.0:
            return F.silu(x)
        return x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        return f"beta={float(self.beta)}, learnable={self.learnable}"


# name -> builder(**options); None keeps the model's own (paper) activation.
_ACTIVATIONS: dict[str, Callable[..., nn.Module] | None] = {
    "default": None,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": functools.partial(nn.LeakyReLU, negative_slope=0.01),
    "elu": functools.partial(nn.ELU, alpha=1.0),
    # One slope shared by all channels (num_parameters=1), initialised to the paper's 0.25.
    "prelu": functools.partial(nn.PReLU, num_parameters=1, init=0.25),
    "swish": Swish,
    "mish": nn.Mish,
    "gelu": functools.partial(nn.GELU, approximate="none"),
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "hard_swish": nn.Hardswish,
    "relu6": nn.ReLU6,
}
ACT_LAYERS: tuple[str, ...] = tuple(_ACTIVATIONS)


def get_act_layer(name: str, **options) -> ActFactory | None:
    """The factory ``act() -> nn.Module`` for ``activation=<name>``; ``options`` go to the module
    (e.g. ``negative_slope`` for ``leaky_relu``, ``beta`` / ``learnable`` for ``swish``). ``"default"`` returns
    None: the model keeps its paper's activation.
    """
    check_choice(name, ACT_LAYERS, "activation")
    builder = _ACTIVATIONS[name]
    if builder is None:
        return None
    return bind_options(builder, options, f"activation={name}")
