"""YOLOv6's EfficientRep trunk (the v3.0 layout of YOLOv6-N/S): RepVGG blocks throughout, and a CSP-style SPPF at the
end, scaled by width and depth multiples.

References:
    Li et al. 2022, "YOLOv6: A Single-Stage Object Detection Framework for Industrial Applications" (§2.1:
    EfficientRep, the re-parameterisable backbone); Li et al. 2023, "YOLOv6 v3.0: A Full-Scale Reloading" (§2:
    SimCSPSPPF). meituan/YOLOv6 0.3.0: ``configs/yolov6{n,s}.py``, ``yolov6/models/efficientrep.py``
    (``EfficientRep``), ``yolov6/layers/common.py``.
    Ding et al. 2021, "RepVGG: Making VGG-style ConvNets Great Again" (:class:`~cvlab.layers.rep.RepVGGBlock`).

Blocks (``common.py`` names in brackets):

- **RepBlock** [``RepBlock``]: ``depth`` RepVGG blocks in a row, the first from ``in_chs`` to ``out_chs``.
- **SimCSPSPPF** [``SimCSPSPPF``]: a CSP split of the SPPF pyramid: one path ``1×1 → 3×3 → 1×1`` to half the
  output width, three chained 5×5 stride-1 max-poolings of it, the four maps concatenated, ``1×1 → 3×3``; the
  other path one 1×1 conv; the two concatenated into a 1×1 conv. Every conv is conv-BN-ReLU (``SimConv``).

Layout at multiple 1 (``out_channels=[64, 128, 256, 512, 1024]``, ``num_repeats=[1, 6, 12, 18, 6]``): a stride-2
RepVGG stem to 64, then four stages each of a stride-2 RepVGG block and a RepBlock (6 / 12 / 18 / 6 blocks; 128 /
256 / 512 / 1024 channels), the last ending with SimCSPSPPF. v3.0's neck also reads the stride-4 stage
(``fuse_P2=True``). Scaling is YOLOv6's ``build_network``, the same rounding as YOLOv5's ``parse_model``
(:func:`~cvlab.models.backbones.yolov5.yolov5_width`, :func:`~cvlab.models.backbones.yolov5.yolov5_depth`).

``rep=False`` builds every RepVGG block as one plain 3×3 conv-BN-ReLU instead (YOLOv6's ``training_mode=conv_relu``),
the same deployed network trained without the parallel branches: the ablation of re-parameterisation. BatchNorm is
YOLOv6's ``initialize_weights``' (eps 1e-3, momentum 0.03, YOLOv5's); the convs keep PyTorch's default init. The
blocks have no library form and are written here; the pooling is ``nn.MaxPool2d``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Callable

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.rep import RepVGGBlock
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models.backbones.features import Backbone, FeatureExtractor, FeatureInfo
from cvlab.models.backbones.yolov5 import yolov5_batch_norm, yolov5_depth, yolov5_width

# Per stage after the stem: output channels and RepVGG blocks of its RepBlock at width and depth multiple 1.
_STAGES = ((128, 6), (256, 12), (512, 18), (1024, 6))
_STEM_CHS = 64
_SPPF_KERNEL = 5

BlockFactory = Callable[..., nn.Module]
"""``(in_chs, out_chs, stride=1, norm_layer=None, act_layer=None) -> module``: a RepVGG block or its plain form."""


def conv_block(in_chs: int, out_chs: int, stride: int = 1, norm_layer: NormFactory | None = None,
               act_layer: ActFactory | None = None) -> ConvNormAct:
    """The plain counterpart of :class:`~cvlab.layers.rep.RepVGGBlock`: one 3×3 conv-norm-act (ReLU by default),
    what a RepVGG block deploys as, trained as such (``rep=False``)."""
    return ConvNormAct(in_chs, out_chs, 3, stride, norm_layer=norm_layer, act_layer=act_layer or nn.ReLU)


def rep_blocks(rep: bool) -> BlockFactory:
    """The block factory for ``rep``: RepVGG blocks, or their plain 3×3 conv form."""
    return RepVGGBlock if rep else conv_block


class RepBlock(nn.Sequential):
    """``depth`` blocks in a row, the first ``in_chs → out_chs``, the others ``out_chs → out_chs``.
    ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, depth: int = 1, block: BlockFactory = RepVGGBlock,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None):
        super().__init__(*(block(in_chs if index == 0 else out_chs, out_chs, norm_layer=norm_layer,
                                 act_layer=act_layer) for index in range(depth)))


