"""Decoding YOLO outputs into absolute xyxy boxes, and the threshold + NMS step that ends a one-stage detector.

Papers:
    Redmon et al. 2016, "You Only Look Once" (YOLOv1: a box is a cell offset plus √w, √h of the image size).
    Redmon & Farhadi 2017, "YOLO9000" (YOLOv2/v3 "direct location prediction":
    ``bx = σ(tx) + cx``, ``by = σ(ty) + cy``, ``bw = pw · exp(tw)``, ``bh = ph · exp(th)``).
    Bochkovskiy et al. 2020, "YOLOv4" (grid sensitivity: ``bx = s · σ(tx) − (s − 1) / 2 + cx``).
    Jocher et al., ultralytics/yolov5 v4.0+ (no paper; its Detect layer: ``bx = 2σ(tx) − 0.5 + cx``, the grid
    sensitivity with s = 2, and ``bw = pw · (2σ(tw))²``).
    Li et al. 2022/2023, "YOLOv6" (v3.0; anchor-free as FCOS, Tian et al. 2019: each cell's centre predicts its
    distances to the box's four sides, in strides).

The YOLO box parameterisations are not in torchvision, so they are written here; score thresholding, clipping and
class-wise NMS use ``torchvision.ops`` (``clip_boxes_to_image``, ``batched_nms``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import batched_nms, box_convert, clip_boxes_to_image

# exp(tw) is clamped here so an untrained head cannot produce inf boxes (torchvision's BoxCoder uses the same bound).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def _cell_grid(height: int, width: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row index of every cell: two Tensor[H, W]."""
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    return cols, rows


