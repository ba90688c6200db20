"""YOLOv7's neck: SPPCSPC on the coarsest level, then a PAN whose top-down and bottom-up joins are ELAN blocks.

Papers:
    Wang, Bochkovskiy & Liao 2022, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time object
    detectors" (the ``head`` sections of ``cfg/training/yolov7.yaml`` and ``yolov7-tiny.yaml``).
    Wang et al. 2020, "CSPNet" (the cross-stage split of SPPCSPC); He et al. 2015, "Spatial Pyramid Pooling".
    Liu et al. 2018, "Path Aggregation Network for Instance Segmentation" (PANet).

:class:`SPPCSPC` [``models/common.py`` ``SPPCSPC``]: a CSP split around YOLOv4's SPP block: one branch runs
1×1, 3×3, 1×1 convs, the 5/9/13 max-pools with their input, and 1×1, 3×3 convs; a 1×1 bypass; a 1×1 conv merges the
two. YOLOv7 concatenates the pools as ``[x, p5, p9, p13]``, YOLOv4 as ``[p13, p9, p5, x]``: the same function up
to a permutation of the next conv's input channels, so YOLOv4's
:class:`~cvlab.models.necks.pan.SpatialPyramidPooling` serves both. yolov7-tiny's (``tiny``; cfg layers 29–37) has
a single 1×1 conv on each side of the pools.

:class:`ELANPAN` (yolov7.yaml layers 51–101; tiny 29–73) has the paths of YOLOv4's PAN
(:class:`~cvlab.models.necks.pan.PathAggregation`): the top-down path concatenates a 1×1 lateral of the trunk level with
the ×2-upsampled 1×1 reduction of the coarser output (lateral first), and the bottom-up path the down-sampled finer
output with the top-down output of its level (down-sampled first); each join is an ELAN
(:class:`~cvlab.models.backbones.elan.ELAN`: yolov7's with 4 chained 3×3 convs of half width, all kept; tiny's with 2 of
half the output width). yolov7 down-samples with :class:`~cvlab.models.backbones.elan.MPDown` (its branches as wide as
the input), yolov7-tiny with a stride-2 3×3 conv. Written by hand as YOLOv4's and YOLOv5's PANs are: torchvision's FPN
adds levels and has no bottom-up path.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.backbones.darknet import leaky_relu
from cvlab.models.backbones.elan import ELAN, MPDown
from cvlab.models.backbones.yolov5 import silu, yolov5_batch_norm
from cvlab.models.necks.pan import PathAggregation, SpatialPyramidPooling

_POOL_SIZES = (5, 9, 13)


class SPPCSPC(nn.Module):
    """``merge(cat[post(spp(pre(x))), bypass(x)])``, all of ``out_chs``: ``pre`` is 1×1, 3×3, 1×1 convs (tiny:
    one 1×1), ``spp`` the stride-1 max-pools with their input (4× the channels), ``post`` 1×1 and 3×3 convs (tiny:
    one 1×1). ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``. Norm and activation: default YOLOv7's
    BatchNorm and SiLU."""

    def __init__(self, in_chs: int, out_chs: int, tiny: bool = False, pool_sizes: Sequence[int] = _POOL_SIZES,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer or yolov5_batch_norm, act_layer=act_layer or silu)
        pooled_chs = (len(pool_sizes) + 1) * out_chs
        if tiny:
            self.pre, self.post = conv(in_chs, out_chs, 1), conv(pooled_chs, out_chs, 1)
        else:
            self.pre = nn.Sequential(conv(in_chs, out_chs, 1), conv(out_chs, out_chs, 3), conv(out_chs, out_chs, 1))
            self.post = nn.Sequential(conv(pooled_chs, out_chs, 1), conv(out_chs, out_chs, 3))
        self.spp = SpatialPyramidPooling(pool_sizes)
        self.bypass = conv(in_chs, out_chs, 1)
        self.merge = conv(2 * out_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat((self.post(self.spp(self.pre(x))), self.bypass(x)), 1))


def _join(in_chs: int, out_chs: int, tiny: bool, **layers) -> ELAN:
    """The ELAN of a PAN join: yolov7's has full-width branches and 4 chained 3×3 convs of half the width, all kept
    (yolov7.yaml's 6-way concat); tiny's has half-width branches and 2 chained convs of half the width."""
    if tiny:
        return ELAN(in_chs, out_chs, out_chs // 2, out_chs // 2, 2, **layers)
    return ELAN(in_chs, out_chs, out_chs, out_chs // 2, 4, **layers)


class ELANPAN(PathAggregation):
    """Levels in, finest first (C3, C4, C5); levels out, finest first (P3, P4, P5: IDetect's order).

    Args:
        in_channels: channels of the input levels, finest first; each level has twice the resolution of the next.
        out_channels: channels of the output levels, finest first (yolov7: 128, 256, 512; tiny: 64, 128, 256, times
            the width); the SPPCSPC gives the coarsest width, each lateral and reduction the width of its level.
        tiny: yolov7-tiny's blocks (the light SPPCSPC, 2-conv ELANs, stride-2 conv down-sampling).
        norm_layer / act_layer: of every conv; default YOLOv7's BatchNorm and SiLU (tiny: LeakyReLU(0.1)).

    ``forward(levels: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, out_channels[i], H_i, W_i]]``,
    the bottom-up outputs; with ``with_top_down=True`` also the top-down ones, which YOLOv7's auxiliary head reads
    (:class:`~cvlab.models.necks.pan.PathAggregation`).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], tiny: bool = False,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        if len(in_channels) != len(out_channels) or len(in_channels) < 2:
            raise ValueError(f"a PAN joins at least 2 levels, one output width each: got {len(in_channels)} input "
                             f"levels and {len(out_channels)} output widths")
        norm_layer, act_layer = norm_layer or yolov5_batch_norm, act_layer or (leaky_relu if tiny else silu)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        layers = dict(norm_layer=norm_layer, act_layer=act_layer)
        chs = list(out_channels)
        elan = partial(_join, tiny=tiny, **layers)
        self.top = SPPCSPC(in_channels[-1], chs[-1], tiny, **layers)
        # Top-down, coarse to fine: index i of these lists serves level len - 2 - i.
        self.reduce_coarser, self.laterals, self.top_down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chs) - 1)):
            self.reduce_coarser.append(conv(chs[level + 1], chs[level], 1))
            self.laterals.append(conv(in_channels[level], chs[level], 1))
            self.top_down.append(elan(2 * chs[level], chs[level]))
        # Bottom-up, fine to coarse: index i serves level i + 1.
        self.downsample, self.bottom_up = nn.ModuleList(), nn.ModuleList()
        for level in range(1, len(chs)):
            if tiny:
                down, down_chs = conv(chs[level - 1], chs[level], 3, 2), chs[level]
            else:
                down, down_chs = MPDown(chs[level - 1], chs[level - 1], **layers), 2 * chs[level - 1]
            self.downsample.append(down)
            self.bottom_up.append(elan(down_chs + chs[level], chs[level]))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.out_channels = chs
