"""YOLO v1 / v2 / v3 losses with their target assignment.

Papers:
    Redmon et al. 2016, "You Only Look Once: Unified, Real-Time Object Detection" (YOLOv1, eq. 3).
    Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (YOLOv2; the loss is only in Darknet's region layer).
    Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (YOLOv3; Darknet's yolo layer).

No library implements the YOLO losses (torchvision ships only generic box ops and detection losses of other
families), so the assignment and the loss terms are written here by hand; IoUs and box formats use
``torchvision.ops`` (``box_iou``, ``box_convert``, ``generalized_box_iou_loss``).

Every loss returns ``dict(loss_box, loss_obj, loss_noobj, loss_cls)`` of scalars summed over the batch and divided by
the batch size (Darknet sums; dividing by N makes the scale independent of the batch). The total loss is their sum.
Squared errors are written without Darknet's implicit ½ (its deltas are gradients of ½·error²): a constant factor
only rescales the learning rate.

Target boxes come in the detection contract's format: ``targets[i] = dict(boxes=Tensor[M_i, 4] xyxy pixels,
labels=Tensor[M_i] int64)``; boxes without area are skipped. When two objects claim the same slot (v1: a cell;
v2/v3: an anchor of a cell), the later one keeps it, as in Darknet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from cvlab.ops.postprocess import decode_anchor_boxes, decode_cell_boxes

LossDict = dict[str, torch.Tensor]


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding rows: Tensor[..., 4] xyxy × Tensor[..., 4] → Tensor[...] (``box_iou`` gives all pairs)."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).eps)


def shape_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes and anchors placed on the same centre: Tensor[M, 2] (w, h) × Tensor[K, 2] → Tensor[M, K].

    YOLOv2/v3 give each object to the anchor of best shape IoU (Darknet's ``bias_match``).
    """
    inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def flatten_targets(targets: list[dict[str, torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All objects of the batch: (image index Tensor[M] int64, boxes Tensor[M, 4] xyxy, labels Tensor[M] int64)."""
    image_index = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long, device=device)
                             for i, t in enumerate(targets)])
    boxes = torch.cat([t["boxes"].reshape(-1, 4).to(device, torch.float32) for t in targets])
    labels = torch.cat([t["labels"].reshape(-1).to(device, torch.long) for t in targets])
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image_index[has_area], boxes[has_area], labels[has_area]


def last_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Index of the last occurrence of each distinct value of ``keys: Tensor[M]`` (one index per value)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    order = torch.arange(len(keys), device=keys.device)
    return torch.full((len(unique),), -1, dtype=torch.long, device=keys.device).scatter_reduce(
        0, inverse, order, "amax"
    )


class YoloV1Loss(nn.Module):
    """YOLOv1's sum-squared error (paper eq. 3).

    For every object, the cell containing its centre is responsible, and of that cell's B predictors the one whose
    box has the highest IoU with the object ("responsible predictor"; when all IoUs are 0, the one nearest in
    (x, y, w, h), as Darknet does). Then, divided by the batch size:

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

    def forward(self, box_pred: torch.Tensor, class_pred: torch.Tensor, targets: list[dict],
                image_size: tuple[int, int]) -> LossDict:
        box_pred, class_pred = box_pred.float(), class_pred.float()
        batch, grid_h, grid_w, num_boxes, _ = box_pred.shape
        img_h, img_w = image_size
        image_index, boxes, labels = flatten_targets(targets, box_pred.device)

        centre_size = box_convert(boxes, "xyxy", "cxcywh") / boxes.new_tensor([img_w, img_h, img_w, img_h])
        col = (centre_size[:, 0] * grid_w).floor().long().clamp(0, grid_w - 1)
        row = (centre_size[:, 1] * grid_h).floor().long().clamp(0, grid_h - 1)
        keep = last_occurrence((image_index * grid_h + row) * grid_w + col)
        image_index, boxes, labels = image_index[keep], boxes[keep], labels[keep]
        centre_size, col, row = centre_size[keep], col[keep], row[keep]

        cell_pred = box_pred[image_index, row, col]  # Tensor[M, B, 5]
        with torch.no_grad():
            pred_boxes = decode_cell_boxes(box_pred[..., :4], image_size)[image_index, row, col]  # Tensor[M, B, 4]
            iou = paired_box_iou(pred_boxes, boxes[:, None])
            pred_centre_size = box_convert(pred_boxes, "xyxy", "cxcywh") / centre_size.new_tensor(
                [img_w, img_h, img_w, img_h])
            distance = (pred_centre_size - centre_size[:, None]).square().sum(-1)
            best_iou, best_by_iou = iou.max(dim=1)
            responsible = torch.where(best_iou > 0, best_by_iou, distance.argmin(dim=1))

        objects = torch.arange(len(keep), device=box_pred.device)
        resp_pred = cell_pred[objects, responsible]  # Tensor[M, 5]
        target_xy = torch.stack((centre_size[:, 0] * grid_w - col, centre_size[:, 1] * grid_h - row), -1)
        target_sqrt_wh = centre_size[:, 2:].sqrt()
        loss_box = self.lambda_coord * (
            (resp_pred[:, :2] - target_xy).square().sum() + (resp_pred[:, 2:4] - target_sqrt_wh).square().sum()
        )
        loss_obj = (resp_pred[:, 4] - iou[objects, responsible]).square().sum()

        not_responsible = torch.ones(box_pred.shape[:4], dtype=torch.bool, device=box_pred.device)
        not_responsible[image_index, row, col, responsible] = False
        loss_noobj = self.lambda_noobj * box_pred[..., 4][not_responsible].square().sum()

        class_target = F.one_hot(labels, class_pred.shape[-1]).to(class_pred)
        loss_cls = (class_pred[image_index, row, col] - class_target).square().sum()
        return {name: value / batch for name, value in
                dict(loss_box=loss_box, loss_obj=loss_obj, loss_noobj=loss_noobj, loss_cls=loss_cls).items()}


class AnchorYoloLoss(nn.Module):
    """Shared assignment and box loss of YOLOv2 and YOLOv3; subclasses define the objectness and class terms.

    Assignment: each object goes to the anchor of best shape IoU among *all* anchors (all levels for YOLOv3; an
    object whose best anchor belongs to another level is not a positive here), in the cell containing its centre.
    Predictions that are not positives are negatives unless their decoded box overlaps some object by more than
    ``ignore_thresh`` (those are left out of the objectness loss).

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
        self.ignore_thresh = ignore_thresh
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

    def _unmatched(self, pred_boxes: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Tensor[N, A, H, W] bool: the predictions whose best IoU with any object of their image is ≤ the threshold."""
        unmatched = torch.ones(pred_boxes.shape[:-1], dtype=torch.bool, device=pred_boxes.device)
        for image in range(pred_boxes.shape[0]):
            image_boxes = boxes[image_index == image]
            if len(image_boxes):
                best_iou = box_iou(pred_boxes[image].reshape(-1, 4), image_boxes).amax(dim=1)
                unmatched[image] = best_iou.view(unmatched.shape[1:]) <= self.ignore_thresh
        return unmatched

    def forward(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int]) -> LossDict:
        device = outputs[0].device
        batch = outputs[0].shape[0]
        img_h, img_w = image_size
        image_index, boxes, labels = flatten_targets(targets, device)
        centre_size = box_convert(boxes, "xyxy", "cxcywh")

        all_anchors = torch.cat(anchors).to(device=device, dtype=torch.float32)
        anchor_level = torch.cat([torch.full((len(a),), level, device=device) for level, a in enumerate(anchors)])
        anchor_in_level = torch.cat([torch.arange(len(a), device=device) for a in anchors])
        best_anchor = shape_iou(centre_size[:, 2:], all_anchors).argmax(dim=1)

        totals = dict.fromkeys(("loss_box", "loss_obj", "loss_noobj", "loss_cls"), outputs[0].new_zeros(()).float())
        for level, (raw, level_anchors) in enumerate(zip(outputs, anchors)):
            raw = raw.float()
            num_anchors, grid_h, grid_w = raw.shape[1:4]
            stride_x, stride_y = img_w / grid_w, img_h / grid_h
            pred_boxes = decode_anchor_boxes(raw[..., :4], level_anchors, image_size)
            negatives = self._unmatched(pred_boxes.detach(), image_index, boxes)

            on_level = anchor_level[best_anchor] == level
            obj_image, obj_boxes, obj_labels = image_index[on_level], boxes[on_level], labels[on_level]
            obj_centre_size, anchor = centre_size[on_level], anchor_in_level[best_anchor[on_level]]
            col = (obj_centre_size[:, 0] / stride_x).floor().long().clamp(0, grid_w - 1)
            row = (obj_centre_size[:, 1] / stride_y).floor().long().clamp(0, grid_h - 1)
            keep = last_occurrence(((obj_image * num_anchors + anchor) * grid_h + row) * grid_w + col)
            obj_image, obj_boxes, obj_labels = obj_image[keep], obj_boxes[keep], obj_labels[keep]
            obj_centre_size, anchor, col, row = obj_centre_size[keep], anchor[keep], col[keep], row[keep]
            slot = (obj_image, anchor, row, col)
            negatives[slot] = False

            pos_raw, pos_boxes = raw[slot], pred_boxes[slot]
            if self.box_loss == "mse":
                target_xy = torch.stack(
                    (obj_centre_size[:, 0] / stride_x - col, obj_centre_size[:, 1] / stride_y - row), -1)
                target_wh = (obj_centre_size[:, 2:] / level_anchors.to(raw)[anchor]).log()
                size_weight = 2 - obj_centre_size[:, 2] * obj_centre_size[:, 3] / (img_w * img_h)
                box_error = (pos_raw[:, :2].sigmoid() - target_xy).square().sum(1) + (
                    pos_raw[:, 2:4] - target_wh).square().sum(1)
                loss_box = (size_weight * box_error).sum()
            else:
                loss_box = generalized_box_iou_loss(pos_boxes, obj_boxes, reduction="sum")
            loss_obj, loss_noobj = self.objectness_losses(
                pos_raw[:, 4], raw[..., 4][negatives], paired_box_iou(pos_boxes.detach(), obj_boxes))
            totals["loss_box"] = totals["loss_box"] + self.coord_scale * loss_box
            totals["loss_obj"] = totals["loss_obj"] + loss_obj
            totals["loss_noobj"] = totals["loss_noobj"] + loss_noobj
            totals["loss_cls"] = totals["loss_cls"] + self.class_loss(pos_raw[:, 5:], obj_labels)
        return {name: value / batch for name, value in totals.items()}


class YoloV2Loss(AnchorYoloLoss):
    """YOLOv2's loss as in Darknet's region layer (yolo-voc.cfg / yolov2.cfg scales):

    - ``loss_box``: the shared box loss (``coord_scale`` 1);
    - ``loss_obj = object_scale · Σ_pos (σ(to) − IoU(pred, truth))²`` (``rescore=1``: the target is the IoU; 5);
    - ``loss_noobj = noobject_scale · Σ_neg σ(to)²`` with negatives the predictions of best IoU ≤ 0.6 (1);
    - ``loss_cls = class_scale · Σ_pos CE(softmax(classes), label)`` (1; Darknet's softmax delta is this
      cross-entropy's gradient).

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


class YoloV3Loss(AnchorYoloLoss):
    """YOLOv3's loss as in Darknet's yolo layer, with independent logistic outputs:

    - ``loss_box``: the shared box loss;
    - ``loss_obj = Σ_pos BCE(to, 1)``, ``loss_noobj = Σ_neg BCE(to, 0)`` with negatives the predictions of best
      IoU ≤ ``ignore_thresh`` (0.5 as in the paper; the released yolov3.cfg uses 0.7);
    - ``loss_cls = Σ_pos Σ_c BCE(class logit c, [c = label])`` (no softmax: labels may overlap).
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
