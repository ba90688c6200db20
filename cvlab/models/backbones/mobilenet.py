"""MobileNet v1, v2 and v3 classification backbones.

Papers:
    Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications" (v1:
    depthwise separable convolutions, width multiplier α).
    Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (v2: expand ×t → depthwise →
    linear 1×1 projection, residual between the thin ends, ReLU6).
    Howard et al. 2019, "Searching for MobileNetV3" (v3: searched block table, h-swish, squeeze-and-excitation with a
    hard-sigmoid gate, efficient last stage).

v2/v3 follow torchvision's layout and numerics (v3's BatchNorm eps=1e-3, momentum=0.01); v3's ``state_dict`` keys
equal torchvision's, v2's differ only inside blocks (torchvision keeps the projection conv and its norm as two
entries, here they are one ``ConvNormAct``). v1 has no torchvision model; it is written from the paper's Table 1.

cvlab's additions: a small-input rule (strides and BatchNorm momentum), a GDC head, and pluggable norm / activation /
attention (see :class:`MobileNet`).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from cvlab.layers.conv import ConvNormAct, DepthwiseSeparableConv, depthwise_conv, make_global_pool, pointwise_conv
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.features import Backbone, FeatureInfo
from cvlab.models.backbones.resnet import conv_output_size, init_conv_norm_, use_small_stem
from cvlab.utils.errors import UserError


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10% (the TF/torchvision rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: Tensor[N, C, H, W] rescaled per channel by ``gate(fc2(act(fc1(mean_HW(x)))))``.

    The squeeze width is ``make_divisible(C / 4, 8)``; the gate is a hard sigmoid (cheap piecewise-linear
    approximation of the sigmoid). Module names match torchvision's so its weights load.
    """

    def __init__(self, chs: int, act_layer: ActFactory = nn.ReLU, gate_layer: ActFactory = nn.Hardsigmoid):
        super().__init__()
        squeeze_chs = make_divisible(chs // 4, 8)
        self.fc1 = nn.Conv2d(chs, squeeze_chs, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(squeeze_chs, chs, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1×1 expand (skipped when ``exp_chs == in_chs``) → k×k depthwise → optional attention
    (V3's SE, or the user's ``attn_layer``) → 1×1 linear projection with no activation, plus ``x`` when stride is 1
    and the channel count is kept.

    The residual joins the thin (bottleneck) ends; the projection stays linear because a ReLU on few channels
    destroys information (MobileNetV2, Sec. 3.2).
    """

    def __init__(
        self,
        in_chs: int,
        exp_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU6,
        attn_layer: AttnFactory | None = None,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        if exp_chs != in_chs:
            layers.append(pointwise_conv(in_chs, exp_chs, norm_layer=norm_layer, act_layer=act_layer))
        layers.append(depthwise_conv(exp_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=act_layer))
        if attn_layer is not None:
            layers.append(attn_layer(exp_chs))
        layers.append(pointwise_conv(exp_chs, out_chs, norm_layer=norm_layer))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNet(Backbone):
    """A MobileNet: ``features`` (stem conv, blocks, last 1×1 conv for v2/v3) → ``global_pool`` → ``classifier``.

    =================  =====================================================  ==========  ===========
    variant            blocks                                                 last convs  params (1k)
    =================  =====================================================  ==========  ===========
    mobilenetv1        13 depthwise separable, BN + ReLU                      —           4,231,976
    mobilenetv2        17 inverted residual (t=6), ReLU6, dropout 0.2         1280        3,504,872
    mobilenetv3_small  11 inverted residual, SE / h-swish, dropout 0.2        576 → 1024  2,542,856
    mobilenetv3_large  15 inverted residual, SE / h-swish, dropout 0.2        960 → 1280  5,483,032
    =================  =====================================================  ==========  ===========

    Entry-point options (besides the contract's num_classes / in_chans / image_size / norm / act / attn):
        width_mult: channel multiplier (v1's α); channels are rounded with ``make_divisible(·, 8)``.
        stem: ``"auto"`` (small when ``image_size <= 64``), ``"standard"`` or ``"small"``. The small-input rule removes
            two strides, total stride 32 → 8: the stem conv gets stride 1 and so does the first strided block
            (a 32 px input ends at 4×4, an 8 px input at 1×1).
        bn_momentum: momentum of the default BatchNorm's running statistics (PyTorch's convention: the weight of the
            newest batch). None: v1 / v2 0.1 (PyTorch's, as torchvision); v3 the paper's 0.01 (TF decay 0.99), but
            0.1 for small inputs (``image_size <= 64``, the small-stem threshold). An average with momentum m
            remembers ~1/m steps and still holds 5 % of its start after 3/m; ImageNet-length runs hide that, the short
            runs of small-input data do not: on digits (6 epochs, 114 steps) v3 at 0.01 reaches 0.99 train accuracy
            but evaluates at chance (0.10), at 0.1 it tests at 0.96. Only for the default norm: with ``norm_layer``
            given, set that norm's own options.
        head: ``"gap"`` or ``"gdc"`` (global depthwise conv sized from image_size).
        drop_rate: dropout before the last linear layer (v1: 0; v2/v3: 0.2, as torchvision).
        attn_layer: placed after the depthwise conv of every block, on the expanded channels, the position of
            MobileNetV3's SE (v1: between the depthwise and pointwise convs). v3 keeps its own SE; ``attn_layer``
            is added only to the blocks that have none.
        act_layer: replaces every activation, for v3 also the ReLU inside SE and the h-swish of the classifier;
            the SE's hard-sigmoid gate stays.

    Stages (``feature_info``, and ``create_model(name, features_only=True)``): five, each ending just before a layer
    that halves the resolution in the paper's network, so the first holds the stem conv (and the first block when
    that block keeps the resolution) and the last ends with the last 1×1 conv. Each is named by its last layer,
    ``features.<i>``; reductions 2, 4, 8, 16, 32, or 1, 1, 2, 4, 8 with the small-input rule.
    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, num_features, h, w]``.
    """

    def __init__(
        self,
        layers: list[nn.Module],
        out_chs: list[int],
        paper_strides: list[int],
        strides: list[int],
        classifier: nn.Module,
        image_size: int,
        head: str,
        norm_layer: NormFactory,
    ):
        super().__init__()
        self.features = nn.Sequential(*layers)
        # A stage ends before every layer that halves the resolution in the paper's network (not counting the stem),
        # so the stages stay the same layers when the small-input rule drops strides.
        ends = [i - 1 for i in range(1, len(layers)) if paper_strides[i] > 1] + [len(layers) - 1]
        self.feature_info = FeatureInfo(
            dict(num_chs=out_chs[end], reduction=math.prod(strides[: end + 1]), module=f"features.{end}")
            for end in ends
        )

        self.num_features = out_chs[-1]
        self.feature_size = conv_output_size(image_size, strides)
        self.global_pool = make_global_pool(head, self.num_features, self.feature_size, norm_layer)
        self.classifier = classifier

        init_conv_norm_(self)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, h, w]."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, num_features, h, w] → logits Tensor[N, num_classes]."""
        return self.classifier(self.global_pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# PyTorch's BatchNorm default: what v1 / v2 use, and v3 for small inputs (see ``bn_momentum`` in MobileNet).
_BN_MOMENTUM = 0.1
# MobileNetV3's BatchNorm (the TF reference's decay 0.99 and eps 1e-3, as torchvision).
_V3_BN_MOMENTUM = 0.01
_V3_BN_EPS = 1e-3


def _batch_norm(norm_layer: NormFactory | None, bn_momentum: float | None, paper_momentum: float, image_size: int,
                eps: float = 1e-5) -> NormFactory:
    """The norm factory of a MobileNet: ``norm_layer`` when given, else BatchNorm with ``bn_momentum`` (None: the
    paper's ``paper_momentum``, or PyTorch's 0.1 for inputs of at most 64 px, the small-stem threshold)."""
    if norm_layer is not None:
        if bn_momentum is not None:
            raise UserError(f"bn_momentum={bn_momentum} sets the default BatchNorm, but the norm is replaced "
                            "(norm=...): set that norm's own options instead, e.g. norm=bn norm.momentum=0.1")
        return norm_layer
    if bn_momentum is None:
        bn_momentum = _BN_MOMENTUM if use_small_stem("auto", image_size) else paper_momentum
    if not 0 < bn_momentum <= 1:
        raise UserError(f"bn_momentum={bn_momentum} must lie in (0, 1] (the weight of the newest batch)")
    return partial(nn.BatchNorm2d, eps=eps, momentum=bn_momentum)


def _used_strides(paper_strides: list[int], small: bool) -> list[int]:
    """The small-input rule: the stem (index 0) and the first strided block lose their stride."""
    strides = list(paper_strides)
    if small:
        strides[0] = 1
        first_strided = next(i for i in range(1, len(strides)) if strides[i] > 1)
        strides[first_strided] = 1
    return strides


# MobileNetV1 (paper Table 1) after the stem: (output channels, stride) of each depthwise separable block.
_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

# MobileNetV2 (paper Table 2): expansion t, output channels c, repeats n, stride s of the first repeat.
_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

# MobileNetV3 (paper Tables 1 and 2): kernel, expanded channels, output channels, SE, h-swish, stride.
_V3_SMALL = [
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
]
_V3_LARGE = [
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
]


def _mobilenet_v1(
    num_classes: int = 1000,
    in_chans: int = 3,
    image_size: int = 224,
    norm_layer: NormFactory | None = None,
    act_layer: ActFactory | None = None,
    attn_layer: AttnFactory | None = None,
    width_mult: float = 1.0,
    stem: str = "auto",
    head: str = "gap",
    drop_rate: float = 0.0,
    bn_momentum: float | None = None,
) -> MobileNet:
    norm_layer = _batch_norm(norm_layer, bn_momentum, _BN_MOMENTUM, image_size)
    act_layer = act_layer or partial(nn.ReLU, inplace=True)
    paper_strides = [2] + [stride for _, stride in _V1_BLOCKS]
    strides = _used_strides(paper_strides, use_small_stem(stem, image_size))

    chs = make_divisible(32 * width_mult)
    layers = [ConvNormAct(in_chans, chs, 3, strides[0], norm_layer=norm_layer, act_layer=act_layer)]
    out_chs = [chs]
    for (block_chs, _), stride in zip(_V1_BLOCKS, strides[1:]):
        block_out = make_divisible(block_chs * width_mult)
        layers.append(DepthwiseSeparableConv(chs, block_out, stride, norm_layer, act_layer, attn_layer))
        chs = block_out
        out_chs.append(chs)
    classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(chs, num_classes))
    return MobileNet(layers, out_chs, paper_strides, strides, classifier, image_size, head, norm_layer)


def _mobilenet_v2(
    num_classes: int = 1000,
    in_chans: int = 3,
    image_size: int = 224,
    norm_layer: NormFactory | None = None,
    act_layer: ActFactory | None = None,
    attn_layer: AttnFactory | None = None,
    width_mult: float = 1.0,
    stem: str = "auto",
    head: str = "gap",
    drop_rate: float = 0.2,
    bn_momentum: float | None = None,
) -> MobileNet:
    norm_layer = _batch_norm(norm_layer, bn_momentum, _BN_MOMENTUM, image_size)
    act_layer = act_layer or partial(nn.ReLU6, inplace=True)
    blocks = [(t, c, s if repeat == 0 else 1) for t, c, n, s in _V2_STAGES for repeat in range(n)]
    paper_strides = [2] + [stride for _, _, stride in blocks] + [1]
    strides = _used_strides(paper_strides, use_small_stem(stem, image_size))

    chs = make_divisible(32 * width_mult)
    layers: list[nn.Module] = [ConvNormAct(in_chans, chs, 3, strides[0], norm_layer=norm_layer, act_layer=act_layer)]
    out_chs = [chs]
    for (expansion, block_chs, _), stride in zip(blocks, strides[1:-1]):
        block_out = make_divisible(block_chs * width_mult)
        layers.append(InvertedResidual(chs, round(chs * expansion), block_out, 3, stride, norm_layer, act_layer,
                                       attn_layer))
        chs = block_out
        out_chs.append(chs)
    # The last conv does not shrink below 1280 for width_mult < 1 (paper Sec. 6.1).
    last_chs = make_divisible(1280 * max(1.0, width_mult))
    layers.append(pointwise_conv(chs, last_chs, norm_layer=norm_layer, act_layer=act_layer))
    out_chs.append(last_chs)
    classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(last_chs, num_classes))
    return MobileNet(layers, out_chs, paper_strides, strides, classifier, image_size, head, norm_layer)


def _mobilenet_v3(
    table: list[tuple],
    head_chs: int,
    num_classes: int = 1000,
    in_chans: int = 3,
    image_size: int = 224,
    norm_layer: NormFactory | None = None,
    act_layer: ActFactory | None = None,
    attn_layer: AttnFactory | None = None,
    width_mult: float = 1.0,
    stem: str = "auto",
    head: str = "gap",
    drop_rate: float = 0.2,
    bn_momentum: float | None = None,
) -> MobileNet:
    norm_layer = _batch_norm(norm_layer, bn_momentum, _V3_BN_MOMENTUM, image_size, eps=_V3_BN_EPS)
    relu = act_layer or partial(nn.ReLU, inplace=True)
    hswish = act_layer or partial(nn.Hardswish, inplace=True)
    squeeze_excite = partial(SqueezeExcite, act_layer=act_layer or nn.ReLU)
    paper_strides = [2] + [row[-1] for row in table] + [1]
    strides = _used_strides(paper_strides, use_small_stem(stem, image_size))

    def scale(chs: int) -> int:
        return make_divisible(chs * width_mult)

    chs = scale(16)
    layers: list[nn.Module] = [ConvNormAct(in_chans, chs, 3, strides[0], norm_layer=norm_layer, act_layer=hswish)]
    out_chs = [chs]
    for (kernel, exp_chs, block_chs, use_se, use_hswish, _), stride in zip(table, strides[1:-1]):
        layers.append(InvertedResidual(
            chs, scale(exp_chs), scale(block_chs), kernel, stride, norm_layer,
            hswish if use_hswish else relu, squeeze_excite if use_se else attn_layer,
        ))
        chs = scale(block_chs)
        out_chs.append(chs)
    last_chs = 6 * chs
    layers.append(pointwise_conv(chs, last_chs, norm_layer=norm_layer, act_layer=hswish))
    out_chs.append(last_chs)
    # v3's "efficient last stage": the pre-logits layer is a linear layer on the pooled vector (no norm).
    pre_logits_chs = scale(head_chs)
    classifier = nn.Sequential(
        nn.Linear(last_chs, pre_logits_chs), hswish(), nn.Dropout(drop_rate), nn.Linear(pre_logits_chs, num_classes)
    )
    return MobileNet(layers, out_chs, paper_strides, strides, classifier, image_size, head, norm_layer)


@register_model
def mobilenetv1(**kwargs) -> MobileNet:
    return _mobilenet_v1(**kwargs)


@register_model
def mobilenetv2(**kwargs) -> MobileNet:
    return _mobilenet_v2(**kwargs)


@register_model
def mobilenetv3_small(**kwargs) -> MobileNet:
    return _mobilenet_v3(_V3_SMALL, 1024, **kwargs)


@register_model
def mobilenetv3_large(**kwargs) -> MobileNet:
    return _mobilenet_v3(_V3_LARGE, 1280, **kwargs)
