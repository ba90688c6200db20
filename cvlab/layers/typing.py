"""The factory types every model and layer takes: one spelling each, imported from here.

A factory is called once per layer it builds, so a model can replace every norm, activation or attention block by
passing one callable (``norm_layer=lambda c: nn.GroupNorm(8, c)``); the ``norm=`` / ``activation=`` /
``attention=`` / ``init=`` config groups resolve to these.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

NormFactory = Callable[[int], nn.Module]
"""channels → a norm layer for Tensor[N, C, H, W] (``nn.BatchNorm2d`` itself is one)."""

ActFactory = Callable[[], nn.Module]
"""() → an activation module (``nn.ReLU`` itself is one)."""

AttnFactory = Callable[[int], nn.Module]
"""channels → an attention block mapping Tensor[N, C, H, W] to the same shape (SE, CBAM, ...)."""

ModelInit = Callable[[nn.Module], None]
"""model → None: initialises the model's weights in place (the ``init=`` group)."""
