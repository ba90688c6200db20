"""BiSeNet V1.

Paper: Yu, Wang, Peng, Gao, Yu & Sang 2018, "BiSeNet: Bilateral Segmentation Network for Real-time Semantic
Segmentation".

Two paths meet in a feature fusion module:

- **Spatial path**: three stride-2 conv-BN-ReLU layers keep a wide, 1/8-resolution map of spatial detail. Layout of
  the authors' code (TorchSeg) and of MMSegmentation's ``SpatialPath``: 7×7 (64), 3×3 (64), 3×3 (64), all stride
  2, then a 1×1 conv-BN-ReLU to 128 channels.
- **Context path**: a fast backbone (ResNet-18) down to 1/32. An attention refinement module (ARM: 3×3 conv-BN-ReLU to
  128, then re-weighting by ``sigmoid(BN(conv1×1(global pool)))``) refines the 1/16 and the 1/32 map; a global-pool
  branch (pool → 1×1 conv-BN-ReLU) is added to the refined 1/32 map, which is upsampled (nearest) to 1/16, passed
  through a 3×3 conv-BN-ReLU and added to the refined 1/16 map; that sum is upsampled to the spatial path's size and
  through another 3×3 conv-BN-ReLU.
- **Feature fusion module** (FFM): concatenate the spatial path and the 1/8 context, 1×1 conv-BN-ReLU to 256, then
  ``x + x · sigmoid(ReLU(BN(conv1×1(global pool(x)))))``.
- **Heads**: the decode head (3×3 conv-BN-ReLU 256 → 256, dropout, 1×1 to the classes) on the FFM output, and in
  training two auxiliary heads (128 → 64 → classes) on the two context outputs (1/8 and 1/16), each with its loss
  weight (the paper's α = 1).

Where the paper's figure and the code differ, this follows the code of MMSegmentation (``bisenetv1.py`` and
``configs/_base_/models/bisenetv1_r18-d32.py``), which follows the authors': the ARM has a 3×3 conv before its
attention, the FFM's attention is one 1×1 conv-BN-ReLU (the paper draws two 1×1 convs without BN), the spatial path
ends in a 1×1 conv to 128. So the parameter counts equal MMSegmentation's (see :class:`BiSeNet`).

The context backbone is any zoo classification model (``backbone=``); its last two stages play the 1/16 and 1/32
maps. ResNet-18 with ``stem="standard"`` is exactly MMSegmentation's ``ResNet`` (depth 18, style pytorch).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.heads.segmentation import FCNHead, init_decode_head_
from cvlab.models.segmentors import Segmentor, loss_weights, segmentation_backbone

_SPATIAL_CHS = 64
_SPATIAL_OUT_CHS = 128
_CONTEXT_CHS = 128
_FUSION_CHS = 256
_AUX_HIDDEN_CHS = 64
# MMSegmentation's bisenetv1_r18-d32 (and the paper's alpha = 1): each auxiliary loss weighs as much as the main one.
_AUX_WEIGHTS = (1.0, 1.0)


def _pooled_gate(chs: int, norm_layer: NormFactory | None, act_layer: ActFactory | None) -> nn.Sequential:
    """Global average pool → 1×1 conv (no bias) → norm (→ act) → sigmoid: ``Tensor[N, C, H, W] → Tensor[N, C, 1, 1]``
    weights in (0, 1), one per channel."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(chs, chs, 1, norm_layer=norm_layer, act_layer=act_layer),
                         nn.Sigmoid())