def decode_cell_boxes(pred: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """YOLOv1 boxes → absolute xyxy.

    ``pred: Tensor[..., S_h, S_w, B, 4]`` holds, per cell and predictor, ``(x, y, √w, √h)``: the centre as an
    offset inside the cell (0–1 when inside) and the square roots of width / height relative to the image.
    Returns Tensor[..., S_h, S_w, B, 4] in pixels of ``image_size = (H, W)``.
    """
    grid_h, grid_w = pred.shape[-4], pred.shape[-3]
    img_h, img_w = image_size
    cols, rows = _cell_grid(grid_h, grid_w, pred.device, pred.dtype)
    cx = (cols[..., None] + pred[..., 0]) / grid_w * img_w
    cy = (rows[..., None] + pred[..., 1]) / grid_h * img_h
    w = pred[..., 2].square() * img_w
    h = pred[..., 3].square() * img_h
    return box_convert(torch.stack((cx, cy, w, h), -1), "cxcywh", "xyxy")


def anchor_cell_offsets(raw_xy: torch.Tensor, xy_scale: float = 1.0) -> torch.Tensor:
    """The centre's offset in its cell from the raw ``(tx, ty)``: ``σ(t)`` (YOLOv2/v3), or with YOLOv4's grid
    sensitivity ``s · σ(t) − (s − 1) / 2`` (Darknet's ``scale_x_y``; s > 1 lets the centre reach the cell's edges
    at finite logits)."""
    offsets = raw_xy.sigmoid()
    return offsets if xy_scale == 1.0 else offsets * xy_scale - (xy_scale - 1) / 2


def anchor_size_scales(raw_wh: torch.Tensor, bounded_size: bool = False) -> torch.Tensor:
    """The box's size as a multiple of its anchor's from the raw ``(tw, th)``: ``exp(t)`` (YOLOv2/v3; clamped so an
    untrained head cannot give inf boxes), or YOLOv5's ``(2σ(t))²``, bounded to (0, 4): the anchor-ratio matching
    (``anchor_t = 4``) never asks for more, and no exp can blow up its gradients."""
    if bounded_size:
        return (2 * raw_wh.sigmoid()).square()
    return raw_wh.clamp(max=_MAX_LOG_SCALE).exp()


def decode_anchor_boxes(raw: torch.Tensor, anchors: torch.Tensor, image_size: tuple[int, int],
                        xy_scale: float = 1.0, bounded_size: bool = False) -> torch.Tensor:
    """YOLOv2/v3 direct location prediction → absolute xyxy.

    ``raw: Tensor[N, A, H, W, 4]`` holds the raw ``(tx, ty, tw, th)`` of ``A`` anchors on an H×W grid, and
    ``anchors: Tensor[A, 2]`` their (w, h) in pixels. The stride is ``image_size / grid`` per axis, so any input
    size works (multi-scale training). ``xy_scale``: see :func:`anchor_cell_offsets`; ``bounded_size``: see
    :func:`anchor_size_scales` (YOLOv5: ``xy_scale=2, bounded_size=True``). Returns Tensor[N, A, H, W, 4].
    """
    grid_h, grid_w = raw.shape[-3], raw.shape[-2]
    stride_y, stride_x = image_size[0] / grid_h, image_size[1] / grid_w
    cols, rows = _cell_grid(grid_h, grid_w, raw.device, raw.dtype)
    offsets = anchor_cell_offsets(raw[..., :2], xy_scale)
    cx = (offsets[..., 0] + cols) * stride_x
    cy = (offsets[..., 1] + rows) * stride_y
    anchor_w = anchors[:, 0].view(-1, 1, 1).to(raw)
    anchor_h = anchors[:, 1].view(-1, 1, 1).to(raw)
    scales = anchor_size_scales(raw[..., 2:4], bounded_size)
    w = anchor_w * scales[..., 0]
    h = anchor_h * scales[..., 1]
    return box_convert(torch.stack((cx, cy, w, h), -1), "cxcywh", "xyxy")


def grid_points(grid_sizes: list[tuple[int, int]], image_size: tuple[int, int], device=None,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell centres of every level, finest first as given: (points ``Tensor[P, 2]`` (x, y) pixels, strides
    ``Tensor[P, 2]`` (x, y) pixels per cell) over the ``P = Σ H_l·W_l`` cells, row-major within a level. A level's
    stride is ``image_size / grid`` per axis, so any input size works."""
    points, strides = [], []
    for grid_h, grid_w in grid_sizes:
        stride = torch.tensor([image_size[1] / grid_w, image_size[0] / grid_h], device=device, dtype=dtype)
        cols, rows = _cell_grid(grid_h, grid_w, device, dtype)
        points.append((torch.stack((cols, rows), -1).reshape(-1, 2) + 0.5) * stride)
        strides.append(stride.expand(grid_h * grid_w, 2))
    return torch.cat(points), torch.cat(strides)


def flatten_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """Dense per-level maps ``Tensor[N, K, H_l, W_l]`` → ``Tensor[N, P, K]``, the cells in :func:`grid_points`'
    order."""
    return torch.cat([level.flatten(2) for level in levels], 2).transpose(1, 2)


def decode_distance_boxes(distances: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Anchor-free boxes (YOLOv6's ``dist2bbox``) → absolute xyxy: ``distances: Tensor[..., P, 4]`` are the
    distances ``(l, t, r, b)`` from each point ``Tensor[P, 2]`` to the box's sides in units of its stride
    ``Tensor[P, 2]``; the box is ``(x − l·s_x, y − t·s_y, x + r·s_x, y + b·s_y)``. Returns Tensor[..., P, 4]."""
    return torch.cat((points - distances[..., :2] * strides, points + distances[..., 2:] * strides), -1)


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: tuple[int, int],
    conf_thresh: float = 0.001,
    iou_thresh: float = 0.45,
    max_det: int = 300,
    pre_nms_topk: int = 10_000,
    multi_label: bool = True,
) -> dict[str, torch.Tensor]:
    """One image: clip, keep (box, class) pairs scoring above ``conf_thresh``, class-wise NMS, best ``max_det``.

    Args:
        boxes: Tensor[K, 4] xyxy pixels, or Tensor[K, C, 4]: a box per class (the R-CNN family's class-specific
            box regression).
        scores: Tensor[K, C], the class-specific confidence (YOLO: objectness × class probability).
        multi_label: a box may be kept once per class scoring above the threshold (as Darknet's evaluation);
            False keeps only each box's best class.
        pre_nms_topk: only the highest-scoring pairs enter NMS, which bounds its cost for untrained models.

    Returns dict(boxes=Tensor[D, 4], scores=Tensor[D], labels=Tensor[D] int64), sorted by decreasing score.
    """
    boxes = clip_boxes_to_image(boxes, image_size)
    if multi_label:
        box_index, labels = (scores > conf_thresh).nonzero(as_tuple=True)
        kept_scores = scores[box_index, labels]
    else:
        kept_scores, labels = scores.max(dim=1)
        box_index = (kept_scores > conf_thresh).nonzero(as_tuple=True)[0]
        kept_scores, labels = kept_scores[box_index], labels[box_index]
    if kept_scores.numel() > pre_nms_topk:
        kept_scores, top = kept_scores.topk(pre_nms_topk)
        box_index, labels = box_index[top], labels[top]
    kept_boxes = boxes[box_index, labels] if boxes.ndim == 3 else boxes[box_index]
    keep = batched_nms(kept_boxes, kept_scores, labels, iou_thresh)[:max_det]
    return dict(boxes=kept_boxes[keep], scores=kept_scores[keep], labels=labels[keep].long())


class DetectionPostprocess(nn.Module):
    """Batched :func:`select_detections` with its thresholds as attributes (change them at predict time, e.g.
    ``model.postprocess.conf_thresh = 0.25``); the defaults suit mAP evaluation.

    ``forward(boxes: Tensor[N, K, 4], scores: Tensor[N, K, C], image_size=(H, W)) -> list[dict]`` (one per image).
    """

    def __init__(self, conf_thresh: float = 0.001, iou_thresh: float = 0.45, max_det: int = 300,
                 pre_nms_topk: int = 10_000, multi_label: bool = True):
        super().__init__()
        self.conf_thresh = conf_thresh
        self.iou_thresh = iou_thresh
        self.max_det = max_det
        self.pre_nms_topk = pre_nms_topk
        self.multi_label = multi_label

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor,
                image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        return [
            select_detections(image_boxes, image_scores, image_size, self.conf_thresh, self.iou_thresh, self.max_det,
                              self.pre_nms_topk, self.multi_label)
            for image_boxes, image_scores in zip(boxes, scores)
        ]

    def extra_repr(self) -> str:
        return (f"conf_thresh={self.conf_thresh}, iou_thresh={self.iou_thresh}, max_det={self.max_det}, "
                f"pre_nms_topk={self.pre_nms_topk}, multi_label={self.multi_label}")
