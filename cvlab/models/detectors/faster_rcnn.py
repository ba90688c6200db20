"""Faster R-CNN: a Region Proposal Network on the detector's own features replaces selective search.

Papers:
    Ren, He, Girshick & Sun 2015, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks"
    (NeurIPS; the RPN shares the conv features with the Fast R-CNN detector, so proposals cost almost nothing).
    Lin, Dollár, Girshick, He, Hariharan & Belongie 2017, "Feature Pyramid Networks for Object Detection" (CVPR; the
    RPN and the RoI head on a feature pyramid, RoIs pooled from the level matching their size).

Layout: zoo backbone (``levels`` of it) → optional :class:`~cvlab.models.necks.fpn.FPN` (with P6 for the RPN) →
:class:`~cvlab.models.heads.rpn.RegionProposalNetwork` (3×3 conv + sibling 1×1 convs, the same on every level) →
:class:`~cvlab.models.heads.roi_heads.RoIHeads` (RoIAlign, or RoI pooling with ``roi="pool"``, 7×7; two FC;
softmax over K + 1 classes and per-class box regression). Training: RPN anchors IoU ≥ 0.7 positive (and each
object's best), < 0.3 negative, 256 per image at half positive; NMS 0.7 and 2000 / 1000 proposals in training /
test; box head 512 RoIs per image at 25 % foreground (IoU ≥ 0.5), box-coder weights (10, 10, 5, 5). Images come in
[0, 1] and are normalised inside with ImageNet's mean and std.

The defaults of :func:`faster_rcnn` are torchvision's ``fasterrcnn_resnet50_fpn``, and its weights load through
:func:`from_torchvision_state_dict` and give the same detections (``tests/models/test_faster_rcnn_parity.py``);
``conf/model/faster_rcnn.yaml`` holds the small recipe for 128 px inputs on a CPU.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.detectors.fast_rcnn import TwoStageDetector, box_roi_heads, detection_trunk
from cvlab.models.heads.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from cvlab.models.necks.fpn import FPN
from cvlab.utils.errors import UserError

# torchvision's fasterrcnn_resnet50_fpn: one anchor size per pyramid level (P2..P6), three ratios.
_FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
# The paper's single map: 3 scales × 3 ratios (§3.1.1).
_PAPER_ANCHOR_SIZES = ((128, 256, 512),)


class FasterRCNN(TwoStageDetector):
    """Faster R-CNN on any zoo backbone, with or without FPN.

    Measured by cvlab at 91 classes with background (torchvision's COCO head), ``torch.nn.Module.parameters``:

    ==========================================================  ===========  ===========  ======================
    variant                                                     params       BatchNorm    torchvision
    ==========================================================  ===========  ===========  ======================
    ``faster_rcnn()``: ResNet-50 + FPN                          41,808,406   trainable    fasterrcnn_resnet50_fpn
    ``faster_rcnn()``: ResNet-50 + FPN                          41,755,286   frozen       41,755,286 (its docs)
    MobileNetV3-Large + FPN (levels ``features.13``,            19,410,754   trainable    fasterrcnn_mobilenet_v3
    ``features.16``; 5 anchor sizes × 3 ratios per level)                                 _large_fpn
    MobileNetV3-Large + FPN, as above                           19,386,354   frozen       19,386,354 (its docs)
    ==========================================================  ===========  ===========  ======================

    "Frozen" is ``norm_layer=torchvision.ops.FrozenBatchNorm2d`` (affine and statistics fixed buffers, as in
    torchvision's pretrained detectors); torchvision's own builders use a trainable ``nn.BatchNorm2d`` (eps 1e-5,
    also in the MobileNet) when given no pretrained weights.

    ``model=faster_rcnn`` (``conf/model/faster_rcnn.yaml``, the recipe for 128 px inputs on a CPU: MobileNetV3-Large
    levels of stride 8, 16 and 32, FPN 32 channels, no P6, 3 × 3 anchors per level, FC 128, 5 classes): 3,267,323
    parameters, 0.60 GFLOPs a 128 px image in eval with its 1000 proposals (``cvlab info model=faster_rcnn``);
    3,267,194 with ``model.box_focal_gamma=2`` (the focal classifier has no background logit: 128 + 1 fewer). The
    RPN's focal loss (``rpn_focal_gamma``) changes no parameter.

    Args:
        num_classes: foreground classes K (the classifier has K + 1 outputs, background first).
        image_size: the input size the backbone is built for (its ``stem="auto"``, a ViT's grid); any input size
            works at run time.
        backbone / levels: the zoo classification model and the maps it gives, finest first: indices into its
            ``feature_info`` (default its last four stages: ResNet's layer1..layer4, C2..C5) or module names.
        backbone_args: the backbone's own options; None: ``{"stem": "standard"}`` (stride 4 before the first
            stage); ``{}`` for a backbone without a stem (vit_*).
        fpn: put an FPN of ``fpn_channels`` on the levels (P6 added for the RPN with ``extra_pool``); without it
            there must be one level, and the RPN and RoI head read it directly (the paper's layout).
        anchor_sizes: per RPN level (the levels, plus P6), the anchor sizes in input pixels; None: torchvision's
            32..512 one per level with FPN, the paper's (128, 256, 512) without. ``aspect_ratios`` (h / w) are used
            at every level; ``anchor_offset`` 0 centres anchors on cell corners (torchvision), 0.5 on cell centres.
        rpn_*: the RPN's matching, sampling and proposal selection (:class:`RegionProposalNetwork`);
            ``rpn_pre_nms_top_n`` / ``rpn_post_nms_top_n`` are ``(train, test)``; ``rpn_focal_gamma`` /
            ``rpn_focal_alpha``: a number scores the objectness with the sigmoid focal loss instead of the BCE.
        roi / roi_output_size / sampling_ratio: ``"align"`` (RoIAlign) or ``"pool"`` (RoI max pooling), 7×7.
        representation_size / width: the two FC layers' width; ``width`` also scales ``fpn_channels``.
        box_*: the box head's sampling (512 RoIs, 25 % foreground at IoU ≥ 0.5, background below ``box_bg_iou``),
            smooth-L1 β, and post-processing (score 0.05, per-class NMS 0.5, 100 detections); ``box_ohem_rois``
            > 0: online hard example mining in place of that sampling, the ``box_ohem_rois`` RoIs of highest loss
            per image after NMS at ``box_ohem_nms`` (:class:`~cvlab.models.heads.roi_heads.RoIHeads`);
            ``box_focal_gamma`` / ``box_focal_alpha``: a number makes the classifier K sigmoid outputs (the background
            all of them 0, RetinaNet's form) trained with the sigmoid focal loss, each detection scored by its class's
            sigmoid; None: the softmax over K + 1.
        norm_layer / act_layer / attn_layer: the backbone's; act_layer also the heads' (default ReLU). The FPN
            has no norm and no activation, as in the paper.
    """

    def __init__(self, num_classes: int = 90, image_size: int = 800, backbone: str = "resnet50",
                 levels: Sequence[int | str] = (-4, -3, -2, -1), backbone_args: Mapping[str, Any] | None = None,
                 fpn: bool = True,                 fpn_channels: int = 256, extra_pool: bool = True,
                 anchor_sizes: Sequence[Sequence[float]] | None = None,
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), anchor_offset: float = 0.0,
                 rpn_fg_iou: float = 0.7, rpn_bg_iou: float = 0.3, rpn_batch_size_per_image: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_pre_nms_top_n: Sequence[int] = (2000, 1000),
                 rpn_post_nms_top_n: Sequence[int] = (2000, 1000), rpn_nms_thresh: float = 0.7,
                 rpn_score_thresh: float = 0.0, rpn_focal_gamma: float | None = None,
                 rpn_focal_alpha: float | None = 0.25, roi: str = "align", roi_output_size: int = 7,
                 sampling_ratio: int = 2,
                 representation_size: int = 1024, width: float = 1.0, box_batch_size_per_image: int = 512,
                 box_positive_fraction: float = 0.25, box_fg_iou: float = 0.5, box_bg_iou: float = 0.5,
                 box_loss_beta: float = 1.0 / 9, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                 box_detections_per_img: int = 100, box_ohem_rois: int = 0, box_ohem_nms: float = 0.7,
                 box_focal_gamma: float | None = None, box_focal_alpha: float | None = 0.25,
                 norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        trunk = detection_trunk(backbone, levels, "faster_rcnn", image_size, norm_layer, act_layer, attn_layer,
                                backbone_args)
        channels, reductions = trunk.feature_info.channels(), trunk.feature_info.reductions()
        if fpn:
            neck = FPN(channels, round(fpn_channels * width), extra_pool)
            level_chs, rpn_reductions = neck.out_channels, neck.reductions(reductions)
        elif len(channels) == 1:
            neck, level_chs, rpn_reductions = nn.Identity(), channels[0], reductions
        else:
            raise UserError(f"faster_rcnn without an FPN reads one backbone level, got levels={list(levels)}; "
                            "give one (e.g. model.levels=[-2]) or set model.fpn=true.")
        if anchor_sizes is None:
            anchor_sizes = _FPN_ANCHOR_SIZES if fpn else _PAPER_ANCHOR_SIZES
        if len(anchor_sizes) != len(rpn_reductions):
            raise UserError(f"faster_rcnn's anchor_sizes list {len(anchor_sizes)} levels, but its RPN reads "
                            f"{len(rpn_reductions)} (strides {rpn_reductions}); give one list of sizes per level.")
        anchors = AnchorGenerator(anchor_sizes, aspect_ratios, anchor_offset)
        if len(set(anchors.num_anchors_per_location())) != 1:
            raise UserError(f"faster_rcnn's RPN head is shared by every level, so each needs as many anchors; "
                            f"anchor_sizes {[list(s) for s in anchor_sizes]} differ in length.")
        rpn = RegionProposalNetwork(
            anchors, RPNHead(level_chs, anchors.num_anchors_per_location()[0], act_layer), rpn_fg_iou, rpn_bg_iou,
            rpn_batch_size_per_image, rpn_positive_fraction, rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_thresh,
            rpn_score_thresh, focal_gamma=rpn_focal_gamma, focal_alpha=rpn_focal_alpha,
        )
        roi_heads = box_roi_heads(
            num_classes, level_chs, reductions, roi, roi_output_size, sampling_ratio,
            round(representation_size * width), act_layer, "faster_rcnn", fg_iou=box_fg_iou, bg_iou=(0.0, box_bg_iou),
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            box_loss_beta=box_loss_beta, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img, ohem_rois=box_ohem_rois, ohem_nms=box_ohem_nms,
            focal_gamma=box_focal_gamma, focal_alpha=box_focal_alpha,
        )
        super().__init__(trunk, neck, roi_heads)
        self.rpn = rpn

    def propose(self, images, levels, image_size, targets, proposals):
        if proposals is not None:
            raise ValueError("faster_rcnn proposes its own regions (RPN); it takes no proposals")
        return self.rpn(levels, image_size, targets)


def from_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor], model: FasterRCNN) -> dict[str, torch.Tensor]:
    """torchvision's ``FasterRCNN`` state dict under ``model``'s keys (load it with ``strict=True``).

    ``backbone.body.*`` → ``backbone.*`` (torchvision's ResNet body keeps the ResNet's names, its MobileNet body is
    the ``features`` sequence: ``backbone.features.*``), ``backbone.fpn.*`` → ``neck.*``, ``rpn.head.conv.0.0.*`` →
    ``rpn.head.conv.*``; the RoI head's keys are the same. ``model`` must have torchvision's layout (backbone,
    levels, FPN, anchors per location, classes).
    """
    body = "backbone.features." if hasattr(model.backbone, "features") else "backbone."
    renames = (("backbone.body.", body), ("backbone.fpn.", "neck."), ("rpn.head.conv.0.0.", "rpn.head.conv."))
    mapped = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        mapped[key] = value
    return mapped


@register_model(task="detection")
def faster_rcnn(num_classes: int = 90, image_size: int = 800, backbone: str = "resnet50", **kwargs) -> FasterRCNN:
    """Faster R-CNN (Ren et al. 2015) with FPN (Lin et al. 2017): torchvision's ``fasterrcnn_resnet50_fpn`` layout
    by default, on any zoo backbone."""
    return FasterRCNN(num_classes, image_size, backbone, **kwargs)
