"""Target assignment of the YOLO losses: which prediction answers for each object, and which predictions are negatives.

As torchvision splits a detector's training targets into a ``Matcher`` (objects ↔ anchors) and a sampler (which of the
rest count as background), the YOLO losses take their positives and negatives from an assigner here and only score
them:

- :class:`GridCellAssigner` (YOLOv1, Redmon et al. 2016, §2.2): the cell containing an object's centre answers for it,
  through the one of its B predictors whose box overlaps the object most;
- :class:`BestAnchorAssigner` (YOLOv2/v3, Redmon & Farhadi 2017/2018; Darknet's region / yolo layers): the anchor of
  best shape IoU among all anchors of all levels, in the cell containing the centre, answers for it; a prediction
  that is no positive is a negative unless its box overlaps some object by more than ``ignore_thresh``. With
  ``iou_thresh`` < 1 (YOLOv4, Bochkovskiy et al. 2020, "using multiple anchors for a single ground truth"), every
  other anchor whose shape IoU with the object exceeds it answers for the object too.
- :class:`RatioAnchorAssigner` (YOLOv5, ultralytics/yolov5): every anchor of every level whose width and height
  ratios to the object's are within ``anchor_t``, in the centre's cell and its two nearest neighbour cells; every
  other prediction is a negative.

When two objects claim the same slot (v1: a cell; v2/v3: an anchor of a cell), the later one keeps it, as in Darknet.
Written by hand: torchvision's ``Matcher`` matches placed anchors to objects by IoU thresholds, which is not YOLO's
rule; IoUs use ``torchvision.ops.box_iou`` and :func:`~cvlab.ops.anchors.wh_iou`.

Targets come in the detection contract's format, ``targets[i] = dict(boxes=Tensor[M_i, 4] xyxy pixels,
labels=Tensor[M_i] int64)``; boxes without area are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_convert, box_iou

from cvlab.ops.anchors import wh_iou
from cvlab.ops.boxes import paired_box_iou


def flatten_targets(targets: list[dict[str, torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All objects of the batch with an area: (image index Tensor[M] int64, boxes Tensor[M, 4] xyxy, labels
    Tensor[M] int64)."""
    image_index = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long, device=device)
                             for i, t in enumerate(targets)])
    boxes = torch.cat([t["boxes"].reshape(-1, 4).to(device, torch.float32) for t in targets])
    labels = torch.cat([t["labels"].reshape(-1).to(device, torch.long) for t in targets])
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image_index[has_area], boxes[has_area], labels[has_area]


def last_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Index of the last occurrence of each distinct value of ``keys: Tensor[M]``, in increasing order of the value."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    order = torch.arange(len(keys), device=keys.device)
    return torch.full((len(unique),), -1, dtype=torch.long, device=keys.device).scatter_reduce(
        0, inverse, order, "amax"
    )


@dataclass
class CellAssignment:
    """YOLOv1's positives, one per object kept: ``Tensor[M]`` image, cell row and column, the responsible
    ``predictor`` (of B) and its box's IoU with the object (``iou``, no gradient), and the object's ``boxes``
    ``Tensor[M, 4]`` xyxy and ``labels``."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    predictor: torch.Tensor
    iou: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


class GridCellAssigner:
    """YOLOv1's assignment: the cell containing the centre, and of its B predictors the one whose box has the
    highest IoU with the object (when every IoU is 0, the one nearest in centre and size, as Darknet does).

    ``__call__(pred_boxes: Tensor[N, S_h, S_w, B, 4] xyxy pixels (decoded, no gradient), targets, image_size=(H, W))
    -> CellAssignment``.
    """

    def __call__(self, pred_boxes: torch.Tensor, targets: list[dict], image_size: tuple[int, int]) -> CellAssignment:
        grid_h, grid_w = pred_boxes.shape[1:3]
        img_h, img_w = image_size
        image_index, boxes, labels = flatten_targets(targets, pred_boxes.device)
        scale = boxes.new_tensor([img_w, img_h, img_w, img_h])
        centre_size = box_convert(boxes, "xyxy", "cxcywh") / scale
        col = (centre_size[:, 0] * grid_w).floor().long().clamp(0, grid_w - 1)
        row = (centre_size[:, 1] * grid_h).floor().long().clamp(0, grid_h - 1)
        keep = last_occurrence((image_index * grid_h + row) * grid_w + col)
        image_index, boxes, labels = image_index[keep], boxes[keep], labels[keep]
        centre_size, col, row = centre_size[keep], col[keep], row[keep]

        cell_boxes = pred_boxes[image_index, row, col]  # Tensor[M, B, 4]
        iou = paired_box_iou(cell_boxes, boxes[:, None])
        distance = (box_convert(cell_boxes, "xyxy", "cxcywh") / scale - centre_size[:, None]).square().sum(-1)
        best_iou, best_by_iou = iou.max(dim=1)
        predictor = torch.where(best_iou > 0, best_by_iou, distance.argmin(dim=1))
        objects = torch.arange(len(keep), device=pred_boxes.device)
        return CellAssignment(image_index, row, col, predictor, iou[objects, predictor], boxes, labels)


@dataclass
class AnchorAssignment:
    """One level's assignment: the positives' ``Tensor[P]`` image, anchor (within the level), row and column with
    their objects' ``boxes`` ``Tensor[P, 4]`` xyxy and ``labels``, and the ``negatives`` mask ``Tensor[N, A, H, W]``."""

    image: torch.Tensor
    anchor: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    negatives: torch.Tensor

    @property
    def slot(self) -> tuple[torch.Tensor, ...]:
        """Index of the positives into a level's ``Tensor[N, A, H, W, ...]``."""
        return self.image, self.anchor, self.row, self.col


