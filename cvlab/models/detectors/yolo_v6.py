"""YOLOv6-N / YOLOv6-S (v3.0).

References:
    Li et al. 2022, "YOLOv6: A Single-Stage Object Detection Framework for Industrial Applications";
    Li et al. 2023, "YOLOv6 v3.0: A Full-Scale Reloading". meituan/YOLOv6 0.3.0: ``configs/yolov6{n,s}.py``,
    ``yolov6/models/yolo.py`` (``build_network``), ``efficientrep.py``, ``reppan.py``, ``effidehead.py``,
    ``yolov6/models/losses/loss.py``.

YOLOv6 predicts at three scales (strides 8, 16, 32) with one anchor-free prediction per cell. Its parts:

- trunk: :class:`~cvlab.models.backbones.efficientrep.EfficientRep` (RepVGG blocks, SimCSPSPPF; ReLU), read at
  P2 to P5;
- neck: :class:`~cvlab.models.necks.reppan.RepBiPAN` (Rep-PAN with v3.0's BiC joins in the top-down path);
- head: :class:`~cvlab.models.heads.decoupled_head.EfficientDecoupledHead` (1×1 stem, decoupled 3×3 class and box
  branches; SiLU), distances to the box sides from each cell's centre;
- loss: :class:`~cvlab.losses.yolov6.YoloV6Loss`: TAL (topk 13, α 1, β 6), varifocal classification, SIoU boxes
  for N and GIoU for S.

Re-parameterisation: in eval mode every RepVGG block runs as the one 3×3 conv its three branches equal
(:class:`~cvlab.layers.rep.RepVGGBlock`), so validation, ``cvlab eval`` and ``cvlab predict`` run the deployed
network; :meth:`YOLOv6.fuse` (the detectors' fuse hook,
:meth:`~cvlab.models.detectors._yolo_common.YoloDetector.fuse`) makes that permanent and folds every other conv's
BatchNorm, the deployed form YOLOv6's tables count. ``rep=False`` trains the deployed form directly (plain
3×3 convs), ``bic=False`` is v2.0's neck: the ablations of the two. ``backbone=<zoo name>`` replaces the trunk (its
last four stages, three without BiC).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolov6 import YoloV6Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.efficientrep import efficientrep_features, rep_blocks
from cvlab.models.backbones.yolov5 import yolov5_depth, yolov5_width
from cvlab.models.detectors._yolo_common import YoloDetector, check_loss, yolo_backbone
from cvlab.models.heads.decoupled_head import EfficientDecoupledHead
from cvlab.models.necks.reppan import RepBiPAN
from cvlab.ops.postprocess import DetectionPostprocess

# Per variant: (depth_multiple, width_multiple, iou_type) of configs/yolov6{n,s}.py (0.3.0).
VARIANTS = {"n": (0.33, 0.25, "siou"), "s": (0.33, 0.50, "giou")}
_NECK_CHS = (256, 128, 128, 256, 256, 512)  # neck out_channels at width multiple 1
_NECK_DEPTH = 12  # RepVGG blocks of each neck RepBlock at depth multiple 1


class YOLOv6(YoloDetector):
    """YOLOv6: EfficientRep trunk, Rep-PAN neck with BiC, efficient decoupled anchor-free head on 3 scales.

    Measured by cvlab at 640 px and 80 classes; parameters as trained (the RepVGG branches, every BatchNorm) and
    deployed (:meth:`fuse`: each RepVGG block one biased 3×3 conv, every other BatchNorm folded); FLOPs = 2 ·
    multiply-adds of the deployed network (``torch.utils.flop_counter``):

    ========  ===========  ===========  ========  ==================================================
    variant   params       deployed     FLOPs     published: 0.3.0 README (M, G at 640); its summary
    ========  ===========  ===========  ========  ==================================================
    yolov6n   5,058,236    4,646,940    11.32 G   4.7 M, 11.4 G; 4.65 M, 11.40 G
    yolov6s   20,147,324   18,537,276   44.97 G   18.5 M, 45.3 G; 18.54 M, 45.28 G
    ========  ===========  ===========  ========  ==================================================

    The README rounds its evaler's model summary (thop on the deployed model, two decimals) to one decimal, so
    4,646,940 parameters are published as 4.7 M. thop counts a transposed conv's multiply-adds per output element
    (4× the true count of the neck's 2×2 stride-2 upsampling), which the summary's FLOPs include. YOLOv6's own
    deployed model has 34 parameters more: the DFL projection (``proj``, ``proj_conv``) its head keeps unused.

    Args:
        depth_multiple / width_multiple: the variant's (:data:`VARIANTS`).
        box_loss: the variant's IoU loss (``iou_type``), given to a loss that leaves it unset.
        image_size: the training input size (a multiple of 32).
        width / depth: further multipliers of the variant's multiples (1.0 = the published variant).
        backbone: None for EfficientRep, or the name of a zoo classification backbone.
        rep: RepVGG blocks (True) or plain 3×3 conv-BN-ReLU blocks in trunk and neck (ablation).
        bic: v3.0's BiC joins (True) or v2.0's upsample-and-concatenate top-down path (ablation).
        loss: a :class:`~cvlab.losses.yolov6.YoloV6Loss`; None = the variant's.
        norm_layer / act_layer / attn_layer: default YOLOv6's BatchNorm (eps 1e-3, momentum 0.03) / ReLU in trunk
            and neck, SiLU in the head / none (``attn_layer`` runs after each trunk stage's RepBlock).
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).

    Raw output (:meth:`forward_raw`): per level ``Tensor[N, 4 + C, H_l, W_l]``, the distances ``(l, t, r, b)`` in
    strides and the class logits; eval scores are the class sigmoids.
    """

    def __init__(self, depth_multiple: float, width_multiple: float, box_loss: str, num_classes: int = 80,
                 image_size: int = 640, width: float = 1.0, depth: float = 1.0, backbone: str | None = None,
                 rep: bool = True, bic: bool = True, loss: nn.Module | None = None,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None, name: str = "yolov6", **postprocess_kwargs):
        super().__init__(DetectionPostprocess(**postprocess_kwargs))
        self.loss = check_loss(loss, YoloV6Loss, "loss=yolov6", name, partial(YoloV6Loss, box_loss=box_loss))
        if self.loss.box_loss is None:
            self.loss.box_loss = box_loss
        width_multiple, depth_multiple = width_multiple * width, depth_multiple * depth
        num_levels = 4 if bic else 3
        layer_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        paper_trunk = partial(efficientrep_features, out_indices=tuple(range(-num_levels, 0)),
                              width_multiple=width_multiple, depth_multiple=depth_multiple, rep=rep, **layer_kwargs)
        self.backbone = yolo_backbone(backbone, paper_trunk, num_levels, name, image_size, **layer_kwargs)
        self.neck = RepBiPAN(self.backbone.feature_info.channels(),
                             [yolov5_width(chs, width_multiple) for chs in _NECK_CHS],
                             yolov5_depth(_NECK_DEPTH, depth_multiple), rep_blocks(rep), bic, norm_layer, act_layer)
        self.head = EfficientDecoupledHead(self.neck.out_channels, num_classes, norm_layer, act_layer)
        self.num_classes = num_classes

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tensor[N, 3, H, W] → per level Tensor[N, 4 + C, H_l, W_l] (strides 8, 16, 32)."""
        return self.head(self.neck(self.backbone(images)))

    def compute_loss(self, raw: list[torch.Tensor], targets: list[dict], image_size: tuple[int, int]):
        return self.loss(raw, targets, image_size)

    def decode(self, raw: list[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.decode(raw, image_size)


def _yolov6(variant: str, **kwargs) -> YOLOv6:
    depth_multiple, width_multiple, box_loss = VARIANTS[variant]
    return YOLOv6(depth_multiple, width_multiple, box_loss, name=f"yolov6{variant}", **kwargs)


@register_model(task="detection")
def yolov6n(**kwargs) -> YOLOv6:
    """YOLOv6-N v3.0 (depth 0.33, width 0.25; SIoU)."""
    return _yolov6("n", **kwargs)


@register_model(task="detection")
def yolov6s(**kwargs) -> YOLOv6:
    """YOLOv6-S v3.0 (depth 0.33, width 0.50; GIoU)."""
    return _yolov6("s", **kwargs)
