"""YOLOv6's Rep-PAN neck: a PAN whose blocks are RepBlocks, with v3.0's bi-directional concatenation (BiC) in its
top-down path.

References:
    Li et al. 2022, "YOLOv6: A Single-Stage Object Detection Framework for Industrial Applications" (§2.1: Rep-PAN);
    Li et al. 2023, "YOLOv6 v3.0: A Full-Scale Reloading" (§2.1: the BiC module). meituan/YOLOv6 0.3.0:
    ``yolov6/models/reppan.py`` (``RepBiFPANNeck``, and v2.0's ``RepPANNeck``), ``yolov6/layers/common.py``
    (``BiFusion``, ``SimConv``, ``Transpose``).
    Liu et al. 2018, "Path Aggregation Network for Instance Segmentation" (PANet).

Layout (``reppan.py`` names; P2..P5 the trunk's levels, widths at multiple 1, ``out_channels=[256, 128, 128, 256,
256, 512]``):

- top-down: ``L5 = conv1×1(P5) → 256`` (``reduce_layer0``), ``T4 = RepBlock(BiC(L5, P4, P3)) → 256``;
  ``L4 = conv1×1(T4) → 128`` (``reduce_layer1``), ``out3 = RepBlock(BiC(L4, P3, P2)) → 128``;
- bottom-up: ``out4 = RepBlock(cat(conv3×3/2(out3), L4)) → 256``, ``out5 = RepBlock(cat(conv3×3/2(out4), L5))
  → 512``.

**BiC** [``BiFusion``]: the coarser map upsampled ×2 by a 2×2 stride-2 transposed conv, the level's own map through
a 1×1 conv, and the finer level's map through a 1×1 conv and a stride-2 3×3 conv, concatenated into a 1×1 conv:
the finer level's detail reaches the top-down path. ``bic=False`` is v2.0's Rep-PAN: the upsampled map concatenated
with the level's own map, no finer level (the trunk's P2 is not read).

Each RepBlock has ``depth`` RepVGG blocks (12 at multiple 1: 4 for n and s); every other conv is conv-BN-ReLU
(``SimConv``). Written here rather than with ``torchvision.ops.FeaturePyramidNetwork``, which adds levels and has no
bottom-up path; the upsampling is ``nn.ConvTranspose2d``.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.backbones.efficientrep import BlockFactory, RepBlock, rep_blocks
from cvlab.models.backbones.yolov5 import yolov5_batch_norm


def upsample_conv(chs: int) -> nn.ConvTranspose2d:
    """YOLOv6's ``Transpose``: a learned ×2 upsampling, 2×2 stride-2 transposed conv with a bias."""
    return nn.ConvTranspose2d(chs, chs, 2, 2)


class BiFusion(nn.Module):
    """v3.0's BiC: ``merge(cat(up(coarse), lateral(own), down(reduce(fine))))`` → ``out_chs``.

    ``coarse: Tensor[N, out_chs, H/2, W/2]`` (already reduced), ``own: Tensor[N, own_chs, H, W]``,
    ``fine: Tensor[N, fine_chs, 2H, 2W]`` → ``Tensor[N, out_chs, H, W]``.
    """

    def __init__(self, own_chs: int, fine_chs: int, out_chs: int, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer or yolov5_batch_norm, act_layer=act_layer or nn.ReLU)
        self.upsample = upsample_conv(out_chs)
        self.lateral = conv(own_chs, out_chs, 1)
        self.reduce = conv(fine_chs, out_chs, 1)
        self.downsample = conv(out_chs, out_chs, 3, 2)
        self.merge = conv(3 * out_chs, out_chs, 1)

    def forward(self, coarse: torch.Tensor, own: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat((self.upsample(coarse), self.lateral(own), self.downsample(self.reduce(fine))), 1))