def unmatched_predictions(pred_boxes: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                          ignore_thresh: float) -> torch.Tensor:
    """Tensor[N, A, H, W] bool: the predictions ``Tensor[N, A, H, W, 4]`` whose best IoU with any object of their
    image is ≤ ``ignore_thresh`` (every prediction of an image without objects)."""
    unmatched = torch.ones(pred_boxes.shape[:-1], dtype=torch.bool, device=pred_boxes.device)
    for image in range(pred_boxes.shape[0]):
        image_boxes = boxes[image_index == image]
        if len(image_boxes):
            best_iou = box_iou(pred_boxes[image].reshape(-1, 4), image_boxes).amax(dim=1)
            unmatched[image] = best_iou.view(unmatched.shape[1:]) <= ignore_thresh
    return unmatched


class BestAnchorAssigner:
    """YOLOv2/v3's assignment (Darknet's ``bias_match``): each object goes to the anchor of best shape IoU among the
    anchors of *all* levels (an object whose best anchor lies on another level is no positive here), in the cell
    containing its centre; the predictions that are not positives and overlap no object by more than
    ``ignore_thresh`` are the negatives (the rest are left out of the objectness loss).

    ``iou_thresh`` (YOLOv4's yolo layer; 1 = off, as in v2/v3): on every level, each anchor whose shape IoU with the
    object is above it is a positive as well, wherever the best anchor lies (yolov4.cfg: 0.213). An anchor shape
    listed on several levels (yolov4-tiny.cfg's masks share one) is a positive on each of them when it is the best.

    ``__call__(pred_boxes, anchors, targets, image_size=(H, W)) -> list[AnchorAssignment]`` with, per level ``l``,
    ``pred_boxes[l]: Tensor[N, A_l, H_l, W_l, 4]`` decoded xyxy pixels (no gradient) and ``anchors[l]: Tensor[A_l, 2]``
    pixel (w, h).
    """

    def __init__(self, ignore_thresh: float, iou_thresh: float = 1.0):
        self.ignore_thresh = ignore_thresh
        self.iou_thresh = iou_thresh

    def __call__(self, pred_boxes: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                 image_size: tuple[int, int]) -> list[AnchorAssignment]:
        device = pred_boxes[0].device
        img_h, img_w = image_size
        image_index, boxes, labels = flatten_targets(targets, device)
        centre_size = box_convert(boxes, "xyxy", "cxcywh")
        all_anchors = torch.cat(list(anchors)).to(device=device, dtype=torch.float32)
        anchor_level = torch.cat([torch.full((len(a),), level, device=device) for level, a in enumerate(anchors)])
        shape_iou = wh_iou(centre_size[:, 2:], all_anchors)  # Tensor[M, K]
        _, shape_id = torch.unique(all_anchors, dim=0, return_inverse=True)
        best_shape = shape_id[shape_iou.argmax(dim=1)]
        positive = (shape_id == best_shape[:, None]) | (shape_iou > self.iou_thresh)  # Tensor[M, K]

        assignments = []
        for level, level_boxes in enumerate(pred_boxes):
            num_anchors, grid_h, grid_w = level_boxes.shape[1:4]
            negatives = unmatched_predictions(level_boxes, image_index, boxes, self.ignore_thresh)
            obj, anchor = positive[:, anchor_level == level].nonzero(as_tuple=True)  # object-major, as Darknet
            obj_image, obj_boxes, obj_labels = image_index[obj], boxes[obj], labels[obj]
            obj_centre = centre_size[obj, :2]
            col = (obj_centre[:, 0] / (img_w / grid_w)).floor().long().clamp(0, grid_w - 1)
            row = (obj_centre[:, 1] / (img_h / grid_h)).floor().long().clamp(0, grid_h - 1)
            keep = last_occurrence(((obj_image * num_anchors + anchor) * grid_h + row) * grid_w + col)
            assignment = AnchorAssignment(obj_image[keep], anchor[keep], row[keep], col[keep], obj_boxes[keep],
                                          obj_labels[keep], negatives)
            negatives[assignment.slot] = False
            assignments.append(assignment)
        return assignments