class SpatialPath(nn.Sequential):
    """Stride-2 7×7, 3×3, 3×3 conv-norm-act to 64 channels, then 1×1 to 128:
    ``Tensor[N, in_chans, H, W] → Tensor[N, 128, H/8, W/8]`` (sides rounded up)."""

    def __init__(self, in_chans: int, norm_layer: NormFactory | None, act_layer: ActFactory):
        conv = dict(norm_layer=norm_layer, act_layer=act_layer, bias=None)
        super().__init__(
            ConvNormAct(in_chans, _SPATIAL_CHS, 7, stride=2, **conv),
            ConvNormAct(_SPATIAL_CHS, _SPATIAL_CHS, 3, stride=2, **conv),
            ConvNormAct(_SPATIAL_CHS, _SPATIAL_CHS, 3, stride=2, **conv),
            ConvNormAct(_SPATIAL_CHS, _SPATIAL_OUT_CHS, 1, **conv),
        )


class AttentionRefinement(nn.Module):
    """ARM: 3×3 conv-norm-act ``in_chs → out_chs``, then ``x · gate(x)`` with a pooled 1×1 conv-norm gate (no act).
    ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: NormFactory | None, act_layer: ActFactory):
        super().__init__()
        self.conv = ConvNormAct(in_chs, out_chs, 3, norm_layer=norm_layer, act_layer=act_layer, bias=None)
        self.gate = _pooled_gate(out_chs, norm_layer, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.gate(x)


class ContextPath(nn.Module):
    """Backbone (its last two stages, the 1/16 and 1/32 maps), an ARM on each, the global-pool branch and the two
    3×3 refinement convs. ``forward(x, size) -> (Tensor[N, 128, *size], Tensor[N, 128, H/16, W/16])``: the context
    at the spatial path's ``size`` (1/8, for the FFM and an auxiliary head) and at 1/16 (the other auxiliary head).
    """

    def __init__(self, backbone: nn.Module, norm_layer: NormFactory | None, act_layer: ActFactory):
        super().__init__()
        self.backbone = backbone
        chs16, chs32 = backbone.feature_info.channels()
        conv = dict(norm_layer=norm_layer, act_layer=act_layer, bias=None)
        self.arm16 = AttentionRefinement(chs16, _CONTEXT_CHS, norm_layer, act_layer)
        self.arm32 = AttentionRefinement(chs32, _CONTEXT_CHS, norm_layer, act_layer)
        self.refine32 = ConvNormAct(_CONTEXT_CHS, _CONTEXT_CHS, 3, **conv)
        self.refine16 = ConvNormAct(_CONTEXT_CHS, _CONTEXT_CHS, 3, **conv)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(chs32, _CONTEXT_CHS, 1, **conv))
        for child in self.children():
            if child is not backbone:  # the backbone keeps its own init
                init_decode_head_(child)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x16, x32 = self.backbone(x)
        x32 = self.arm32(x32) + self.global_context(x32)
        context16 = self.refine32(F.interpolate(x32, size=x16.shape[-2:], mode="nearest"))
        x16 = self.arm16(x16) + context16
        context8 = self.refine16(F.interpolate(x16, size=tuple(size), mode="nearest"))
        return context8, context16


class FeatureFusion(nn.Module):
    """FFM: ``x = conv-norm-act1×1([spatial; context])``, then ``x + x · gate(x)`` (pooled 1×1 conv-norm-act gate).
    ``(Tensor[N, C_s, h, w], Tensor[N, C_c, h, w]) → Tensor[N, out_chs, h, w]``."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: NormFactory | None, act_layer: ActFactory):
        super().__init__()
        self.conv = ConvNormAct(in_chs, out_chs, 1, norm_layer=norm_layer, act_layer=act_layer, bias=None)
        self.gate = _pooled_gate(out_chs, norm_layer, act_layer)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([spatial, context], dim=1))
        return x + x * self.gate(x)


