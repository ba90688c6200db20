"""YOLOv5's PAN neck: a top-down path of 1×1 laterals, ×2 upsampling and C3 blocks, then a bottom-up path of stride-2
convs and C3 blocks, which concatenates the laterals again.

Papers:
    Liu et al. 2018, "Path Aggregation Network for Instance Segmentation" (PANet: the bottom-up path after the FPN).
    Jocher et al., ultralytics/yolov5 v6.0 (no paper): the ``head`` section of ``models/yolov5{n,s,m,l,x}.yaml``.

Layout (yolov5s.yaml layer numbers; C3, C4, C5 the backbone's levels, widths at multiple 1):

- top-down: ``L5 = conv1×1(C5) → 512`` (10), ``T4 = C3(cat(up(L5), C4)) → 512`` (11–13),
  ``L4 = conv1×1(T4) → 256`` (14), ``P3 = C3(cat(up(L4), C3)) → 256`` (15–17);
- bottom-up: ``P4 = C3(cat(conv3×3/2(P3), L4)) → 512`` (18–20), ``P5 = C3(cat(conv3×3/2(P4), L5)) → 1024`` (21–23).

The neck's C3 blocks have no residual additions (``C3(c, False)``). Written here rather than with
``torchvision.ops.FeaturePyramidNetwork``, which adds levels and has no bottom-up path.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.backbones.yolov5 import C3, silu, yolov5_batch_norm


class YoloV5PAN(nn.Module):
    """Levels in, finest first (the backbone's order); levels out, finest first (P3, P4, P5: Detect's order).

    Args:
        in_channels: channels of the input levels, finest first; each level has twice the resolution of the next.
        out_channels: channels of the output levels, finest first (YOLOv5: 256, 512, 1024 times the width
            multiple). The lateral of a level reduces to the width of the next finer output level.
        depth: bottlenecks of every C3 block (YOLOv5: ``round(3 · depth_multiple)``).
        norm_layer / act_layer: of every conv; default YOLOv5's BatchNorm and SiLU.

    ``forward(levels: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, out_channels[i], H_i, W_i]]``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], depth: int = 3,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        if len(in_channels) != len(out_channels) or len(in_channels) < 2:
            raise ValueError(f"a PAN joins at least 2 levels, one output width each: got {len(in_channels)} input "
                             f"levels and {len(out_channels)} output widths")
        norm_layer, act_layer = norm_layer or yolov5_batch_norm, act_layer or silu
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        c3 = partial(C3, depth=depth, shortcut=False, norm_layer=norm_layer, act_layer=act_layer)
        self.out_channels = list(out_channels)
        levels = range(len(in_channels) - 1)  # level i joins the coarser level i + 1 (top-down) / finer i (bottom-up)
        # Top-down, indexed by the finer level i: the lateral of level i + 1 and the C3 at level i.
        lateral_in = [out_channels[i + 1] if i + 1 < len(levels) else in_channels[-1] for i in levels]
        self.laterals = nn.ModuleList(conv(lateral_in[i], out_channels[i], 1) for i in levels)
        self.top_down = nn.ModuleList(c3(out_channels[i] + in_channels[i], out_channels[i]) for i in levels)
        # Bottom-up, indexed the same: the stride-2 conv from level i and the C3 at level i + 1.
        self.downsamples = nn.ModuleList(conv(out_channels[i], out_channels[i], 3, 2) for i in levels)
        self.bottom_up = nn.ModuleList(c3(2 * out_channels[i], out_channels[i + 1]) for i in levels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x, laterals = levels[-1], [None] * (len(levels) - 1)
        for i in reversed(range(len(levels) - 1)):
            laterals[i] = self.laterals[i](x)
            # The upsampled coarse branch goes first in the concatenation (yolov5s.yaml's [-1, 6]).
            x = self.top_down[i](torch.cat([self.upsample(laterals[i]), levels[i]], 1))
        outputs = [x]
        for i in range(len(levels) - 1):
            x = self.bottom_up[i](torch.cat([self.downsamples[i](x), laterals[i]], 1))
            outputs.append(x)
        return outputs
