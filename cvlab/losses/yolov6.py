"""YOLOv6's loss (v3.0, the N and S models): task-aligned assignment, varifocal classification, SIoU / GIoU boxes.

Papers:
    Li et al. 2022, "YOLOv6: A Single-Stage Object Detection Framework for Industrial Applications" (§2.3: TAL,
    VariFocal loss, SIoU for the small models and GIoU for the larger).
    Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object Detector" (eq. 2: the varifocal loss).
    Gevorgyan 2022, "SIoU Loss: More Powerful Learning for Bounding Box Regression" (angle, distance and shape costs).
    Rezatofighi et al. 2019, "Generalized Intersection over Union" (GIoU).
    meituan/YOLOv6 0.3.0: ``yolov6/models/losses/loss.py`` (``ComputeLoss``, ``VarifocalLoss``, ``BboxLoss``),
    ``yolov6/utils/figure_iou.py`` (``IOUloss``), ``configs/yolov6{n,s}.py`` (``iou_type`` siou / giou,
    ``atss_warmup_epoch=0``, ``use_dfl=False``).

What v3.0's N and S train with, and what is left out:

- assignment: :class:`~cvlab.ops.assigners.TaskAlignedAssigner` (topk 13, α 1, β 6) from the first epoch: their
  configs set ``atss_warmup_epoch=0``, so the ATSS warm-up assigner of YOLOv6's code never runs for them;
- classification: the varifocal loss on the class sigmoids against TAL's soft targets ``q``,
  ``Σ BCE(p, q) · w`` with ``w = q`` at the assigned class of a positive and ``w = α·p^γ`` elsewhere (α 0.75,
  γ 2; ``w`` keeps its gradient, as in YOLOv6), divided by ``Σ q``; ``cls_loss="bce"`` drops the weight ``w``
  (ablation);
- boxes: ``1 − SIoU`` (N) or GIoU loss (S, ``torchvision.ops.generalized_box_iou_loss``) of each positive's decoded
  box with its object's, weighted by ``Σ_c q`` and divided by ``Σ q``;
- total: ``loss_cls`` (weight 1) + ``loss_box`` (weight 2.5), the ``loss_weight`` of ``ComputeLoss``;
- no DFL (``use_dfl=False, reg_max=0`` for N and S: v3.0 uses it only for self-distillation and M / L), and no
  anchor-aided training (v3.0's ``--fuse_ab`` auxiliary anchor-based branch, a training-only head).

SIoU is not in torchvision and is written here (:func:`siou_loss`); the BCE is ``F.binary_cross_entropy_with_logits``
(the class logits, for stability under mixed precision), GIoU and CIoU torchvision's.

``forward(levels: list[Tensor[N, 4 + C, H_l, W_l]], targets, image_size) -> dict(loss_cls, loss_box)``: the
detector's raw levels (:class:`~cvlab.models.heads.decoupled_head.EfficientDecoupledHead`) and the detection
contract's targets.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

from cvlab.losses.yolo import check_box_loss
from cvlab.ops.assigners import TaskAlignedAssigner
from cvlab.ops.postprocess import decode_distance_boxes, flatten_levels, grid_points

BOX_LOSSES = ("siou", "giou", "ciou")
CLASS_LOSSES = ("varifocal", "bce")


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, labels: torch.Tensor, alpha: float = 0.75,
                   gamma: float = 2.0, weighted: bool = True) -> torch.Tensor:
    """YOLOv6's ``VarifocalLoss``, summed: ``Σ BCE(p, q) · (α·p^γ·(1 − y) + q·y)`` with ``p = σ(logits)``, ``q`` the
    soft targets and ``y`` the one-hot assigned classes of the positives (all ``Tensor[..., C]``); ``weighted=False``
    is the plain BCE sum."""
    bce = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")
    if not weighted:
        return bce.sum()
    weight = alpha * logits.sigmoid().pow(gamma) * (1 - labels) + target_scores * labels
    return (bce * weight).sum()


def siou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``1 − IoU + (Δ + Ω) / 2`` of corresponding boxes ``Tensor[..., 4]`` xyxy → ``Tensor[...]`` (Gevorgyan 2022,
    in YOLOv6's ``IOUloss(iou_type="siou")`` form):

    - angle cost ``Λ = sin(2α)``, ``α`` the angle of the centres' offset to the nearer axis (``sin α`` is the smaller
      of ``|Δx| / σ`` and ``|Δy| / σ``, ``σ`` the centres' distance);
    - distance cost ``Δ = Σ_{x, y} 1 − exp(−(2 − Λ)·ρ)``, ``ρ_x = (Δx / c_w)²``, ``ρ_y = (Δy / c_h)²`` with ``c``
      the enclosing box's width and height;
    - shape cost ``Ω = Σ_{w, h} (1 − exp(−ω))⁴``, ``ω_w = |w₁ − w₂| / max(w₁, w₂)``.
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    u1, v1, u2, v2 = boxes2.unbind(-1)
    w1, h1 = x2 - x1, y2 - y1 + eps
    w2, h2 = u2 - u1, v2 - v1 + eps
    inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * (
        torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    enclosing_w = torch.maximum(x2, u2) - torch.minimum(x1, u1)
    enclosing_h = torch.maximum(y2, v2) - torch.minimum(y1, v1)
    dx = (u1 + u2 - x1 - x2) / 2 + eps
    dy = (v1 + v2 - y1 - y2) / 2 + eps
    distance = torch.sqrt(dx.square() + dy.square())
    sin_x, sin_y = dx.abs() / distance, dy.abs() / distance
    sin_alpha = torch.where(sin_x > math.sqrt(0.5), sin_y, sin_x)
    angle_cost = torch.sin(2 * torch.arcsin(sin_alpha))
    gamma = 2 - angle_cost
    distance_cost = (2 - torch.exp(-gamma * (dx / enclosing_w).square())
                     - torch.exp(-gamma * (dy / enclosing_h).square()))
    omega_w = (w1 - w2).abs() / torch.maximum(w1, w2)
    omega_h = (h1 - h2).abs() / torch.maximum(h1, h2)
    shape_cost = (1 - torch.exp(-omega_w)).pow(4) + (1 - torch.exp(-omega_h)).pow(4)
    return 1 - iou + (distance_cost + shape_cost) / 2


class YoloV6Loss(nn.Module):
    """YOLOv6 v3.0's ``ComputeLoss`` for its N and S models (see the module docstring).

    Args:
        topk / alpha / beta: the :class:`~cvlab.ops.assigners.TaskAlignedAssigner`'s (13, 1, 6).
        box_loss: ``"siou"`` (YOLOv6-N) or ``"giou"`` (YOLOv6-S); ``"ciou"`` (``IOUloss``' other choice; the modern
            recipe's); None: the detector's variant sets it.
        cls_loss: ``"varifocal"``, or ``"bce"`` (the same soft targets, no varifocal weighting: ablation).
        cls_weight / box_weight: the terms' weights (``loss_weight`` class 1.0, iou 2.5).
        vfl_alpha / vfl_gamma: the varifocal loss's α (0.75) and γ (2).
    """

    box_losses = BOX_LOSSES

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, box_loss: str | None = None,
                 cls_loss: str = "varifocal", cls_weight: float = 1.0, box_weight: float = 2.5,
                 vfl_alpha: float = 0.75, vfl_gamma: float = 2.0):
        super().__init__()
        if box_loss is not None:
            check_box_loss(box_loss, BOX_LOSSES)
        if cls_loss not in CLASS_LOSSES:
            raise ValueError(f"unknown cls_loss {cls_loss!r}; choose one of {', '.join(CLASS_LOSSES)}")
        self.assigner = TaskAlignedAssigner(topk, alpha, beta)
        self.box_loss, self.cls_loss = box_loss, cls_loss
        self.cls_weight, self.box_weight = cls_weight, box_weight
        self.vfl_alpha, self.vfl_gamma = vfl_alpha, vfl_gamma

    def _box_losses(self, boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        if self.box_loss == "giou":
            return generalized_box_iou_loss(boxes, target_boxes, reduction="none")
        if self.box_loss == "siou":
            return siou_loss(boxes, target_boxes)
        if self.box_loss == "ciou":
            return complete_box_iou_loss(boxes, target_boxes, reduction="none")
        raise ValueError("YoloV6Loss has no box_loss: set it, or let the YOLOv6 detector set its variant's")

    def forward(self, levels: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        dense = flatten_levels([level.float() for level in levels])
        distances, logits = dense[..., :4], dense[..., 4:]
        points, strides = grid_points([tuple(level.shape[-2:]) for level in levels], image_size, dense.device)
        boxes = decode_distance_boxes(distances, points, strides)
        assigned = self.assigner(logits.detach().sigmoid(), boxes.detach(), points, targets)

        foreground = assigned.foreground
        labels = F.one_hot(assigned.labels, logits.shape[-1]).to(logits) * foreground[..., None]
        score_sum = assigned.scores.sum()
        normaliser = torch.where(score_sum > 0, score_sum, torch.ones_like(score_sum))  # no positives: the sums
        loss_cls = varifocal_loss(logits, assigned.scores, labels, self.vfl_alpha, self.vfl_gamma,
                                  weighted=self.cls_loss == "varifocal") / normaliser
        if foreground.any():
            box_weights = assigned.scores.sum(-1)[foreground]
            loss_box = (self._box_losses(boxes[foreground], assigned.boxes[foreground]) * box_weights).sum()
            loss_box = loss_box / normaliser
        else:
            loss_box = distances.sum() * 0.0
        return {"loss_cls": self.cls_weight * loss_cls, "loss_box": self.box_weight * loss_box}
