"""YOLOv5's CSP-Darknet trunk (the v6.0+ layout): a 6×6 stem conv, four stages of a stride-2 conv and a C3 block,
and SPPF at the end, scaled by width and depth multiples (n / s / m / l / x).

References:
    Jocher et al., ultralytics/yolov5 v6.0 (2021; no paper): ``models/yolov5{n,s,m,l,x}.yaml``, ``models/common.py``.
    Wang et al. 2020, "CSPNet: A New Backbone that can Enhance Learning Capability of CNN" (cross-stage partial
    connections, which C3 is a form of).
    He et al. 2015, "Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition" (SPP; SPPF is
    the same pooling pyramid as YOLOv4's SPP 5/9/13, computed as three 5×5 poolings in a row).

Blocks (``models/common.py`` names in brackets):

- **C3** [``C3``]: two 1×1 convs split the input into a main path (``depth`` bottlenecks) and a bypass, each half
  the output width; their concatenation goes through a 1×1 conv. A bottleneck is Darknet-53's residual block at full
  width (:class:`~cvlab.models.backbones.darknet.DarknetResidual`, 1×1 then 3×3, added to its input); the neck's C3
  blocks run it without the addition.
- **SPPF** [``SPPF``]: a 1×1 conv to half the channels, three 5×5 stride-1 max-poolings in a row, the four maps
  concatenated, a 1×1 conv.
- Every conv is conv → BatchNorm (eps 1e-3, momentum 0.03: YOLOv5's ``initialize_weights``) → SiLU, from cvlab's
  factories (``activation=swish`` with β = 1 is SiLU).

Scaling (``parse_model``): a layer of ``c`` channels gets ``ceil(c · width_multiple / 8) · 8``, and a C3 of ``n``
bottlenecks ``max(round(n · depth_multiple), 1)``. Nothing here has a library form (timm's CSPDarknet is YOLOv4's
CSP stage, not C3), so the blocks are written by hand; the pooling is ``nn.MaxPool2d``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from cvlab.layers.activation import get_act_layer
from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models.backbones.darknet import DarknetResidual
from cvlab.models.backbones.features import Backbone, FeatureExtractor, FeatureInfo

# Per stage after the stem: output channels and C3 bottlenecks at width and depth multiple 1 (yolov5l).
_STAGES = ((128, 3), (256, 6), (512, 9), (1024, 3))
_STEM_CHS = 64
_CHANNEL_DIVISOR = 8  # parse_model's make_divisible
_SPPF_KERNEL = 5


def yolov5_width(chs: int, width_multiple: float) -> int:
    """A layer's channels under the width multiple: rounded up to a multiple of 8 (``make_divisible``)."""
    return math.ceil(chs * width_multiple / _CHANNEL_DIVISOR) * _CHANNEL_DIVISOR


def yolov5_depth(blocks: int, depth_multiple: float) -> int:
    """A C3's bottlenecks under the depth multiple: ``max(round(n · depth_multiple), 1)``."""
    return max(round(blocks * depth_multiple), 1) if blocks > 1 else blocks


def yolov5_batch_norm(chs: int) -> nn.BatchNorm2d:
    """YOLOv5's BatchNorm: eps 1e-3, momentum 0.03 (running statistics averaged over ~33 steps)."""
    return nn.BatchNorm2d(chs, eps=1e-3, momentum=0.03)


silu: ActFactory = get_act_layer("swish")  # SiLU = Swish with β = 1 (runs as F.silu)


