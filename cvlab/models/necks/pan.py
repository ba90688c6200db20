"""YOLOv4's neck: an SPP block on the coarsest level, then a PANet top-down and bottom-up path of YOLO conv sets.

Papers:
    He et al. 2015, "Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition" (SPP).
    Liu et al. 2018, "Path Aggregation Network for Instance Segmentation" (PANet: a bottom-up path after the FPN).
    Bochkovskiy, Wang & Liao 2020, "YOLOv4: Optimal Speed and Accuracy of Object Detection" (§3.4: SPP and PANet
    as the neck; the PAN's shortcut addition becomes a concatenation).
    Ghiasi, Lin & Le 2018, "DropBlock: A regularization method for convolutional networks".

:class:`SpatialPyramidPooling` is YOLOv4's SPP block: stride-1 max-pools of several sizes (5, 9, 13) that keep the
resolution, concatenated with their input (4× the channels), so the coarsest level sees context of up to 13 cells.

:class:`ConvSetPAN` is the neck of the released ``yolov4.cfg``, built from the YOLOv3 conv sets
(:func:`~cvlab.models.necks.yolo_fpn.conv_set`): three convs, SPP and three convs on the coarsest level; a top-down
path where the coarser output goes through a 1×1 conv and ×2 upsampling and the trunk level through its own 1×1 conv
(YOLOv3 concatenates the trunk level as it is), concatenated (trunk first) into a five-conv set; then a bottom-up path
where a stride-2 3×3 conv brings the finer output down, concatenated (first) with the top-down output of that level
into another five-conv set. The two paths are :class:`PathAggregation`'s, which YOLOv7's ELAN PAN shares
(:mod:`cvlab.models.necks.yolov7_pan`). (YOLOv5's PAN concatenates its laterals where these concatenate the top-down
outputs, in its own module.)

DropBlock is among the YOLOv4 paper's freebies for the detector (§3.4), which does not say where; the released cfgs
have no DropBlock layer. Here it is an option placed as PP-YOLO places it in its YOLOv3 neck (Long et al. 2020,
"PP-YOLO"): ``torchvision.ops.DropBlock2d`` after the first 3×3 conv of every conv set that follows a concatenation
(:class:`FittedDropBlock`, so that small inputs work).

Written here rather than with torchvision's ``FeaturePyramidNetwork`` for the same reason as
:mod:`cvlab.models.necks.yolo_fpn`: YOLO concatenates and convolves where torchvision adds; the max-pools and
DropBlock are torch / torchvision's.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import DropBlock2d, drop_block2d

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.necks.yolo_fpn import conv_set

# yolov4.cfg: the coarsest level's conv sets around the SPP block have three convs (1×1, 3×3, 1×1).
_SPP_SET_DEPTH = 3


class SpatialPyramidPooling(nn.Module):
    """``cat[pool_k(x) for k in pool_sizes, largest first] + [x]`` with stride-1, same-size max-pools: Darknet's
    ``[route] layers=-1,-3,-5,-6`` order. ``Tensor[N, C, H, W] → Tensor[N, (len(pool_sizes) + 1)·C, H, W]``."""

    def __init__(self, pool_sizes: Sequence[int] = (5, 9, 13)):
        super().__init__()
        if any(size % 2 == 0 for size in pool_sizes):
            raise ValueError(f"SPP pool sizes must be odd to keep the size, got {tuple(pool_sizes)}")
        self.pools = nn.ModuleList(nn.MaxPool2d(size, 1, size // 2) for size in sorted(pool_sizes, reverse=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(x) for pool in self.pools] + [x], dim=1)


class FittedDropBlock(DropBlock2d):
    """``torchvision.ops.DropBlock2d`` whose block shrinks to the largest odd size that fits the map: torchvision
    shrinks it to the map's side and then refuses an even one (a 2×2 map at 64 px input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = min(self.block_size, x.shape[-2], x.shape[-1])
        return drop_block2d(x, self.p, size - (size + 1) % 2, self.inplace, self.eps, self.training)


def _with_dropblock(block: nn.Module, dropblock: float, block_size: int) -> nn.Module:
    """``block`` (a conv set) with a DropBlock2d after its first 3×3 conv (its second conv), when it has one. It is
    there at ``dropblock`` 0 too (DropBlock2d then passes its input on), so every probability gives the same
    ``state_dict`` keys."""
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return block
    return nn.Sequential(*block[:2], FittedDropBlock(dropblock, block_size), *block[2:])


