"""YOLOv7's ELAN trunks: efficient layer aggregation blocks, MP down-sampling, and the yolov7 / yolov7-tiny layouts.

References:
    Wang, Bochkovskiy & Liao 2022, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time object
    detectors" (§3.1: extended efficient layer aggregation networks; Fig. 2).
    Wang, Liao & Yeh 2022, "Designing Network Design Strategies Through Gradient Path Analysis" (ELAN).
    WongKinYiu/yolov7: ``cfg/training/yolov7.yaml``, ``yolov7-tiny.yaml`` (the backbone sections), ``models/common.py``.

Blocks (the cfgs spell them as plain layer lists; the names here are cvlab's):

- :class:`ELAN`: two 1×1 convs of the input (a bypass and the start of a chain), a chain of ``depth`` 3×3 convs,
  and a 1×1 conv over the concatenation of every ``step``-th chain output (last first), the chain's start and the
  bypass: the cfgs' ``[[-1, -3, -5, -6], 1, Concat]`` (trunk: 4 convs, every second kept) and
  ``[[-1, -2, -3, -4, -5, -6], 1, Concat]`` (neck: 4 convs of half width, all kept), yolov7-tiny's
  ``[[-1, -2, -3, -4], 1, Concat]`` (2 convs, all kept). The gradient paths of every length meet in the merge, the
  design the paper's §3.1 argues for. The paper's E-ELAN proper (expanded cardinality with group convolutions,
  shuffled and merged) is in its E6E model only; yolov7 and yolov7-tiny are built of these blocks.
- :class:`MPDown` (the cfgs' "MP" down-sampling, ``[-1, 1, MP] … [[-1, -3], 1, Concat]``): half the output from a
  2×2 max-pool and a 1×1 conv, half from a 1×1 conv and a stride-2 3×3 conv, concatenated (conv branch first).
  yolov7-tiny down-samples its trunk with the max-pool alone.
- Every conv is conv → BatchNorm (eps 1e-3, momentum 0.03: YOLOv7's ``initialize_weights``, as YOLOv5's) → SiLU
  (yolov7) or LeakyReLU(0.1) (yolov7-tiny), from cvlab's factories.

Nothing here has a library form (timm has no ELAN), so the blocks are written by hand; pooling is
``nn.MaxPool2d``. Widths follow ``parse_model``: a layer of ``c`` channels gets ``ceil(c · width / 8) · 8``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models.backbones.darknet import leaky_relu
from cvlab.models.backbones.features import Backbone, FeatureExtractor, FeatureInfo
from cvlab.models.backbones.yolov5 import silu, yolov5_batch_norm, yolov5_width

# Per trunk: the stem's convs (channels, stride), the first stage's stride-2 conv, and per stage the ELAN's output
# and branch channels (widths at multiple 1), the ELAN's 3×3 convs and which of them it keeps (step), and whether the
# later stages down-sample with MPDown (else a max-pool).
TRUNKS = {
    "yolov7": dict(stem=((32, 1), (64, 2), (64, 1)), first_down=128,
                   stages=((256, 64), (512, 128), (1024, 256), (1024, 256)), depth=4, step=2, mp_conv=True),
    "yolov7_tiny": dict(stem=((32, 2),), first_down=64,
                        stages=((64, 32), (128, 64), (256, 128), (512, 256)), depth=2, step=1, mp_conv=False),
}


class ELAN(nn.Module):
    """Efficient layer aggregation: ``merge(cat[c_D, c_{D−s}, …, c_s, b, a])`` with ``a = bypass(x)``,
    ``b = reduce(x)`` (1×1 convs to ``branch_chs``) and ``c_i`` the i-th of ``depth`` chained 3×3 convs from ``b``
    (``chain_chs`` each; only every ``step``-th output is concatenated); ``merge`` is a 1×1 conv to ``out_chs`` and
    ``attn_layer`` runs after it. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``.
    """

    def __init__(self, in_chs: int, out_chs: int, branch_chs: int, chain_chs: int, depth: int, step: int = 1,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        if depth < step or depth % step:
            raise ValueError(f"an ELAN keeps every {step}-th of its {depth} chained convs: depth must be a multiple "
                             f"of step")
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.step = step
        self.bypass = conv(in_chs, branch_chs, 1)
        self.reduce = conv(in_chs, branch_chs, 1)
        self.chain = nn.ModuleList(conv(branch_chs if i == 0 else chain_chs, chain_chs, 3) for i in range(depth))
        self.merge = conv(2 * branch_chs + depth // step * chain_chs, out_chs, 1)
        self.attn = attn_layer(out_chs) if attn_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = [self.bypass(x), self.reduce(x)]
        y = kept[-1]
        for index, conv in enumerate(self.chain, 1):
            y = conv(y)
            if index % self.step == 0:
                kept.append(y)
        return self.attn(self.merge(torch.cat(kept[::-1], 1)))


class MPDown(nn.Module):
    """YOLOv7's MP down-sampling: ``cat[conv3×3/2(reduce(x)), pool_conv(maxpool2×2(x))]``, ``branch_chs`` each
    (the trunk's halve the input's width, the neck's keep it). ``Tensor[N, in_chs, H, W] → Tensor[N, 2·branch_chs,
    H/2, W/2]``."""

    def __init__(self, in_chs: int, branch_chs: int, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.pool = nn.MaxPool2d(2, 2)
        self.pool_conv = conv(in_chs, branch_chs, 1)
        self.reduce = conv(in_chs, branch_chs, 1)
        self.down = conv(branch_chs, branch_chs, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.down(self.reduce(x)), self.pool_conv(self.pool(x))), 1)


class ELANNet(Backbone):
    """The backbone section of yolov7.yaml (``variant="yolov7"``) or yolov7-tiny.yaml (``"yolov7_tiny"``):

    - yolov7: stem 3×3 convs 32 / 64 (stride 2) / 64; stage 1 a stride-2 3×3 conv (128) and an ELAN (4 chained 3×3
      convs, every second kept) to 256; stages 2–4 an :class:`MPDown` and an ELAN to 512, 1024, 1024. SiLU.
    - yolov7-tiny: stem a stride-2 3×3 conv (32); stage 1 a stride-2 3×3 conv (64) and an ELAN (2 chained convs,
      both kept) to 64; stages 2–4 a 2×2 max-pool and an ELAN to 128, 256, 512. LeakyReLU(0.1).

    Args:
        variant: a key of :data:`TRUNKS`.
        width: channel multiplier (``parse_model``'s rounding up to multiples of 8).
        norm_layer / act_layer: default YOLOv7's BatchNorm (eps 1e-3, momentum 0.03) / the variant's activation.
        attn_layer: runs after every ELAN's merge conv.

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, C5, H/32, W/32]``. Stages (``feature_info``,
    :func:`elan_features`): ``stem``, ``stages.0`` .. ``stages.3``, reductions 2, 4, 8, 16, 32; the detectors read
    ``out_indices=(-3, -2, -1)``: yolov7.yaml's layers 24, 37, 50 (tiny: 14, 21, 28). A trunk, not a registered
    classifier (the cfgs have no classification head).
    """

    def __init__(self, variant: str = "yolov7", in_chans: int = 3, width: float = 1.0,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        layout = TRUNKS[variant]
        norm_layer = norm_layer or yolov5_batch_norm
        act_layer = act_layer or (silu if variant == "yolov7" else leaky_relu)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        scaled = partial(yolov5_width, width_multiple=width)
        stem, in_chs = [], in_chans
        for chs, stride in layout["stem"]:
            stem.append(conv(in_chs, scaled(chs), 3, stride))
            in_chs = scaled(chs)
        self.stem = nn.Sequential(*stem)
        self.feature_info = FeatureInfo([dict(num_chs=in_chs, reduction=2, module="stem")])
        stages = []
        for index, (out_chs, branch_chs) in enumerate(layout["stages"]):
            if index == 0:
                down = conv(in_chs, scaled(layout["first_down"]), 3, 2)
                down_chs = scaled(layout["first_down"])
            elif layout["mp_conv"]:
                down = MPDown(in_chs, in_chs // 2, norm_layer, act_layer)
                down_chs = 2 * (in_chs // 2)
            else:
                down, down_chs = nn.MaxPool2d(2, 2), in_chs
            out_chs, branch_chs = scaled(out_chs), scaled(branch_chs)
            elan = ELAN(down_chs, out_chs, branch_chs, branch_chs, layout["depth"], layout["step"], norm_layer,
                        act_layer, attn_layer)
            stages.append(nn.Sequential(down, elan))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** (index + 2), module=f"stages.{index}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H/32, W/32]."""
        return self.stages(self.stem(x))


def elan_features(out_indices: Sequence[int] | None = None, **kwargs) -> FeatureExtractor:
    """The feature module of :class:`ELANNet` (``kwargs``: its options), as
    ``create_model(name, features_only=True, out_indices=...)`` builds it for the registered backbones."""
    return FeatureExtractor(ELANNet(**kwargs), out_indices)