class RatioAnchorAssigner:
    """YOLOv5's assignment (ultralytics/yolov5 ``utils/loss.py``, ``ComputeLoss.build_targets``): on every level,
    an object goes to each anchor whose width and height ratios to the object's are all within ``anchor_t``
    (``max(r, 1 / r) < anchor_t`` for ``r = w / pw`` and ``h / ph``; the box decoding reaches at most 4× the
    anchor), in the cell containing its centre and in the two neighbouring cells nearest to the centre: one across
    the nearer side of the cell, one across the nearer top or bottom (the cell at ``floor(c ∓ ½)``; none across the
    image border). An object of ratio ``anchor_t`` or more to every anchor of every level is no positive anywhere.

    Every slot that answers for no object is a negative. A slot claimed twice (two objects, or one object through
    two cells) answers for each claim in the box and class terms, as in YOLOv5. Positives come in YOLOv5's order:
    the centre cells first, then the left, upper, right and lower neighbours; within each, anchor-major.

    ``__call__(grid_sizes, anchors, targets, image_size=(H, W)) -> list[AnchorAssignment]`` with, per level ``l``,
    ``grid_sizes[l] = (H_l, W_l)`` and ``anchors[l]: Tensor[A_l, 2]`` pixel (w, h).
    """

    # Neighbour cells: (which of the two "near the lower / upper side" masks, axis, offset in cells of the centre).
    _NEIGHBOURS = ((0, 0, -0.5), (0, 1, -0.5), (1, 0, 0.5), (1, 1, 0.5))

    def __init__(self, anchor_t: float = 4.0):
        if anchor_t <= 1:
            raise ValueError(f"anchor_t is a bound on max(r, 1 / r) >= 1, so it must be above 1, got {anchor_t}")
        self.anchor_t = anchor_t

    def __call__(self, grid_sizes: list[tuple[int, int]], anchors: list[torch.Tensor], targets: list[dict],
                 image_size: tuple[int, int]) -> list[AnchorAssignment]:
        device = anchors[0].device
        image_index, boxes, labels = flatten_targets(targets, device)
        centre_size = box_convert(boxes, "xyxy", "cxcywh")
        assignments = []
        for (grid_h, grid_w), level_anchors in zip(grid_sizes, anchors, strict=True):
            ratio = centre_size[None, :, 2:] / level_anchors.to(centre_size)[:, None]  # Tensor[A, M, 2]
            anchor, obj = (torch.max(ratio, 1 / ratio).amax(dim=2) < self.anchor_t).nonzero(as_tuple=True)
            grid = centre_size.new_tensor([grid_w, grid_h])
            centre = centre_size[obj, :2] * grid / centre_size.new_tensor([image_size[1], image_size[0]])
            # YOLOv5's tests: the centre lies in the lower (upper) half of its cell along the axis, and more than one
            # cell away from the image's near (far) border.
            near = ((centre % 1 < 0.5) & (centre > 1), ((grid - centre) % 1 < 0.5) & (grid - centre > 1))
            picks, cells = [torch.arange(len(obj), device=device)], [centre.floor()]
            for side, axis, offset in self._NEIGHBOURS:
                pick = near[side][:, axis].nonzero(as_tuple=True)[0]
                shifted = centre[pick].clone()
                shifted[:, axis] += offset
                picks.append(pick)
                cells.append(shifted.floor())
            pick, cell = torch.cat(picks), torch.cat(cells).long()
            col, row = cell[:, 0].clamp(0, grid_w - 1), cell[:, 1].clamp(0, grid_h - 1)
            obj, anchor = obj[pick], anchor[pick]
            negatives = torch.ones(len(targets), len(level_anchors), grid_h, grid_w, dtype=torch.bool, device=device)
            assignment = AnchorAssignment(image_index[obj], anchor, row, col, boxes[obj], labels[obj], negatives)
            negatives[assignment.slot] = False
            assignments.append(assignment)
        return assignments
