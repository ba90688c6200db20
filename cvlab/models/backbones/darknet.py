"""Darknet classification backbones and the trunks the YOLO detectors are built on.

Papers:
    Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (Darknet-19, Table 6).
    Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (Darknet-53, Table 1).

Darknet-19 is VGG-like: 3×3 convs that double the channels after each 2×2 max-pool, with 1×1 convs halving them in
between, and a classifier that is a 1×1 conv to the classes followed by global average pooling. Darknet-53 replaces
the pools by stride-2 3×3 convs and the conv pairs by residual blocks (1×1 halve, 3×3 restore, add), 1/2/8/8/4 of
them per stage, and ends with global average pooling + a fully connected layer. Every conv is followed by batch norm
and LeakyReLU(0.1), as in the released ``darknet19.cfg`` / ``darknet53.cfg``.

:class:`TinyDarknet` is the 7-conv trunk shared by the released ``tiny-yolo-voc.cfg`` (YOLOv2-tiny) and
``yolov3-tiny.cfg``; it is not a registered classifier, and :func:`tiny_darknet_features` gives its feature module.

cvlab's additions: a channel ``width`` multiplier, a small-image stem, and pluggable norm / activation / attention.
The YOLO detectors read the stage outputs through the feature call (:mod:`cvlab.models.backbones.features`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from cvlab.layers.conv import ClassifierHead, ConvNormAct
from cvlab.layers.init import restore_own_inits
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.features import Backbone, FeatureExtractor, FeatureInfo
from cvlab.models.backbones.resnet import use_small_stem

# Per stage: (output channels, number of convs for Darknet-19 / of residual blocks for Darknet-53).
_STAGES = {
    19: ((64, 1), (128, 3), (256, 3), (512, 5), (1024, 5)),
    53: ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)),
}
_STEM_CHS = 32
# Stages whose downsampling the small-image stem removes (image_size <= 64): the output stride drops from 32 to 8, so an
# 8×8 input still ends at 1×1 and a 32×32 one at 4×4.
_SMALL_STEM_UNSTRIDED = 2


def leaky_relu() -> nn.Module:
    """Darknet's activation: LeakyReLU with slope 0.1 (PyTorch's default slope is 0.01)."""
    return nn.LeakyReLU(0.1, inplace=True)


def scale_width(chs: int, width: float) -> int:
    """Channels after the ``width`` multiplier (at least 1)."""
    return max(1, int(round(chs * width)))


def init_darknet_weights(model: nn.Module) -> None:
    """He-normal init for LeakyReLU(0.1) (fan_in) on every conv / linear, zero biases, norms weight 1 / bias 0.

    Darknet itself draws conv weights uniformly from ±sqrt(2 / fan_in), a third of He's variance. With batch norm
    that is harmless, but YOLOv1 has no norm by default and its activations would shrink ~3× per layer over 24
    layers, so the variance-preserving He init is used throughout.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_in", nonlinearity="leaky_relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _attn_or_identity(attn_layer: AttnFactory | None, chs: int) -> nn.Module:
    return attn_layer(chs) if attn_layer is not None else nn.Identity()