class PathAggregation(nn.Module):
    """The two paths of YOLOv4's and YOLOv7's PANs, over the modules a subclass builds: ``top`` (the coarsest
    level's block); per join of the top-down path, coarse to fine, ``reduce_coarser`` (the coarser output's 1×1
    conv, upsampled ×2 by ``upsample``), ``laterals`` (the trunk level's 1×1 conv; it goes first in the concatenation)
    and ``top_down`` (the block over the concatenation); per join of the bottom-up path, fine to coarse,
    ``downsample`` (the finer output down to the next level; first in the concatenation) and ``bottom_up`` (the block
    over it and the top-down output of that level).

    ``forward(levels: list[Tensor], with_top_down=False)``: the bottom-up outputs, finest first; with
    ``with_top_down``, (those, the top-down outputs finest first: the finest of both is the same map, the coarsest
    top-down one is ``top``'s).
    """

    top: nn.Module
    reduce_coarser: nn.ModuleList
    laterals: nn.ModuleList
    top_down: nn.ModuleList
    downsample: nn.ModuleList
    bottom_up: nn.ModuleList
    upsample: nn.Module

    def forward(self, levels: Sequence[torch.Tensor], with_top_down: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.top(levels[-1])
        top_down = [x]  # coarse to fine
        for reduce, lateral, block, skip in zip(self.reduce_coarser, self.laterals, self.top_down,
                                                reversed(levels[:-1]), strict=True):
            # The trunk's branch goes first in the concatenation (yolov4.cfg's route -1, -3 after its 1×1 conv;
            # yolov7.yaml's [[-1, -2], 1, Concat]).
            x = block(torch.cat([lateral(skip), self.upsample(reduce(x))], dim=1))
            top_down.append(x)
        top_down.reverse()
        outputs = [x]  # fine to coarse
        for down, block, across in zip(self.downsample, self.bottom_up, top_down[1:], strict=True):
            x = block(torch.cat([down(x), across], dim=1))
            outputs.append(x)
        return (outputs, top_down) if with_top_down else outputs


class ConvSetPAN(PathAggregation):
    """Levels in, finest first (C3, C4, C5); levels out, finest first (the order of yolov4.cfg's yolo layers).

    Args:
        in_channels: channels of the input levels, finest first; each level must have twice the resolution of the
            next.
        level_channels: per level, finest first, the 1×1 width ``c`` of its conv sets (yolov4.cfg: 128, 256, 512);
            the 3×3 convs of a set have ``2c``, and the level's output has ``c`` channels.
        depth: convs per conv set of the two paths (odd; yolov4.cfg: 5).
        spp_pool_sizes: the SPP block's max-pool sizes on the coarsest level (between two three-conv sets); empty
            for a plain ``depth``-conv set there, as in YOLOv3.
        dropblock: DropBlock probability (0: none, as the released cfg) and ``dropblock_size`` its block size
            (PP-YOLO: 0.1 and 3).
        norm_layer / act_layer: of every conv.

    ``forward(levels: list[Tensor[N, in_channels[i], H_i, W_i]]) -> list[Tensor[N, level_channels[i], H_i, W_i]]``;
    ``out_channels`` lists the output widths, finest first.
    """

    def __init__(self, in_channels: Sequence[int], level_channels: Sequence[int], depth: int = 5,
                 spp_pool_sizes: Sequence[int] = (5, 9, 13), dropblock: float = 0.0, dropblock_size: int = 3,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__()
        if len(in_channels) != len(level_channels) or len(in_channels) < 2:
            raise ValueError(f"a PAN takes two or more levels and one width each, got {len(in_channels)} levels and "
                             f"{len(level_channels)} widths")
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        merge_set = partial(self._merge_set, depth=depth, conv=conv, dropblock=dropblock, block_size=dropblock_size)
        chs = list(level_channels)
        if spp_pool_sizes:
            spp = SpatialPyramidPooling(spp_pool_sizes)
            self.top = nn.Sequential(conv_set(in_channels[-1], chs[-1], _SPP_SET_DEPTH, conv), spp,
                                     merge_set((len(spp_pool_sizes) + 1) * chs[-1], chs[-1], depth=_SPP_SET_DEPTH))
        else:
            self.top = conv_set(in_channels[-1], chs[-1], depth, conv)
        # Top-down, coarse to fine: index i of these lists serves level len - 2 - i.
        self.reduce_coarser, self.laterals, self.top_down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chs) - 1)):
            self.reduce_coarser.append(conv(chs[level + 1], chs[level], 1))
            self.laterals.append(conv(in_channels[level], chs[level], 1))
            self.top_down.append(merge_set(2 * chs[level], chs[level]))
        # Bottom-up, fine to coarse: index i serves level i + 1.
        self.downsample, self.bottom_up = nn.ModuleList(), nn.ModuleList()
        for level in range(1, len(chs)):
            self.downsample.append(conv(chs[level - 1], chs[level], 3, 2))
            self.bottom_up.append(merge_set(2 * chs[level], chs[level]))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.out_channels = chs

    @staticmethod
    def _merge_set(in_chs: int, chs: int, depth: int, conv: partial, dropblock: float, block_size: int) -> nn.Module:
        return _with_dropblock(conv_set(in_chs, chs, depth, conv), dropblock, block_size)
