"""YOLOv3's FPN-style neck: a top-down path from the coarsest trunk level, one conv set per level.

Paper: Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (§2.3, "Predictions Across Scales"; after Lin et al.
2017, "Feature Pyramid Networks for Object Detection").

The coarsest level goes through its conv set; its output is a neck output, and, through a 1×1 lateral conv and a ×2
nearest upsampling, is concatenated (first) with the trunk features of the next finer level, which go through their
own conv set, and so on. The released ``yolov3.cfg`` uses five convs per set, alternating 1×1 to ``c`` and 3×3 to
``2c`` (c = 512, 256, 128, coarse to fine); ``yolov3-tiny.cfg`` has one 1×1 conv (256) at the coarse level and none
at the fine one, whose output is the concatenation itself.

Written here rather than with ``torchvision.ops.FeaturePyramidNetwork``: that one adds the upsampled coarse map to a
1×1 projection of the fine one and ends each level on a 3×3 conv, while YOLOv3 concatenates and then convolves.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory


def conv_set(in_chs: int, chs: int, depth: int, conv: partial) -> nn.Module:
    """``depth`` convs alternating 1×1 to ``chs`` and 3×3 to ``2·chs``, starting and ending on a 1×1 (odd
    ``depth``); ``nn.Identity`` for ``depth`` 0."""
    if depth == 0:
        return nn.Identity()
    if depth % 2 == 0:
        raise ValueError(f"a YOLO conv set ends on its 1×1 conv, so its depth is odd (or 0), got {depth}")
    layers, in_width = [], in_chs
    for index in range(depth):
        width, kernel = (chs, 1) if index % 2 == 0 else (2 * chs, 3)
        layers.append(conv(in_width, width, kernel))
        in_width = width
    return nn.Sequential(*layers)


class YoloV3FPN(nn.Module):
    """Levels in, finest first (the backbone's order: C3, C4, C5); levels out, coarsest first (P5, P4, P3: the order
    the top-down path makes them, and that of Darknet's yolo layers).

    Args:
        in_channels: channels of the input levels, finest first (``feature_info`` order); each level must have twice
            the resolution of the next.
        level_channels: per output level, coarsest first, the 1×1 width of its conv set; the lateral conv that feeds
            the next finer level reduces to that level's width.
        depths: convs per conv set, coarsest first (one int: the same for every level; YOLOv3: 5, the tiny
            variant: 1 and 0).
        norm_layer / act_layer: of every conv.

    ``forward(levels: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, out_channels[j], h_j, w_j]]``;
    ``out_channels`` lists the output widths, coarsest first.
    """

    def __init__(self, in_channels: Sequence[int], level_channels: Sequence[int], depths: int | Sequence[int] = 5,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        if len(in_channels) != len(level_channels):
            raise ValueError(f"{len(in_channels)} input levels but {len(level_channels)} level widths")
        depths = [depths] * len(level_channels) if isinstance(depths, int) else list(depths)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.conv_sets, self.laterals = nn.ModuleList(), nn.ModuleList()
        self.out_channels: list[int] = []
        for level, (trunk_chs, chs, depth) in enumerate(zip(reversed(in_channels), level_channels, depths,
                                                            strict=True)):
            in_chs = trunk_chs
            if level:
                self.laterals.append(conv(self.out_channels[-1], chs, 1))
                in_chs += chs
            self.conv_sets.append(conv_set(in_chs, chs, depth, conv))
            self.out_channels.append(chs if depth else in_chs)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        coarse_first = list(reversed(levels))
        x = self.conv_sets[0](coarse_first[0])
        outputs = [x]
        for lateral, block, skip in zip(self.laterals, self.conv_sets[1:], coarse_first[1:], strict=True):
            # The coarser branch goes first in the concatenation (Darknet's route -1, 61).
            x = block(torch.cat([self.upsample(lateral(x)), skip], dim=1))
            outputs.append(x)
        return outputs
