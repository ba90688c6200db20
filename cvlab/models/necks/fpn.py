"""Feature Pyramid Network: a top-down path with lateral connections, one map of the same width per level.

Paper: Lin et al. 2017, "Feature Pyramid Networks for Object Detection" (§3: each backbone level C_i goes through a
1×1 lateral conv and is added to the ×2 nearest-upsampled coarser merged map; a 3×3 conv on every sum gives P_i, all
with ``d = 256`` channels and no non-linearity; §4.1: for the RPN, P6 is a stride-2 subsampling of P5).

The convs and the top-down path are ``torchvision.ops.FeaturePyramidNetwork`` and P6 is its ``LastLevelMaxPool``
(a 1×1 max-pool of stride 2); this module gives them cvlab's neck interface, levels in and levels out as lists.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class FPN(FeaturePyramidNetwork):
    """``forward(levels: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, out_channels, H_i, W_i]]``,
    finest first, plus (``extra_pool``) P6 ``Tensor[N, out_channels, ⌈H_last / 2⌉, ⌈W_last / 2⌉]`` at the end.

    Args:
        in_channels: channels of the input levels, finest first (``feature_info`` order).
        out_channels: the pyramid's width ``d`` (256 in the paper).
        extra_pool: add P6, max-pooled from the coarsest output (the RPN's extra level in the paper).

    ``reductions(in_reductions)`` gives the output levels' strides for input levels of those strides. The state dict
    keys are torchvision's (``inner_blocks.<i>.0``, ``layer_blocks.<i>.0``) and so is the init (Kaiming-uniform,
    a = 1, biases 0).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_pool: bool = True):
        super().__init__(list(in_channels), out_channels, LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels
        self.extra_pool = extra_pool

    def reductions(self, in_reductions: Sequence[int]) -> list[int]:
        return [*in_reductions, 2 * in_reductions[-1]] if self.extra_pool else list(in_reductions)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(super().forward(OrderedDict((str(i), level) for i, level in enumerate(levels))).values())