class BiSeNet(Segmentor):
    """BiSeNet V1: spatial path + context path → FFM → decode head; two auxiliary heads in training.

    Parameters at 19 classes (Cityscapes), ResNet-18 context path, BatchNorm; FLOPs (2 · multiply-adds of one eval
    forward at 256 × 512, which never runs the auxiliary heads, ``torch.utils.flop_counter``): 14.79 G for both.

    ========================  ===========  ==================================================
    variant                   params       MMSegmentation bisenetv1_r18-d32
    ========================  ===========  ==================================================
    with auxiliary heads      13,425,721   13,425,721 (backbone + decode head + 2 aux heads)
    ``aux_heads=False``       13,275,539   13,275,539 (backbone + decode head)
    ========================  ===========  ==================================================

    (ResNet-18 trunk 11,176,512; spatial path 91,968; ARMs, refinement convs and global branch 1,279,744; FFM 132,096;
    decode head 595,219; each auxiliary head 75,091.)

    Args:
        backbone: the context path's zoo classification model (default ``resnet18``); its last two stages are the
            1/16 and 1/32 maps.
        stem: the backbone's ``stem`` option; ``"standard"`` (the paper's ResNet-18, stride 4 before layer1) by
            default, None to leave the backbone its own (a ViT has none).
        aux_heads: build the two auxiliary heads (training only; eval never runs them).
        aux_weights: the loss weight of each auxiliary head (1/8 context, 1/16 context).
        norm_layer / act_layer / attn_layer: default BatchNorm2d / ReLU / none, in every conv of the model and the
            backbone (``attn_layer`` goes to the backbone's blocks).

    Init: the backbone its own; the rest MMSegmentation's (Kaiming-normal fan_out convs, classifiers N(0, 0.01²)).
    """

    def __init__(self, num_classes: int = 19, in_chans: int = 3, image_size: int = 1024, backbone: str = "resnet18",
                 stem: str | None = "standard", aux_heads: bool = True,
                 aux_weights: Sequence[float] = _AUX_WEIGHTS, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        trunk = segmentation_backbone(backbone, "bisenet", (-2, -1), in_chans, image_size, norm_layer, act_layer,
                                      attn_layer, stem=stem)
        head_act = act_layer or nn.ReLU
        self.spatial_path = SpatialPath(in_chans, norm_layer, head_act)
        self.context_path = ContextPath(trunk, norm_layer, head_act)
        self.ffm = FeatureFusion(_SPATIAL_OUT_CHS + _CONTEXT_CHS, _FUSION_CHS, norm_layer, head_act)
        self.decode_head = FCNHead(_FUSION_CHS, _FUSION_CHS, num_classes, norm_layer, head_act)
        self.aux_heads = nn.ModuleList(
            FCNHead(_CONTEXT_CHS, _AUX_HIDDEN_CHS, num_classes, norm_layer, head_act)
            for _ in range(len(_AUX_WEIGHTS) if aux_heads else 0)
        )
        self.aux_weights = loss_weights(aux_weights, len(_AUX_WEIGHTS), "bisenet's aux_weights") if aux_heads else ()
        for part in (self.spatial_path, self.ffm, self.decode_head, self.aux_heads):  # the context path inits itself
            init_decode_head_(part)

    def forward_logits(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spatial = self.spatial_path(images)
        context8, context16 = self.context_path(images, spatial.shape[-2:])
        logits = self.decode_head(self.ffm(spatial, context8))
        aux = [head(context) for head, context in zip(self.aux_heads, (context8, context16))] if with_aux else []
        return logits, aux


@register_model(task="segmentation")
def bisenet(num_classes: int = 19, in_chans: int = 3, image_size: int = 1024, backbone: str = "resnet18",
            stem: str | None = "standard", aux_heads: bool = True, aux_weights: Sequence[float] = _AUX_WEIGHTS,
            norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
            attn_layer: AttnFactory | None = None) -> BiSeNet:
    """BiSeNet V1 (Yu et al. 2018), MMSegmentation's bisenetv1_r18-d32 layout: ResNet-18 context path (or
    ``backbone``), spatial path, ARM, FFM, two auxiliary heads."""
    return BiSeNet(num_classes, in_chans, image_size, backbone, stem, aux_heads, aux_weights, norm_layer, act_layer,
                   attn_layer)
