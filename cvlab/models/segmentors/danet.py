"""DANet.

Paper: Fu, Liu, Tian, Li, Bao, Fang & Lu 2019, "Dual Attention Network for Scene Segmentation".

A dilated ResNet at output stride 8 (the zoo's ``output_stride=8``: layer3 and layer4 trade their stride for
dilation 2 and 4) feeds the DANet head, two parallel branches on its last map (2048 channels):

- **position attention** (PAM): 3×3 conv-BN-ReLU to 512, self-attention over all positions (query / key 1×1 convs to
  512 / 8 = 64, value 1×1 conv 512 → 512, ``x + γ · attention``, γ starting at 0:
  :class:`~cvlab.layers.attention.PositionAttention`), 3×3 conv-BN-ReLU;
- **channel attention** (CAM): 3×3 conv-BN-ReLU to 512, attention between the channel maps
  (``x + γ · softmax(max(E) − E) · x`` with ``E = x xᵀ``, γ starting at 0, no projections:
  :class:`~cvlab.layers.attention.ChannelAttention`), 3×3 conv-BN-ReLU;
- **fusion**: the two branch outputs are summed and classified (dropout 0.1, 1×1 conv).

Three outputs, each with a loss: the fused one (the prediction) and, in training, each branch classified on its own.
An auxiliary FCN head on stage 3 (1024 → 256 → classes, loss weight 0.4) helps optimise the backbone, as in
MMSegmentation's danet configs. The head's widths follow the backbone: ``C / 4`` (2048 → 512) in the branches,
``C3 / 4`` (1024 → 256) in the auxiliary head, the ratios of the paper's code and of MMSegmentation's ``DAHead``
(``channels=512, pam_channels=64``).

MMSegmentation's DANet uses ResNetV1c (a deep 3×3 stem: :func:`~cvlab.models.backbones.resnet.ResNet`'s
``stem="deep"``), which is this model's default, so its parameter count is exactly MMSegmentation's.
"""
from __future__ import annotations

import torch
from torch import nn

from cvlab.layers.attention import ChannelAttention, PositionAttention
from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.heads.segmentation import FCNHead, SegmentationClassifier, init_decode_head_
from cvlab.models.segmentors import Segmentor, segmentation_backbone

# The head narrows the backbone's last map (and the auxiliary head stage 3's) by 4: 2048 → 512, 1024 → 256.
_HEAD_REDUCTION = 4
# PAM's query / key width: C / 8 (512 → 64, MMSegmentation's pam_channels=64).
_PAM_REDUCTION = 8
# Loss weights: each attention branch's own prediction weighs as much as the fused one (MMSegmentation, the paper's
# code); the auxiliary FCN head 0.4.
_BRANCH_WEIGHT = 1.0
_AUX_WEIGHT = 0.4


