"""YOLOv2's passthrough neck: the stride-16 features, space-to-depth reorganised, joined to the stride-32 ones.

Paper: Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (§2, "Fine-Grained Features").

Layout of the released ``yolov2.cfg``: the coarse level goes through two 3×3 convs (1024), the fine level through a
1×1 conv (64) and a stride-2 space-to-depth (``reorg``: 26×26×64 → 13×13×256 at 416 px), and the two are concatenated,
the reorganised fine features first (Darknet's ``route -1,-4``). The space-to-depth is ``pixel_unshuffle``; Darknet's
``reorg`` orders the 256 channels differently, which changes nothing for a model trained from scratch.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory

REORG_STRIDE = 2


class PassthroughNeck(nn.Module):
    """Two levels in, finest first ``[C4, C5]`` (C4 at twice C5's resolution), one level out at C5's resolution.

    Args:
        in_channels: ``(C4 channels, C5 channels)``.
        coarse_channels: width of the two 3×3 convs on C5 (yolov2.cfg: 1024).
        passthrough_channels: width of the 1×1 conv on C4 before the reorg (yolov2.cfg: 64).

    ``forward([c4: Tensor[N, C4, 2h, 2w], c5: Tensor[N, C5, h, w]]) -> [Tensor[N, out_channels[0], h, w]]`` with
    ``out_channels[0] = 4·passthrough_channels + coarse_channels``.
    """

    def __init__(self, in_channels: Sequence[int], coarse_channels: int, passthrough_channels: int,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        fine_chs, coarse_in_chs = in_channels
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.extra = nn.Sequential(conv(coarse_in_chs, coarse_channels, 3), conv(coarse_channels, coarse_channels, 3))
        self.passthrough = conv(fine_chs, passthrough_channels, 1)
        self.out_channels = [passthrough_channels * REORG_STRIDE**2 + coarse_channels]

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        c4, c5 = levels
        fine = F.pixel_unshuffle(self.passthrough(c4), REORG_STRIDE)
        return [torch.cat([fine, self.extra(c5)], dim=1)]
