"""CSPDarknet53 (YOLOv4's backbone) and the CSP trunk of YOLOv4-tiny.

Papers:
    Wang et al. 2020, "CSPNet: A New Backbone that can Enhance Learning Capability of CNN" (CVPRW; the cross stage
    partial stage).
    Bochkovskiy, Wang & Liao 2020, "YOLOv4: Optimal Speed and Accuracy of Object Detection" (§3.4: CSPDarknet53 with
    Mish as the detector's backbone).
    Misra 2019, "Mish: A Self Regularized Non-Monotonic Activation Function".
    Wang, Bochkovskiy & Liao 2021, "Scaled-YOLOv4: Scaling Cross Stage Partial Network" (§4.1, YOLOv4-tiny).

CSPDarknet53 keeps Darknet-53's stem, widths and 1/2/8/8/4 residual blocks, and splits every stage CSP-style: after
the stride-2 3×3 conv, two 1×1 convs halve the width; one half runs the residual blocks and a 1×1 transition, the
other passes straight on, and a 1×1 conv fuses their concatenation (:class:`CSPStage`). Every conv is followed by
batch norm and Mish. Layout and widths as the released ``csdarknet53-omega.cfg`` (the classifier) and the first 105
layers of ``yolov4.cfg``, which are the same.

:class:`TinyCSPDarknet` is the trunk of the released ``yolov4-tiny.cfg``: two stride-2 3×3 convs, three
:class:`TinyCSPBlock` (the CSP split there is a channel slice, ``[route] groups=2 group_id=1``) each ending on a
2×2 max-pool, and a 3×3 conv, with LeakyReLU(0.1). It is no registered classifier (the cfg has none), and it is its
own feature module: its stride-16 level is the fused partial output inside the last block (``route 23``), which no
stage boundary exposes, so :class:`~cvlab.models.backbones.features.FeatureExtractor` cannot cut it.

cvlab's additions, as for Darknet: a channel ``width`` multiplier, a small-image stem, and pluggable norm / activation
/ attention. Mish is ``torch.nn.Mish``.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cvlab.layers.conv import ClassifierHead, ConvNormAct
from cvlab.layers.init import restore_own_inits
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import DarknetResidual, init_darknet_weights, leaky_relu, scale_width
from cvlab.models.backbones.features import Backbone, FeatureInfo
from cvlab.models.backbones.resnet import use_small_stem

# Per stage: (output channels, residual blocks), Darknet-53's.
_STAGES = ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))
_STEM_CHS = 32
# As Darknet's small stem: the first two stages keep the resolution (output stride 8) for inputs <= 64 px.
_SMALL_STEM_UNSTRIDED = 2
# yolov4-tiny.cfg: the stem's two stride-2 convs, the three CSP blocks' widths, the last 3×3 conv.
_TINY_STEM_CHS = (32, 64)
_TINY_BLOCK_CHS = (64, 128, 256)
_TINY_FINAL_CHS = 512


def mish() -> nn.Module:
    """CSPDarknet53's activation (``activation=mish`` in the cfg)."""
    return nn.Mish()