class DAHead(nn.Module):
    """The dual attention head: PAM and CAM branches (conv → attention → conv each), summed and classified.

    ``forward(x: Tensor[N, in_chs, h, w], with_branches) -> (Tensor[N, num_classes, h, w], [PAM logits, CAM logits])``
    (the branch logits only when ``with_branches``). At 2048 → 512 channels and 19 classes: 23,954,619 parameters.
    """

    def __init__(self, in_chs: int, chs: int, num_classes: int, norm_layer: NormFactory | None,
                 act_layer: ActFactory):
        super().__init__()
        conv = dict(norm_layer=norm_layer, act_layer=act_layer, bias=None)
        self.pam_in = ConvNormAct(in_chs, chs, 3, **conv)
        self.pam = PositionAttention(chs, reduction=_PAM_REDUCTION)
        self.pam_out = ConvNormAct(chs, chs, 3, **conv)
        self.pam_classifier = SegmentationClassifier(chs, num_classes)
        self.cam_in = ConvNormAct(in_chs, chs, 3, **conv)
        self.cam = ChannelAttention(chs)
        self.cam_out = ConvNormAct(chs, chs, 3, **conv)
        self.cam_classifier = SegmentationClassifier(chs, num_classes)
        self.classifier = SegmentationClassifier(chs, num_classes)

    def forward(self, x: torch.Tensor, with_branches: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        position = self.pam_out(self.pam(self.pam_in(x)))
        channel = self.cam_out(self.cam(self.cam_in(x)))
        logits = self.classifier(position + channel)
        branches = [self.pam_classifier(position), self.cam_classifier(channel)] if with_branches else []
        return logits, branches


class DANet(Segmentor):
    """DANet: dilated backbone (output stride 8) → DAHead; PAM, CAM and auxiliary FCN outputs in training.

    Parameters at 19 classes, BatchNorm, with the auxiliary head (``aux_head=False``: minus 2,364,691); FLOPs
    (2 · multiply-adds of one eval forward at 256 × 512, ``torch.utils.flop_counter``, on the meta device: on CPU
    tensors the counter misses the channel attention's fused attention kernel):

    ======================================  ===========  ========  ===================================================
    variant                                 params       FLOPs     MMSegmentation
    ======================================  ===========  ========  ===================================================
    ``backbone=resnet101`` (deep stem)      68,838,702   283.50 G  danet_r101-d8: 68,838,702 (ResNetV1c-101 + DAHead
                                                                   + auxiliary FCNHead)
    ``backbone=resnet50`` (deep stem)       49,846,574   205.92 G  danet_r50-d8: the same layout
    ``backbone=resnet101, stem=standard``   68,819,470             (−19,232: one 7×7 conv instead of three 3×3)
    ``backbone=resnet18`` (conf, 6 classes) 12,842,266   56.85 G   (cvlab's CPU default)
    ======================================  ===========  ========  ===================================================

    (ResNetV1c-101 trunk 42,519,392; DAHead 23,954,619; auxiliary head 2,364,691.)

    Args:
        backbone: zoo classification model (default ``resnet50``; the paper's main results use ``resnet101``); its
            last two stages are stage 3 (auxiliary head) and stage 4 (DAHead).
        stem: the backbone's ``stem`` option, default ``"deep"`` (ResNetV1c, as MMSegmentation); None leaves the
            backbone its own.
        output_stride: the backbone's ``output_stride`` (8, the paper's; None leaves the backbone its own).
        aux_head: build the auxiliary FCN head on stage 3 (training only).
        aux_weight: its loss weight (0.4).
        norm_layer / act_layer / attn_layer: default BatchNorm2d / ReLU / none, everywhere (``attn_layer`` goes to
            the backbone's blocks; the head has its own attention).

    ``aux_weights``: (PAM, CAM[, auxiliary FCN]) = (1.0, 1.0[, 0.4]). Init: the backbone its own; the heads
    MMSegmentation's (Kaiming-normal fan_out convs, classifiers N(0, 0.01²), γ = 0).
    """

    def __init__(self, num_classes: int = 19, in_chans: int = 3, image_size: int = 512, backbone: str = "resnet50",
                 stem: str | None = "deep", output_stride: int | None = 8, aux_head: bool = True,
                 aux_weight: float = _AUX_WEIGHT, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        self.backbone = segmentation_backbone(backbone, "danet", (-2, -1), in_chans, image_size, norm_layer,
                                              act_layer, attn_layer, stem=stem, output_stride=output_stride)
        stage3_chs, stage4_chs = self.backbone.feature_info.channels()
        head_act = act_layer or nn.ReLU
        self.decode_head = DAHead(stage4_chs, stage4_chs // _HEAD_REDUCTION, num_classes, norm_layer, head_act)
        self.aux_head = (FCNHead(stage3_chs, stage3_chs // _HEAD_REDUCTION, num_classes, norm_layer, head_act)
                         if aux_head else None)
        self.aux_weights = (_BRANCH_WEIGHT, _BRANCH_WEIGHT) + ((float(aux_weight),) if aux_head else ())
        for part in (self.decode_head, self.aux_head):
            if part is not None:
                init_decode_head_(part)

    def forward_logits(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stage3, stage4 = self.backbone(images)
        logits, aux = self.decode_head(stage4, with_branches=with_aux)
        if with_aux and self.aux_head is not None:
            aux.append(self.aux_head(stage3))
        return logits, aux


@register_model(task="segmentation")
def danet(num_classes: int = 19, in_chans: int = 3, image_size: int = 512, backbone: str = "resnet50",
          stem: str | None = "deep", output_stride: int | None = 8, aux_head: bool = True,
          aux_weight: float = _AUX_WEIGHT, norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
          attn_layer: AttnFactory | None = None) -> DANet:
    """DANet (Fu et al. 2019), MMSegmentation's danet_r*-d8 layout: dilated ResNetV1c-50 (or ``backbone``) at output
    stride 8, position and channel attention branches, auxiliary FCN head."""
    return DANet(num_classes, in_chans, image_size, backbone, stem, output_stride, aux_head, aux_weight, norm_layer,
                 act_layer, attn_layer)