class SimCSPSPPF(nn.Module):
    """``merge(cat(bypass(x), post(pyramid(pre(x)))))``: ``pre`` is ``1×1 → 3×3 → 1×1`` to ``hidden = out_chs / 2``,
    ``pyramid`` the map and three chained ``kernel``×``kernel`` stride-1 max-poolings of it concatenated (the 5, 9
    and 13 windows of SPP), ``post`` ``1×1 (4·hidden → hidden) → 3×3``, ``bypass`` a 1×1 conv to ``hidden`` and
    ``merge`` a 1×1 conv to ``out_chs``. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``. Every conv is
    conv-norm-act, default YOLOv6's BatchNorm and ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = _SPPF_KERNEL, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        hidden = out_chs // 2
        conv = partial(ConvNormAct, norm_layer=norm_layer or yolov5_batch_norm, act_layer=act_layer or nn.ReLU)
        self.pre = nn.Sequential(conv(in_chs, hidden, 1), conv(hidden, hidden, 3), conv(hidden, hidden, 1))
        self.bypass = conv(in_chs, hidden, 1)
        self.pool = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)
        self.post = nn.Sequential(conv(4 * hidden, hidden, 1), conv(hidden, hidden, 3))
        self.merge = conv(2 * hidden, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [self.pre(x)]
        for _ in range(3):
            pyramid.append(self.pool(pyramid[-1]))
        return self.merge(torch.cat((self.bypass(x), self.post(torch.cat(pyramid, 1))), 1))


class EfficientRep(Backbone):
    """YOLOv6's trunk: ``stem`` (stride-2 RepVGG block, 64 ch) → four stages (stride-2 RepVGG block, RepBlock of
    6 / 12 / 18 / 6; 128 / 256 / 512 / 1024 ch), the last ending with :class:`SimCSPSPPF`. Channels and depths at
    multiple 1.

    Args:
        width_multiple / depth_multiple: the variant's (n 0.25 / 0.33, s 0.50 / 0.33).
        rep: RepVGG blocks (True), or plain 3×3 conv-BN-ReLU blocks (:func:`conv_block`).
        norm_layer / act_layer: default YOLOv6's BatchNorm (eps 1e-3, momentum 0.03) / ReLU.
        attn_layer: run after each stage's RepBlock (YOLOv6 has none).

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, C5, H/32, W/32]``. Stages (``feature_info``,
    :func:`efficientrep_features`): ``stem``, ``stages.0`` .. ``stages.3``, reductions 2, 4, 8, 16, 32; YOLOv6 v3.0
    reads ``out_indices=(-4, -3, -2, -1)`` (P2 to P5, ``fuse_P2``). It is a trunk, not a registered classifier.
    """

    def __init__(self, in_chans: int = 3, width_multiple: float = 1.0, depth_multiple: float = 1.0, rep: bool = True,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        norm_layer = norm_layer or yolov5_batch_norm
        block = partial(rep_blocks(rep), norm_layer=norm_layer, act_layer=act_layer)
        in_chs = yolov5_width(_STEM_CHS, width_multiple)
        self.stem = block(in_chans, in_chs, 2)
        self.feature_info = FeatureInfo([dict(num_chs=in_chs, reduction=2, module="stem")])
        stages = []
        for index, (chs, depth) in enumerate(_STAGES):
            chs = yolov5_width(chs, width_multiple)
            layers = [block(in_chs, chs, 2), RepBlock(chs, chs, yolov5_depth(depth, depth_multiple), rep_blocks(rep),
                                                      norm_layer, act_layer)]
            if attn_layer is not None:
                layers.append(attn_layer(chs))
            if index == len(_STAGES) - 1:
                layers.append(SimCSPSPPF(chs, chs, norm_layer=norm_layer, act_layer=act_layer))
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** (index + 2), module=f"stages.{index}"))
            in_chs = chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H/32, W/32]."""
        return self.stages(self.stem(x))


def efficientrep_features(out_indices: Sequence[int] | None = None, **kwargs) -> FeatureExtractor:
    """The feature module of :class:`EfficientRep` (``kwargs``: its options), as
    ``create_model(name, features_only=True, out_indices=...)`` builds it for the registered backbones."""
    return FeatureExtractor(EfficientRep(**kwargs), out_indices)
