"""The R-CNN box parameterisation: a box as offsets of its centre and log-ratios of its size to a reference box.

Paper: Girshick et al. 2014, "Rich feature hierarchies for accurate object detection and semantic segmentation"
(R-CNN, Appendix C): for a reference (proposal or anchor) box ``P`` and a box ``G``,
``t_x = (G_x − P_x) / P_w``, ``t_y = (G_y − P_y) / P_h``, ``t_w = log(G_w / P_w)``, ``t_h = log(G_h / P_h)``
(centres and sizes). Fast R-CNN regresses these targets normalised to zero mean and standard deviations
(0.1, 0.1, 0.2, 0.2), which is the same as multiplying them by ``weights`` (10, 10, 5, 5); Faster R-CNN's RPN uses
them unweighted (1, 1, 1, 1).

Written here because torchvision's ``BoxCoder`` lives in ``torchvision.models.detection._utils``, which cvlab's
models do not import; the arithmetic is the same, step for step, so decoded boxes agree bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The largest log-scale a decoded box may take: no box grows past 1000/16 times its reference (torchvision's bound),
# so an untrained regressor cannot overflow exp().
MAX_LOG_SCALE = math.log(1000.0 / 16)


class BoxCoder:
    """``encode(boxes, references) -> Tensor[..., 4]`` targets and ``decode(deltas, references) -> Tensor[..., 4]``
    boxes, all xyxy in pixels; ``weights`` = (w_x, w_y, w_w, w_h) multiply the four targets."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), max_log_scale: float = MAX_LOG_SCALE):
        self.weights = tuple(float(w) for w in weights)
        self.max_log_scale = max_log_scale

    def encode(self, boxes: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Regression targets of ``boxes`` relative to ``references`` (``Tensor[..., 4]`` each, broadcast)."""
        wx, wy, ww, wh = self.weights
        ref_w = references[..., 2] - references[..., 0]
        ref_h = references[..., 3] - references[..., 1]
        ref_cx = references[..., 0] + 0.5 * ref_w
        ref_cy = references[..., 1] + 0.5 * ref_h
        box_w = boxes[..., 2] - boxes[..., 0]
        box_h = boxes[..., 3] - boxes[..., 1]
        box_cx = boxes[..., 0] + 0.5 * box_w
        box_cy = boxes[..., 1] + 0.5 * box_h
        return torch.stack((wx * (box_cx - ref_cx) / ref_w, wy * (box_cy - ref_cy) / ref_h,
                            ww * torch.log(box_w / ref_w), wh * torch.log(box_h / ref_h)), dim=-1)

    def decode(self, deltas: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes from ``deltas: Tensor[..., 4]`` applied to ``references: Tensor[..., 4]`` (broadcast; e.g.
        ``Tensor[R, K, 4]`` per-class deltas on ``Tensor[R, 1, 4]`` proposals)."""
        references = references.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = references[..., 2] - references[..., 0]
        ref_h = references[..., 3] - references[..., 1]
        ref_cx = references[..., 0] + 0.5 * ref_w
        ref_cy = references[..., 1] + 0.5 * ref_h
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.max_log_scale)
        dh = (deltas[..., 3] / wh).clamp(max=self.max_log_scale)
        cx = dx * ref_w + ref_cx
        cy = dy * ref_h + ref_cy
        half_w = 0.5 * (torch.exp(dw) * ref_w)
        half_h = 0.5 * (torch.exp(dh) * ref_h)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
