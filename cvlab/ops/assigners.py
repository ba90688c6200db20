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
- :class:`SimOTAAssigner` (YOLOv7, Wang et al. 2022; its ``ComputeLossOTA``): YOLOv5's positives are only the
  candidates; each object keeps the ``k`` of lowest cost (classification + 3 · −log IoU of the predictions), ``k``
  the sum of its 10 best IoUs (:class:`DynamicKMatcher`, SimOTA: Ge et al. 2021, "YOLOX", §2.3).
- :class:`TaskAlignedAssigner` (TOOD, Feng et al. 2021, §3.2; YOLOv6 v3.0's ``tal_assigner.py``): anchor-free, each
  object takes the ``topk`` cell centres inside it of best alignment ``t = s^α · u^β`` (the predicted score of its
  class and the predicted box's IoU with it), and its soft class target is ``t`` rescaled so that its best
  positive's equals that positive's IoU.

When two objects claim the same slot (v1: a cell; v2/v3: an anchor of a cell), the later one keeps it, as in Darknet.
Written by hand: torchvision's ``Matcher`` matches placed anchors to objects by IoU thresholds, which is not YOLO's
rule; IoUs use ``torchvision.ops.box_iou`` and :func:`~cvlab.ops.anchors.wh_iou`.

Targets come in the detection contract's format, ``targets[i] = dict(boxes=Tensor[M_i, 4] xyxy pixels,
labels=Tensor[M_i] int64)``; boxes without area are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    ``neighbour_reach`` ½ is YOLOv5's rule; 1 (YOLOv7's ``find_5_positive``, for its auxiliary head) takes all four
    neighbours of the centre's cell (``floor(c ∓ 1)``), none across the border.

    ``__call__(grid_sizes, anchors, targets, image_size=(H, W)) -> list[AnchorAssignment]`` with, per level ``l``,
    ``grid_sizes[l] = (H_l, W_l)`` and ``anchors[l]: Tensor[A_l, 2]`` pixel (w, h).
    """

    # Neighbour cells: (which of the two "near the lower / upper side" masks, axis, direction of the shift).
    _NEIGHBOURS = ((0, 0, -1), (0, 1, -1), (1, 0, 1), (1, 1, 1))

    def __init__(self, anchor_t: float = 4.0, neighbour_reach: float = 0.5):
        if anchor_t <= 1:
            raise ValueError(f"anchor_t is a bound on max(r, 1 / r) >= 1, so it must be above 1, got {anchor_t}")
        if not 0 < neighbour_reach <= 1:
            raise ValueError(f"neighbour_reach is a fraction of a cell in (0, 1], got {neighbour_reach}")
        self.anchor_t = anchor_t
        self.neighbour_reach = neighbour_reach

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
            # YOLOv5's tests: the centre lies within the reach of its cell's lower (upper) side along the axis (½:
            # in that half of the cell), and more than one cell away from the image's near (far) border.
            reach = self.neighbour_reach
            near = ((centre % 1 < reach) & (centre > 1), ((grid - centre) % 1 < reach) & (grid - centre > 1))
            picks, cells = [torch.arange(len(obj), device=device)], [centre.floor()]
            for side, axis, direction in self._NEIGHBOURS:
                pick = near[side][:, axis].nonzero(as_tuple=True)[0]
                shifted = centre[pick].clone()
                shifted[:, axis] += direction * reach
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


@dataclass
class AlignedAssignment:
    """A batch's task-aligned assignment over its ``P`` points: ``foreground`` ``Tensor[N, P]`` bool; for the
    foreground, the assigned object's ``labels`` ``Tensor[N, P]`` int64 and ``boxes`` ``Tensor[N, P, 4]`` xyxy
    pixels (elsewhere those of the image's first object, or 0: to be read through ``foreground`` only); and the soft
    class targets ``scores`` ``Tensor[N, P, C]`` (the normalised alignment at the assigned class, 0 elsewhere)."""

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor


class TaskAlignedAssigner:
    """TOOD's task alignment learning (TAL) as YOLOv6 v3.0 assigns with it (``topk=13, alpha=1, beta=6``):

    1. per object and point, the alignment ``t = s^α · u^β``: ``s`` the point's predicted probability of the
       object's class, ``u`` the IoU of the point's predicted box with the object (:meth:`alignment`);
    2. an object's candidates are the ``topk`` points of largest ``t`` among the points strictly inside its box
       (fewer when fewer lie inside);
    3. a point that is a candidate of several objects goes to the object its predicted box overlaps most (over all
       the image's objects, as YOLOv6's ``select_highest_overlaps``);
    4. the soft target of a positive is ``t · max_u / max_t`` at its object's class, with ``max_t`` and ``max_u``
       the largest alignment and IoU among that object's positives: each object's best-aligned positive is trained
       towards its own IoU. (A point keeps the largest such value over the objects, which is its own object's.)

    ``__call__(scores: Tensor[N, P, C] probabilities, boxes: Tensor[N, P, 4] xyxy pixels (both predictions, no
    gradient), points: Tensor[P, 2] pixel (x, y), targets) -> AlignedAssignment``. Written by hand (torchvision has
    no TAL); IoUs are :func:`~cvlab.ops.boxes.paired_box_iou`, which clamps an inverted predicted box to no area.
    """

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9):
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps

    def alignment(self, scores: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor,
                  gt_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: (alignment ``t`` Tensor[M, P], IoU Tensor[M, P]) of its ``M`` objects with its ``P`` predictions
        (``scores: Tensor[P, C]``, ``boxes: Tensor[P, 4]``)."""
        iou = paired_box_iou(gt_boxes[:, None], boxes[None])
        return scores[:, gt_labels].T.pow(self.alpha) * iou.pow(self.beta), iou

    def _assign_image(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor, gt_boxes: torch.Tensor,
                      gt_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        metric, iou = self.alignment(scores, boxes, gt_boxes, gt_labels)
        offsets = torch.cat((points[None] - gt_boxes[:, None, :2], gt_boxes[:, None, 2:] - points[None]), -1)
        inside = offsets.amin(-1) > self.eps  # Tensor[M, P]
        top = (metric * inside).topk(min(self.topk, len(points)), dim=1).indices
        positive = torch.zeros_like(inside).scatter_(1, top, True) & inside
        contested = positive.sum(0) > 1
        if contested.any():
            best = iou.argmax(0)
            positive[:, contested] = best[contested] == torch.arange(len(gt_boxes), device=best.device)[:, None]
        foreground = positive.any(0)
        index = positive.to(torch.uint8).argmax(0)  # the point's object (0 for the background)
        metric, iou = metric * positive, iou * positive
        normalised = (metric * iou.amax(1, keepdim=True) / (metric.amax(1, keepdim=True) + self.eps)).amax(0)
        labels = gt_labels[index]
        soft = F.one_hot(labels, scores.shape[1]).to(scores) * (normalised * foreground)[:, None]
        return labels, gt_boxes[index], soft, foreground

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                 targets: list[dict]) -> AlignedAssignment:
        batch, num_points, num_classes = scores.shape
        labels = torch.zeros(batch, num_points, dtype=torch.long, device=scores.device)
        assigned_boxes = torch.zeros(batch, num_points, 4, dtype=boxes.dtype, device=boxes.device)
        soft = torch.zeros_like(scores)
        foreground = torch.zeros(batch, num_points, dtype=torch.bool, device=scores.device)
        image_index, gt_boxes, gt_labels = flatten_targets(targets, scores.device)
        for image in range(batch):
            mine = image_index == image
            if mine.any():
                labels[image], assigned_boxes[image], soft[image], foreground[image] = self._assign_image(
                    scores[image], boxes[image], points, gt_boxes[mine].to(boxes.dtype), gt_labels[mine])
        return AlignedAssignment(labels, assigned_boxes, soft, foreground)


class DynamicKMatcher:
    """SimOTA's dynamic-k matching (Ge et al. 2021, "YOLOX: Exceeding YOLO Series in 2021", §2.3; YOLOv7's
    ``ComputeLossOTA.build_targets``), on one image's ``G`` objects and ``P`` candidate predictions:

    1. each object's ``k = max(1, ⌊Σ of its topk largest IoUs⌋)`` (topk 10): an object that many candidates
       overlap well gets more positives;
    2. each object takes its ``k`` candidates of lowest cost;
    3. a candidate taken by several objects goes to the one of lowest cost with it (over all objects, as
       ``ComputeLossOTA``), so each candidate answers for at most one object.

    ``__call__(iou: Tensor[G, P], cost: Tensor[G, P]) -> Tensor[P] int64``: the object each candidate answers
    for, −1 for none. Written by hand: no library has it (OTA's optimal transport is solved approximately this way).
    """

    def __init__(self, topk: int = 10):
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        self.topk = topk

    def dynamic_k(self, iou: torch.Tensor) -> torch.Tensor:
        """Tensor[G] int64: each object's number of positives, ``max(1, ⌊Σ topk IoUs⌋)``."""
        top = iou.topk(min(self.topk, iou.shape[1]), dim=1).values
        return top.sum(1).long().clamp(min=1)

    def __call__(self, iou: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        num_objects, num_candidates = cost.shape
        if not num_objects or not num_candidates:
            return torch.full((num_candidates,), -1, dtype=torch.long, device=cost.device)
        rank = cost.argsort(dim=1, stable=True).argsort(dim=1)  # each candidate's place in its object's cost order
        taken = rank < self.dynamic_k(iou)[:, None]  # Tensor[G, P]
        contested = taken.sum(0) > 1
        objects = torch.arange(num_objects, device=cost.device)[:, None]
        taken[:, contested] = cost[:, contested].argmin(0) == objects
        return torch.where(taken.any(0), taken.to(torch.uint8).argmax(0), -1)


def class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """YOLOv7's classification cost of candidates with raw ``logits: Tensor[P, 1 + C]`` (objectness, classes) for
    objects of ``labels: Tensor[G]``: ``Σ_c BCE(√(σ(class c) · σ(objectness)), [c = label])``, Tensor[G, P]. Summed
    in closed form (no ``[G, P, C]`` tensor); the logs are clamped at −100 as ``F.binary_cross_entropy``'s."""
    probability = (logits[:, 1:].sigmoid() * logits[:, :1].sigmoid()).sqrt()
    log_p, log_not_p = probability.log().clamp(min=-100), torch.log1p(-probability).clamp(min=-100)
    return -log_not_p.sum(1)[None] - (log_p - log_not_p)[:, labels].T


class SimOTAAssigner:
    """YOLOv7's assignment (``utils/loss.py`` ``ComputeLossOTA``): the positives of a :class:`RatioAnchorAssigner`
    (``anchor_t``, ``neighbour_reach``) over all levels are each image's candidates; every object of the image is
    scored against every candidate with ``cost = class_cost + iou_weight · −log(IoU + 1e-8)`` (:func:`class_cost`,
    the IoU of the candidate's predicted box with the object), and a :class:`DynamicKMatcher` (``topk``) picks the
    positives. Every slot that answers for no object is a negative.

    A slot that several objects (or cells of one object) propose is one candidate here; ``ComputeLossOTA`` keeps
    each proposal as a column of its cost matrix, so a slot can be matched twice there and the top-10 IoU sums count
    it several times.

    ``__call__(pred_boxes, pred_logits, anchors, targets, image_size=(H, W)) -> list[AnchorAssignment]`` with, per
    level ``l``, ``pred_boxes[l]: Tensor[N, A_l, H_l, W_l, 4]`` decoded xyxy pixels and ``pred_logits[l]: Tensor[N,
    A_l, H_l, W_l, 1 + C]`` (objectness and class logits), both without gradient, and ``anchors[l]: Tensor[A_l, 2]``.
    """

    def __init__(self, anchor_t: float = 4.0, topk: int = 10, iou_weight: float = 3.0,
                 neighbour_reach: float = 0.5):
        self.candidates = RatioAnchorAssigner(anchor_t, neighbour_reach)
        self.matcher = DynamicKMatcher(topk)
        self.iou_weight = iou_weight

    @torch.no_grad()
    def __call__(self, pred_boxes: list[torch.Tensor], pred_logits: list[torch.Tensor], anchors: list[torch.Tensor],
                 targets: list[dict], image_size: tuple[int, int]) -> list[AnchorAssignment]:
        grids = [tuple(boxes.shape[2:4]) for boxes in pred_boxes]
        proposed = self.candidates(grids, anchors, targets, image_size)
        image_index, boxes, labels = flatten_targets(targets, pred_boxes[0].device)
        # The distinct slots (image, anchor, row, col) of every level, levels one after another.
        level_slots = [torch.unique(torch.stack(assigned.slot, 1), dim=0) for assigned in proposed]
        slots = torch.cat(level_slots)
        slot_level = torch.cat([torch.full((len(level),), index, device=slots.device)
                                for index, level in enumerate(level_slots)])
        slot_boxes = torch.cat([level[tuple(s.T)] for level, s in zip(pred_boxes, level_slots)])
        slot_logits = torch.cat([level[tuple(s.T)] for level, s in zip(pred_logits, level_slots)]).float()
        matched = torch.full((len(slots),), -1, dtype=torch.long, device=slots.device)  # index into the objects
        for image in range(len(targets)):
            objects = (image_index == image).nonzero(as_tuple=True)[0]
            candidates = (slots[:, 0] == image).nonzero(as_tuple=True)[0]
            if not len(objects) or not len(candidates):
                continue
            iou = box_iou(boxes[objects], slot_boxes[candidates].float())
            cost = class_cost(slot_logits[candidates], labels[objects]) - self.iou_weight * torch.log(iou + 1e-8)
            chosen = self.matcher(iou, cost)
            matched[candidates[chosen >= 0]] = objects[chosen[chosen >= 0]]

        assignments = []
        for level, level_boxes in enumerate(pred_boxes):
            positive = (slot_level == level) & (matched >= 0)
            image, anchor, row, col = slots[positive].unbind(1)
            negatives = torch.ones(level_boxes.shape[:4], dtype=torch.bool, device=level_boxes.device)
            negatives[image, anchor, row, col] = False
            obj = matched[positive]
            assignments.append(AnchorAssignment(image, anchor, row, col, boxes[obj], labels[obj], negatives))
        return assignments