class DarknetResidual(nn.Module):
    """Darknet-53's block: ``x + attn(conv3×3(conv1×1(x)))`` with the 1×1 halving the channels (``hidden_chs``: to
    that width instead; YOLOv5's C3 blocks keep the width).

    Unlike ResNet there is no activation after the add (Darknet's ``[shortcut] activation=linear``).
    """

    def __init__(self, chs: int, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None = None, hidden_chs: int | None = None):
        super().__init__()
        hidden = hidden_chs or max(1, chs // 2)
        self.reduce = ConvNormAct(chs, hidden, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.conv = ConvNormAct(hidden, chs, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.attn = _attn_or_identity(attn_layer, chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.conv(self.reduce(x)))


def _darknet19_stage(in_chs: int, out_chs: int, num_convs: int, downsample: bool, norm_layer: NormFactory | None,
                     act_layer: ActFactory, attn_layer: AttnFactory | None) -> nn.Sequential:
    """2×2 max-pool, then 3×3 convs to ``out_chs`` alternating with 1×1 convs to ``out_chs / 2``."""
    conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2) if downsample else nn.Identity()]
    for index in range(num_convs):
        is_3x3 = index % 2 == 0
        chs = out_chs if is_3x3 else max(1, out_chs // 2)
        layers.append(conv(in_chs, chs, 3 if is_3x3 else 1))
        in_chs = chs
    layers.append(_attn_or_identity(attn_layer, out_chs))
    return nn.Sequential(*layers)


def _darknet53_stage(in_chs: int, out_chs: int, num_blocks: int, downsample: bool, norm_layer: NormFactory | None,
                     act_layer: ActFactory, attn_layer: AttnFactory | None) -> nn.Sequential:
    """A 3×3 stride-2 conv to ``out_chs``, then ``num_blocks`` residual blocks."""
    return nn.Sequential(
        ConvNormAct(in_chs, out_chs, 3, 2 if downsample else 1, norm_layer=norm_layer, act_layer=act_layer),
        *[DarknetResidual(out_chs, norm_layer, act_layer, attn_layer) for _ in range(num_blocks)],
    )


class Darknet(Backbone):
    """Darknet-19 / Darknet-53: 3×3 stem (32 ch) → five stages, each halving the resolution → classifier.

    Measured by cvlab at 1000 classes (FLOPs = 2 · multiply-adds from ``torch.utils.flop_counter``, convs and the
    classifier; the papers count "operations" the same way):

    ==========  ======  ===========  =====================  ================================
    variant     convs   params       cvlab FLOPs            paper
    ==========  ======  ===========  =====================  ================================
    darknet19   19      20,842,376   5.58 G at 224 px       5.58 Bn operations at 224 px
    darknet53   52+fc   41,609,928   18.57 G at 256 px      18.7 Bn operations at 256 px
    ==========  ======  ===========  =====================  ================================

    (Darknet-53's count: 52 convs + the final FC make the 53 layers.)

    Args:
        depth: 19 or 53.
        num_classes: classifier outputs.
        width: channel multiplier applied to every layer (1.0 = the paper).
        small_stem: drop the downsampling of the first two stages (output stride 8 instead of 32), for inputs of
            8–64 px; the entry points take ``stem="auto"`` (small when ``image_size <= 64``), ``"standard"`` or
            ``"small"``.
        norm_layer / act_layer: default BatchNorm2d / LeakyReLU(0.1); a given factory replaces every one.
        attn_layer: Darknet-53 runs it on each residual branch before the add; Darknet-19, which has no residual
            blocks, runs it after the last conv of each stage.

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, C5, H/32, W/32]``. Stages (``feature_info``, and
    ``create_model(name, features_only=True)``): ``stem``, ``stages.0`` .. ``stages.4``, reductions 1, 2, 4, 8, 16,
    32 (small stem: 1, 1, 1, 2, 4, 8); ``out_indices=(-3, -2, -1)`` gives the C3, C4, C5 maps the YOLO heads read.
    """

    def __init__(
        self,
        depth: int = 53,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: float = 1.0,
        small_stem: bool = False,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory | None = None,
        attn_layer: AttnFactory | None = None,
    ):
        super().__init__()
        if depth not in _STAGES:
            raise ValueError(f"Darknet depth must be one of {sorted(_STAGES)}, got {depth}")
        self.depth = depth
        act_layer = act_layer or leaky_relu
        make_stage = _darknet19_stage if depth == 19 else _darknet53_stage

        in_chs = scale_width(_STEM_CHS, width)
        self.stem = ConvNormAct(in_chans, in_chs, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.feature_info = FeatureInfo([dict(num_chs=in_chs, reduction=1, module="stem")])
        stages, reduction = [], 1
        for index, (out_chs, depth_of_stage) in enumerate(_STAGES[depth]):
            downsample = not (small_stem and index < _SMALL_STEM_UNSTRIDED)
            out_chs = scale_width(out_chs, width)
            stages.append(make_stage(in_chs, out_chs, depth_of_stage, downsample, norm_layer, act_layer, attn_layer))
            reduction *= 2 if downsample else 1
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{index}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

        if depth == 19:
            # Darknet-19 classifies every position with a 1×1 conv, then averages the class maps.
            self.head = nn.Sequential(nn.Conv2d(in_chs, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        else:
            self.head = ClassifierHead(in_chs, num_classes)
        init_darknet_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H / r, W / r] (r = 32, or 8 with the small stem)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → logits Tensor[N, num_classes]."""
        return self.head(self.forward_features(x))


class TinyDarknet(Backbone):
    """The trunk of tiny-yolo-voc.cfg and yolov3-tiny.cfg: six 3×3 convs (16, 32, …, 512 channels), each followed by
    a 2×2 max-pool, then a 3×3 conv to 1024. The sixth pool has stride 1 (total stride 32). ``attn_layer`` runs
    before each pool.

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, 1024·width, H/32, W/32]``. Stages
    (``feature_info``, :func:`tiny_darknet_features`): each conv's output before its pool, ``stages.<i>.attn``
    (16 … 512 channels at reductions 1, 2, 4, 8, 16, 32), then ``final_conv`` (1024 at 32). The detectors read
    ``out_indices=(-3, -1)``: the 256-channel stride-16 map (YOLOv3-tiny's second scale) and the last map.
    """

    _CHANNELS = (16, 32, 64, 128, 256, 512)

    def __init__(self, in_chans: int = 3, width: float = 1.0, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer or leaky_relu)
        stages = []
        self.feature_info = FeatureInfo()
        in_chs = in_chans
        for index, chs in enumerate(self._CHANNELS):
            chs = scale_width(chs, width)
            is_last = index == len(self._CHANNELS) - 1
            # Darknet's stride-1 2×2 pool keeps the size by ignoring positions past the border: replicate-pad right
            # and bottom by one, which gives the same maxima.
            pool = nn.Sequential(nn.ReplicationPad2d((0, 1, 0, 1)), nn.MaxPool2d(2, 1)) if is_last else nn.MaxPool2d(2)
            stages.append(nn.Sequential(OrderedDict(conv=conv(in_chs, chs, 3), attn=_attn_or_identity(attn_layer, chs),
                                                    pool=pool)))
            self.feature_info.append(dict(num_chs=chs, reduction=2**index, module=f"stages.{index}.attn"))
            in_chs = chs
        self.stages = nn.Sequential(*stages)
        self.final_conv = conv(in_chs, scale_width(1024, width), 3)
        self.feature_info.append(dict(num_chs=scale_width(1024, width), reduction=32, module="final_conv"))
        init_darknet_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, 1024·width, H/32, W/32]."""
        return self.final_conv(self.stages(x))


def tiny_darknet_features(out_indices: Sequence[int] | None = None, **kwargs) -> FeatureExtractor:
    """The feature module of :class:`TinyDarknet` (``kwargs``: its options), as
    ``create_model(name, features_only=True, out_indices=...)`` builds it for the registered backbones."""
    trunk = TinyDarknet(**kwargs)
    restore_own_inits(trunk)  # init_darknet_weights overwrote e.g. a non-local block's zeroed norm
    return FeatureExtractor(trunk, out_indices)


def _darknet(depth: int, num_classes: int = 1000, in_chans: int = 3, image_size: int = 224, stem: str = "auto",
             width: float = 1.0, norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
             attn_layer: AttnFactory | None = None) -> Darknet:
    return Darknet(depth, num_classes=num_classes, in_chans=in_chans, width=width,
                   small_stem=use_small_stem(stem, image_size), norm_layer=norm_layer, act_layer=act_layer,
                   attn_layer=attn_layer)


@register_model
def darknet19(**kwargs) -> Darknet:
    """Darknet-19 (YOLOv2's classifier, 224 px)."""
    return _darknet(19, **kwargs)


@register_model
def darknet53(**kwargs) -> Darknet:
    """Darknet-53 (YOLOv3's classifier, 256 px in the paper)."""
    return _darknet(53, **kwargs)

