"""Box operations torchvision lacks: the IoU of corresponding boxes (``torchvision.ops.box_iou`` gives all pairs)."""
from __future__ import annotations

import torch


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding rows: Tensor[..., 4] xyxy × Tensor[..., 4] (broadcast) → Tensor[...]."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).eps)