class C3(nn.Module):
    """CSP bottleneck with three convs: ``merge(cat(blocks(reduce(x)), bypass(x)))``.

    ``reduce`` and ``bypass`` are 1×1 convs to ``out_chs / 2``; ``blocks`` are ``depth`` full-width bottlenecks
    (1×1 then 3×3, plus the input when ``shortcut``; ``attn_layer`` runs on each residual branch); ``merge`` is a 1×1
    conv to ``out_chs``. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``. Norm and activation: default
    YOLOv5's (:func:`yolov5_batch_norm`, SiLU), as in :class:`SPPF`.
    """

    def __init__(self, in_chs: int, out_chs: int, depth: int = 1, shortcut: bool = True,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        hidden = out_chs // 2
        norm_layer, act_layer = norm_layer or yolov5_batch_norm, act_layer or silu
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.reduce = conv(in_chs, hidden, 1)
        self.bypass = conv(in_chs, hidden, 1)
        self.blocks = nn.Sequential(*(
            DarknetResidual(hidden, norm_layer, act_layer, attn_layer, hidden_chs=hidden) if shortcut
            else nn.Sequential(conv(hidden, hidden, 1), conv(hidden, hidden, 3))
            for _ in range(depth)))
        self.merge = conv(2 * hidden, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat((self.blocks(self.reduce(x)), self.bypass(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: ``out(cat(y, p(y), p(p(y)), p(p(p(y)))))`` with ``y = reduce(x)`` (1×1 to
    ``in_chs / 2``) and ``p`` a ``kernel``×``kernel`` stride-1 max-pool; the chained 5×5 poolings see the 5, 9 and
    13 windows of SPP. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = _SPPF_KERNEL, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        hidden = in_chs // 2
        conv = partial(ConvNormAct, norm_layer=norm_layer or yolov5_batch_norm, act_layer=act_layer or silu)
        self.reduce = conv(in_chs, hidden, 1)
        self.pool = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)
        self.out = conv(4 * hidden, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [self.reduce(x)]
        for _ in range(3):
            pyramid.append(self.pool(pyramid[-1]))
        return self.out(torch.cat(pyramid, 1))


class CSPDarknetV5(Backbone):
    """YOLOv5's trunk: ``stem`` (6×6 stride-2 conv, 64 ch) → four stages (3×3 stride-2 conv, C3 of 3/6/9/3
    bottlenecks; 128/256/512/1024 ch), the last ending with SPPF. Channels and depths at multiple 1 (yolov5l).

    Args:
        width_multiple / depth_multiple: the variant's (n 0.25/0.33, s 0.50/0.33, m 0.75/0.67, l 1/1, x 1.25/1.33).
        norm_layer / act_layer: default YOLOv5's BatchNorm (:func:`yolov5_batch_norm`) / SiLU.
        attn_layer: run on the residual branch of every backbone bottleneck.

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, C5, H/32, W/32]``. Stages (``feature_info``,
    :func:`yolov5_features`): ``stem``, ``stages.0`` .. ``stages.3``, reductions 2, 4, 8, 16, 32; the detector reads
    ``out_indices=(-3, -2, -1)``, the outputs of yolov5s.yaml's layers 4, 6 and 9 (P3, P4 and the SPPF's P5).
    It is a trunk, not a registered classifier (there is no classification head).
    """

    def __init__(self, in_chans: int = 3, width_multiple: float = 1.0, depth_multiple: float = 1.0,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        norm_layer, act_layer = norm_layer or yolov5_batch_norm, act_layer or silu
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        in_chs = yolov5_width(_STEM_CHS, width_multiple)
        self.stem = conv(in_chans, in_chs, 6, 2, padding=2)
        self.feature_info = FeatureInfo([dict(num_chs=in_chs, reduction=2, module="stem")])
        stages = []
        for index, (chs, blocks) in enumerate(_STAGES):
            chs = yolov5_width(chs, width_multiple)
            layers = [conv(in_chs, chs, 3, 2),
                      C3(chs, chs, yolov5_depth(blocks, depth_multiple), True, norm_layer, act_layer, attn_layer)]
            if index == len(_STAGES) - 1:
                layers.append(SPPF(chs, chs, norm_layer=norm_layer, act_layer=act_layer))
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** (index + 2), module=f"stages.{index}"))
            in_chs = chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H/32, W/32]."""
        return self.stages(self.stem(x))


def yolov5_features(out_indices: Sequence[int] | None = None, **kwargs) -> FeatureExtractor:
    """The feature module of :class:`CSPDarknetV5` (``kwargs``: its options), as
    ``create_model(name, features_only=True, out_indices=...)`` builds it for the registered backbones."""
    return FeatureExtractor(CSPDarknetV5(**kwargs), out_indices)
