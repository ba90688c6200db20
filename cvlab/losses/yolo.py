"""YOLO v1 / v2 / v3 losses: the terms scored on the positives and negatives their assigner picks.

Papers:
    Redmon et al. 2016, "You Only Look Once: Unified, Real-Time Object Detection" (YOLOv1, eq. 3).
    Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (YOLOv2; the loss is only in Darknet's region layer).
    Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (YOLOv3; Darknet's yolo layer).

No library implements the YOLO losses (torchvision ships only generic box ops and detection losses of other
families), so the loss terms are written here by hand; which prediction answers for which object is the job of the
assigners in :mod:`cvlab.ops.assigners`, and IoUs and box formats use ``torchvision.ops`` (``box_convert``,
``generalized_box_iou_loss``).

Each loss is a plug-in of the YOLO detectors (``loss=yolov1|yolov2|yolov3``, ``conf/loss/``): the model calls it with
its raw outputs and the targets. Every loss returns ``dict(loss_box, loss_obj, loss_noobj, loss_cls)`` of scalars
summed over the batch and divided by the batch size (Darknet sums; dividing by N makes the scale independent of the
batch). The total loss is their sum. Squared errors are written without Darknet's implicit ½ (its deltas are
gradients of ½·error²): a constant factor only rescales the learning rate.

Target boxes come in the detection contract's format: ``targets[i] = dict(boxes=Tensor[M_i, 4] xyxy pixels,
labels=Tensor[M_i] int64)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from cvlab.ops.assigners import AnchorAssignment, BestAnchorAssigner, GridCellAssigner
from cvlab.ops.boxes import paired_box_iou
from cvlab.ops.postprocess import decode_anchor_boxes, decode_cell_boxes

LossDict = dict[str, torch.Tensor]
LOSS_NAMES = ("loss_box", "loss_obj", "loss_noobj", "loss_cls")


class YoloV1Loss(nn.Module):
    """YOLOv1's sum-squared error (paper eq. 3) on the positives of a :class:`~cvlab.ops.assigners.GridCellAssigner`
    (per object: the cell containing its centre and that cell's responsible predictor). Divided by the batch size:

    - ``loss_box = λcoord Σ_resp [(x − x̂)² + (y − ŷ)² + (√w − √ŵ)² + (√h − √ĥ)²]`` (the net predicts √w, √h);
    - ``loss_obj = Σ_resp (C − IoU(pred, truth))²`` (the confidence target is the IoU);
    - ``loss_noobj = λnoobj Σ_not-resp C²`` over all other predictors, in object cells too;
    - ``loss_cls = Σ_object-cells Σ_c (p(c) − p̂(c))²`` (one class distribution per cell).

    ``forward(box_pred: Tensor[N, S_h, S_w, B, 5] (x, y, √w, √h, C), class_pred: Tensor[N, S_h, S_w, C],
    targets, image_size=(H, W)) -> LossDict``.
    """

    def __init__(self, lambda_coord: float = 5.0, lambda_noobj: float = 0.5):
        super().__init__()
        self.lambda_coord = lambda_coord
        self.lambda_noobj = lambda_noobj
        self.assigner = GridCellAssigner()

    def forward(self, box_pred: torch.Tensor, class_pred: torch.Tensor, targets: list[dict],
                image_size: tuple[int, int]) -> LossDict:
        box_pred, class_pred = box_pred.float(), class_pred.float()
        batch, grid_h, grid_w = box_pred.shape[:3]
        img_h, img_w = image_size
        with torch.no_grad():
            assigned = self.assigner(decode_cell_boxes(box_pred[..., :4], image_size), targets, image_size)
        cell = (assigned.image, assigned.row, assigned.col)

        resp_pred = box_pred[(*cell, assigned.predictor)]  # Tensor[M, 5]
        centre_size = box_convert(assigned.boxes, "xyxy", "cxcywh") / assigned.boxes.new_tensor(
            [img_w, img_h, img_w, img_h])
        target_xy = torch.stack((centre_size[:, 0] * grid_w - assigned.col,
                                 centre_size[:, 1] * grid_h - assigned.row), -1)
        loss_box = self.lambda_coord * ((resp_pred[:, :2] - target_xy).square().sum()
                                        + (resp_pred[:, 2:4] - centre_size[:, 2:].sqrt()).square().sum())
        loss_obj = (resp_pred[:, 4] - assigned.iou).square().sum()

        not_responsible = torch.ones(box_pred.shape[:4], dtype=torch.bool, device=box_pred.device)
        not_responsible[(*cell, assigned.predictor)] = False
        loss_noobj = self.lambda_noobj * box_pred[..., 4][not_responsible].square().sum()

        class_target = F.one_hot(assigned.labels, class_pred.shape[-1]).to(class_pred)
        loss_cls = (class_pred[cell] - class_target).square().sum()
        return {name: value / batch for name, value in zip(LOSS_NAMES, (loss_box, loss_obj, loss_noobj, loss_cls))}


class AnchorYoloLoss(nn.Module):
    """The box loss of YOLOv2 and YOLOv3 on the positives and negatives of a
    :class:`~cvlab.ops.assigners.BestAnchorAssigner`; subclasses define the objectness and class terms and the class
    probabilities the detector scores with at eval (:meth:`class_probabilities`, matching the class term).

    Box loss (``box_loss="mse"``, the papers'): for positives,
    ``(2 − w·h) · [(σ(tx) − x̂)² + (σ(ty) − ŷ)² + (tw − log(w / pw))² + (th − log(h / ph))²]`` with w, h relative to
    the image (the factor favours small boxes) and x̂, ŷ the centre's offset in its cell; ``box_loss="giou"`` uses
    ``1 − GIoU`` of the decoded box instead (scale-invariant, so without the factor). Multiplied by ``coord_scale``.

    ``forward(outputs, anchors, targets, image_size) -> LossDict`` with ``outputs[l]: Tensor[N, A_l, H_l, W_l, 5+C]``
    raw ``(tx, ty, tw, th, to, class logits)`` and ``anchors[l]: Tensor[A_l, 2]`` pixel (w, h) of level ``l``.
    """

    def __init__(self, ignore_thresh: float, box_loss: str = "mse", coord_scale: float = 1.0):
        super().__init__()
        if box_loss not in ("mse", "giou"):
            raise ValueError(f"unknown box_loss {box_loss!r}; choose 'mse' or 'giou'")
        self.assigner = BestAnchorAssigner(ignore_thresh)
        self.box_loss = box_loss
        self.coord_scale = coord_scale

    def objectness_losses(self, pos_logits: torch.Tensor, neg_logits: torch.Tensor,
                          pos_iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_obj, loss_noobj) sums from positives' / negatives' objectness logits; ``pos_iou`` is the IoU of
        each positive's decoded box with its object (no gradient)."""
        raise NotImplementedError

    def class_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed class loss of the positives: ``logits: Tensor[P, C]``, ``labels: Tensor[P]``."""
        raise NotImplementedError

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class logits Tensor[..., C] → the probabilities this loss trains them to be."""
        raise NotImplementedError

    def _box_loss(self, pos_raw: torch.Tensor, pos_boxes: torch.Tensor, anchors: torch.Tensor,
                  assigned: AnchorAssignment, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """Summed box loss of one level's positives: raw ``Tensor[P, 5 + C]``, decoded boxes ``Tensor[P, 4]``."""
        if self.box_loss == "giou":
            return generalized_box_iou_loss(pos_boxes, assigned.boxes, reduction="sum")
        img_h, img_w = image_size
        grid_h, grid_w = grid
        centre_size = box_convert(assigned.boxes, "xyxy", "cxcywh")
        target_xy = torch.stack((centre_size[:, 0] / (img_w / grid_w) - assigned.col,
                                 centre_size[:, 1] / (img_h / grid_h) - assigned.row), -1)
        target_wh = (centre_size[:, 2:] / anchors.to(pos_raw)[assigned.anchor]).log()
        size_weight = 2 - centre_size[:, 2] * centre_size[:, 3] / (img_w * img_h)
        box_error = (pos_raw[:, :2].sigmoid() - target_xy).square().sum(1) + (
            pos_raw[:, 2:4] - target_wh).square().sum(1)
        return (size_weight * box_error).sum()

    def forward(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int]) -> LossDict:
        outputs = [raw.float() for raw in outputs]
        pred_boxes = [decode_anchor_boxes(raw[..., :4], level_anchors, image_size)
                      for raw, level_anchors in zip(outputs, anchors)]
        assignments = self.assigner([boxes.detach() for boxes in pred_boxes], anchors, targets, image_size)

        totals = dict.fromkeys(LOSS_NAMES, outputs[0].new_zeros(()))
        for raw, level_boxes, level_anchors, assigned in zip(outputs, pred_boxes, anchors, assignments):
            pos_raw, pos_boxes = raw[assigned.slot], level_boxes[assigned.slot]
            loss_box = self._box_loss(pos_raw, pos_boxes, level_anchors, assigned, raw.shape[2:4], image_size)
            loss_obj, loss_noobj = self.objectness_losses(
                pos_raw[:, 4], raw[..., 4][assigned.negatives], paired_box_iou(pos_boxes.detach(), assigned.boxes))
            totals["loss_box"] = totals["loss_box"] + self.coord_scale * loss_box
            totals["loss_obj"] = totals["loss_obj"] + loss_obj
            totals["loss_noobj"] = totals["loss_noobj"] + loss_noobj
            totals["loss_cls"] = totals["loss_cls"] + self.class_loss(pos_raw[:, 5:], assigned.labels)
        return {name: value / outputs[0].shape[0] for name, value in totals.items()}


class YoloV2Loss(AnchorYoloLoss):
    """YOLOv2's loss as in Darknet's region layer (yolo-voc.cfg / yolov2.cfg scales):

    - ``loss_box``: the shared box loss (``coord_scale`` 1);
    - ``loss_obj = object_scale · Σ_pos (σ(to) − IoU(pred, truth))²`` (``rescore=1``: the target is the IoU; 5);
    - ``loss_noobj = noobject_scale · Σ_neg σ(to)²`` with negatives the predictions of best IoU ≤ 0.6 (1);
    - ``loss_cls = class_scale · Σ_pos CE(softmax(classes), label)`` (1; Darknet's softmax delta is this
      cross-entropy's gradient), so the classes are scored with a softmax.

    Darknet's extra term that pulls all predictions towards their anchor during the first 12,800 images is left out.
    """

    def __init__(self, ignore_thresh: float = 0.6, object_scale: float = 5.0, noobject_scale: float = 1.0,
                 class_scale: float = 1.0, coord_scale: float = 1.0, box_loss: str = "mse"):
        super().__init__(ignore_thresh, box_loss, coord_scale)
        self.object_scale = object_scale
        self.noobject_scale = noobject_scale
        self.class_scale = class_scale

    def objectness_losses(self, pos_logits, neg_logits, pos_iou):
        loss_obj = self.object_scale * (pos_logits.sigmoid() - pos_iou).square().sum()
        loss_noobj = self.noobject_scale * neg_logits.sigmoid().square().sum()
        return loss_obj, loss_noobj

    def class_loss(self, logits, labels):
        return self.class_scale * F.cross_entropy(logits, labels, reduction="sum")

    def class_probabilities(self, logits):
        return torch.softmax(logits, dim=-1)


class YoloV3Loss(AnchorYoloLoss):
    """YOLOv3's loss as in Darknet's yolo layer, with independent logistic outputs:

    - ``loss_box``: the shared box loss;
    - ``loss_obj = Σ_pos BCE(to, 1)``, ``loss_noobj = Σ_neg BCE(to, 0)`` with negatives the predictions of best
      IoU ≤ ``ignore_thresh`` (0.5 as in the paper; the released yolov3.cfg uses 0.7);
    - ``loss_cls = Σ_pos Σ_c BCE(class logit c, [c = label])`` (no softmax: labels may overlap), so the classes are
      scored with a sigmoid each.
    """

    def __init__(self, ignore_thresh: float = 0.5, box_loss: str = "mse", coord_scale: float = 1.0):
        super().__init__(ignore_thresh, box_loss, coord_scale)

    def objectness_losses(self, pos_logits, neg_logits, pos_iou):
        loss_obj = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="sum")
        loss_noobj = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="sum")
        return loss_obj, loss_noobj

    def class_loss(self, logits, labels):
        target = F.one_hot(labels, logits.shape[-1]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")

    def class_probabilities(self, logits):
        return torch.sigmoid(logits)