class CSPStage(nn.Module):
    """A CSPDarknet53 stage: ``fuse(cat[transition(blocks(split_main(x'))), split_shortcut(x')])`` with
    ``x' = down(x)``, the stride-2 3×3 conv to ``out_chs``.

    The two 1×1 splits go to ``out_chs / 2`` and the residual blocks keep that width (a 1×1, 3×3 pair of it); the
    first stage keeps ``out_chs`` in its splits and halves inside its one block, as Darknet-53's (``first``). The
    concatenation order (blocks' part first) and the modules' order are the cfg's (``route -1,-7``).
    """

    def __init__(self, in_chs: int, out_chs: int, num_blocks: int, first: bool, downsample: bool,
                 norm_layer: NormFactory | None, act_layer: ActFactory, attn_layer: AttnFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        hidden = out_chs if first else max(1, out_chs // 2)
        block_hidden = max(1, out_chs // 2) if first else hidden
        self.down = conv(in_chs, out_chs, 3, 2 if downsample else 1)
        self.split_shortcut = conv(out_chs, hidden, 1)
        self.split_main = conv(out_chs, hidden, 1)
        self.blocks = nn.Sequential(*[DarknetResidual(hidden, norm_layer, act_layer, attn_layer,
                                                      hidden_chs=block_hidden) for _ in range(num_blocks)])
        self.transition = conv(hidden, hidden, 1)
        self.fuse = conv(2 * hidden, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        main = self.transition(self.blocks(self.split_main(x)))
        return self.fuse(torch.cat([main, self.split_shortcut(x)], dim=1))


class CSPDarknet(Backbone):
    """CSPDarknet53: 3×3 stem (32 ch) → five :class:`CSPStage` (64 … 1024 channels, 1/2/8/8/4 blocks, each halving
    the resolution) → global average pool → fully connected.

    Measured by cvlab at 1000 classes (FLOPs = 2 · multiply-adds from ``torch.utils.flop_counter``):

    ============  ======  ===========  ===================  ==================================================
    variant       convs   params       cvlab FLOPs          reference
    ============  ======  ===========  ===================  ==================================================
    cspdarknet53  72+fc   27,642,184   13.07 G at 256 px    csdarknet53-omega.cfg: 27,642,184 trainable
    ============  ======  ===========  ===================  ==================================================

    Args:
        num_classes: classifier outputs.
        width: channel multiplier applied to every layer (1.0 = the paper).
        small_stem: drop the downsampling of the first two stages (output stride 8 instead of 32), for inputs of
            8–64 px; the entry point takes ``stem="auto"`` (small when ``image_size <= 64``), ``"standard"`` or
            ``"small"``.
        norm_layer / act_layer: default BatchNorm2d / Mish; a given factory replaces every one.
        attn_layer: runs on each residual branch before the add (as in Darknet-53).

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, 1024·width, H/32, W/32]``. Stages
    (``feature_info``, ``create_model("cspdarknet53", features_only=True)``): ``stem``, ``stages.0`` ..
    ``stages.4``, reductions 1, 2, 4, 8, 16, 32 (small stem: 1, 1, 1, 2, 4, 8); ``out_indices=(-3, -2, -1)`` gives
    the C3, C4, C5 maps YOLOv4's neck reads (yolov4.cfg layers 54, 85, 104).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_stem: bool = False,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        act_layer = act_layer or mish
        in_chs = scale_width(_STEM_CHS, width)
        self.stem = ConvNormAct(in_chans, in_chs, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.feature_info = FeatureInfo([dict(num_chs=in_chs, reduction=1, module="stem")])
        stages, reduction = [], 1
        for index, (out_chs, num_blocks) in enumerate(_STAGES):
            downsample = not (small_stem and index < _SMALL_STEM_UNSTRIDED)
            out_chs = scale_width(out_chs, width)
            stages.append(CSPStage(in_chs, out_chs, num_blocks, index == 0, downsample, norm_layer, act_layer,
                                   attn_layer))
            reduction *= 2 if downsample else 1
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{index}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.head = ClassifierHead(in_chs, num_classes)
        init_darknet_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H / r, W / r] (r = 32, or 8 with the small stem)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → logits Tensor[N, num_classes]."""
        return self.head(self.forward_features(x))


class TinyCSPBlock(nn.Module):
    """yolov4-tiny.cfg's CSP block: a 3×3 conv to ``chs``; its second channel half runs two 3×3 convs (half width),
    whose outputs are concatenated (second first) and fused by a 1×1 conv to ``chs`` (the *partial* output); the
    block's output is ``pool(attn(cat[conv output, partial]))``, 2·``chs`` channels at half the resolution.

    ``forward(x: Tensor[N, in_chs, H, W]) -> (Tensor[N, 2·chs, H/2, W/2], partial Tensor[N, chs, H, W])``.
    """

    def __init__(self, in_chs: int, chs: int, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.half = chs // 2
        self.conv = conv(in_chs, chs, 3)
        self.part1 = conv(chs - self.half, self.half, 3)
        self.part2 = conv(self.half, self.half, 3)
        self.fuse = conv(2 * self.half, chs, 1)
        self.attn = attn_layer(2 * chs) if attn_layer is not None else nn.Identity()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x)
        first = self.part1(x[:, self.half:])  # [route] groups=2 group_id=1: the second half of the channels
        partial_out = self.fuse(torch.cat([self.part2(first), first], dim=1))
        return self.pool(self.attn(torch.cat([x, partial_out], dim=1))), partial_out


class TinyCSPDarknet(nn.Module):
    """The trunk of yolov4-tiny.cfg as a feature module: two stride-2 3×3 convs (32, 64 channels), three
    :class:`TinyCSPBlock` (64, 128, 256), a 3×3 conv to 512. LeakyReLU(0.1) by default.

    ``forward(x: Tensor[N, in_chans, H, W]) -> [Tensor[N, 256·width, H/16, W/16], Tensor[N, 512·width, H/32, W/32]]``:
    the last block's partial output (cfg layer 23) and the last conv's (layer 26), as ``feature_info`` lists them.
    """

    def __init__(self, in_chans: int = 3, width: float = 1.0, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        act_layer = act_layer or leaky_relu
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        stem_chs = [scale_width(chs, width) for chs in _TINY_STEM_CHS]
        self.stem = nn.Sequential(conv(in_chans, stem_chs[0], 3, 2), conv(stem_chs[0], stem_chs[1], 3, 2))
        blocks, in_chs = [], stem_chs[1]
        for chs in _TINY_BLOCK_CHS:
            blocks.append(TinyCSPBlock(in_chs, scale_width(chs, width), norm_layer, act_layer, attn_layer))
            in_chs = 2 * scale_width(chs, width)
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = conv(in_chs, scale_width(_TINY_FINAL_CHS, width), 3)
        self.feature_info = FeatureInfo([
            dict(num_chs=scale_width(_TINY_BLOCK_CHS[-1], width), reduction=16, module="blocks.2.fuse"),
            dict(num_chs=scale_width(_TINY_FINAL_CHS, width), reduction=32, module="final_conv"),
        ])
        init_darknet_weights(self)
        restore_own_inits(self)  # init_darknet_weights overwrote e.g. a non-local block's zeroed norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        for block in self.blocks:
            x, partial_out = block(x)
        return [partial_out, self.final_conv(x)]


@register_model
def cspdarknet53(num_classes: int = 1000, in_chans: int = 3, image_size: int = 256, stem: str = "auto",
                 width: float = 1.0, norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None) -> CSPDarknet:
    """CSPDarknet53 (YOLOv4's backbone; csdarknet53-omega.cfg, 256 px)."""
    return CSPDarknet(num_classes=num_classes, in_chans=in_chans, width=width,
                      small_stem=use_small_stem(stem, image_size), norm_layer=norm_layer, act_layer=act_layer,
                      attn_layer=attn_layer)