class UpConcat(nn.Module):
    """v2.0's top-down join: ``cat(up(coarse), own)``, ``Tensor[N, chs, H/2, W/2]`` and ``Tensor[N, own_chs, H, W]``
    → ``Tensor[N, chs + own_chs, H, W]`` (``fine`` is ignored: the call of :class:`BiFusion`)."""

    def __init__(self, chs: int):
        super().__init__()
        self.upsample = upsample_conv(chs)

    def forward(self, coarse: torch.Tensor, own: torch.Tensor, fine: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat((self.upsample(coarse), own), 1)


class RepBiPAN(nn.Module):
    """Levels in, finest first; three levels out, finest first (P3, P4, P5).

    Args:
        in_channels: the trunk's levels, finest first: P2, P3, P4, P5 with ``bic`` (BiC reads P2), else P3, P4, P5.
        out_channels: YOLOv6's six neck widths (at multiple 1: 256, 128, 128, 256, 256, 512): ``L5`` / ``T4``,
            ``L4`` / ``out3``, the stride-2 conv from ``out3``, ``out4``, the stride-2 conv from ``out4``, ``out5``.
        depth: RepVGG blocks of each RepBlock.
        block: the RepBlocks' block factory (RepVGG, or its plain form: ``rep=False``).
        bic: v3.0's BiC joins (True) or v2.0's upsample-and-concatenate.
        norm_layer / act_layer: default YOLOv6's BatchNorm / ReLU.

    ``forward(levels) -> [Tensor[N, out_channels[1], H/8, W/8], Tensor[N, out_channels[3], H/16, W/16],
    Tensor[N, out_channels[5], H/32, W/32]]`` (:attr:`out_channels`).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], depth: int = 12,
                 block: BlockFactory | None = None, bic: bool = True, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        if len(in_channels) != (4 if bic else 3) or len(out_channels) != 6:
            raise ValueError(f"Rep-PAN reads {'P2-P5' if bic else 'P3-P5'} ({4 if bic else 3} levels) into 6 widths, "
                             f"got {len(in_channels)} levels and {len(out_channels)} widths")
        norm_layer = norm_layer or yolov5_batch_norm
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer or nn.ReLU)
        rep_block = partial(RepBlock, depth=depth, block=block or rep_blocks(True), norm_layer=norm_layer,
                            act_layer=act_layer)
        *finer, c3, c4, c5 = in_channels  # finer: [P2] with BiC
        top4, top3, down3, mid4, down4, top5 = out_channels
        self.bic = bic
        self.reduce5 = conv(c5, top4, 1)
        self.reduce4 = conv(top4, top3, 1)
        if bic:
            self.join4 = BiFusion(c4, c3, top4, norm_layer, act_layer)
            self.join3 = BiFusion(c3, finer[0], top3, norm_layer, act_layer)
            join4_chs, join3_chs = top4, top3
        else:
            self.join4, self.join3 = UpConcat(top4), UpConcat(top3)
            join4_chs, join3_chs = top4 + c4, top3 + c3
        self.top_down4 = rep_block(join4_chs, top4)
        self.top_down3 = rep_block(join3_chs, top3)
        self.downsample3 = conv(top3, down3, 3, 2)
        self.bottom_up4 = rep_block(down3 + top3, mid4)
        self.downsample4 = conv(mid4, down4, 3, 2)
        self.bottom_up5 = rep_block(down4 + top4, top5)
        self.out_channels = [top3, mid4, top5]

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        *finer, p3, p4, p5 = levels
        p2 = finer[0] if self.bic else None
        lateral5 = self.reduce5(p5)
        lateral4 = self.reduce4(self.top_down4(self.join4(lateral5, p4, p3)))
        out3 = self.top_down3(self.join3(lateral4, p3, p2))
        out4 = self.bottom_up4(torch.cat((self.downsample3(out3), lateral4), 1))
        out5 = self.bottom_up5(torch.cat((self.downsample4(out4), lateral5), 1))
        return [out3, out4, out5]
