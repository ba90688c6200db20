"""Training targets of the R-CNN family: which object each anchor / proposal stands for, and which are sampled.

Papers:
    Girshick 2015, "Fast R-CNN" (§2.3: RoIs with IoU ≥ 0.5 are foreground, those with their best IoU in [0.1, 0.5)
    background; mini-batches of 25 % foreground).
    Ren et al. 2015, "Faster R-CNN" (§3.1.2: anchors with IoU > 0.7 are positive, and so is, for each object, the
    anchor of highest IoU with it; below 0.3 negative; 256 anchors per image, up to half positive).

:class:`IoUMatcher` labels each candidate box foreground / background / ignored from its best IoU
(``torchvision.ops.box_iou``); :func:`sample_balanced` draws the mini-batch. Written here because torchvision's
``Matcher`` and ``BalancedPositiveNegativeSampler`` live in ``torchvision.models.detection._utils``, which cvlab's
models do not import; the rules (including which anchors count as an object's best, ties included) are the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

FOREGROUND, BACKGROUND, IGNORED = 1, 0, -1


@dataclass
class Match:
    """Per candidate box: ``index`` (``Tensor[K]`` int64) of the object it is matched to (its best IoU; 0 when the
    image has none) and ``kind`` (``Tensor[K]`` int64: ``FOREGROUND`` 1, ``BACKGROUND`` 0, ``IGNORED`` -1)."""

    index: torch.Tensor
    kind: torch.Tensor


class IoUMatcher:
    """Labels candidate boxes by their best IoU with the objects of an image.

    Foreground: IoU ≥ ``fg_iou``; background: ``bg_iou[0]`` ≤ IoU < ``bg_iou[1]``; the rest are ignored. With
    ``allow_low_quality``, every candidate whose IoU with some object equals that object's best (ties included) is
    foreground too, so no object is left without one (Faster R-CNN's RPN rule). In an image without objects every
    candidate is background (its IoU with nothing is 0, and there is nothing to be foreground for), whatever
    ``bg_iou[0]`` is.

    Settings: Faster R-CNN's RPN ``IoUMatcher(0.7, (0.0, 0.3), True)``; its RoI head ``IoUMatcher(0.5, (0.0, 0.5))``;
    Fast R-CNN ``IoUMatcher(0.5, (0.1, 0.5))``.
    """

    def __init__(self, fg_iou: float, bg_iou: tuple[float, float], allow_low_quality: bool = False):
        low, high = (float(v) for v in bg_iou)
        if not 0.0 <= low <= high <= fg_iou <= 1.0:
            raise ValueError(f"need 0 <= bg_iou[0] <= bg_iou[1] <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        self.fg_iou, self.bg_iou, self.allow_low_quality = float(fg_iou), (low, high), allow_low_quality

    def __call__(self, boxes: torch.Tensor, objects: torch.Tensor) -> Match:
        """``boxes: Tensor[K, 4]`` candidates and ``objects: Tensor[M, 4]``, xyxy."""
        if len(objects) == 0:
            zeros = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            return Match(zeros, zeros + BACKGROUND)
        iou = box_iou(objects, boxes)  # Tensor[M, K]
        best_iou, index = iou.max(dim=0)
        kind = torch.full_like(index, IGNORED)
        kind[(best_iou >= self.bg_iou[0]) & (best_iou < self.bg_iou[1])] = BACKGROUND
        kind[best_iou >= self.fg_iou] = FOREGROUND
        if self.allow_low_quality:
            best_for_object = iou.max(dim=1, keepdim=True).values
            kind[(iou == best_for_object).any(dim=0)] = FOREGROUND
        return Match(index, kind)


def sample_balanced(kind: torch.Tensor, batch_size: int, positive_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's mini-batch: up to ``batch_size · positive_fraction`` foreground candidates drawn at random, and
    background ones to fill ``batch_size`` as far as there are any (torch's global generator: seeded runs replay).

    ``kind: Tensor[K]`` as :class:`Match` gives it. Returns the indices of the sampled foreground and background
    candidates (``Tensor[P]``, ``Tensor[B]``, int64).
    """
    positive = torch.where(kind == FOREGROUND)[0]
    negative = torch.where(kind == BACKGROUND)[0]
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    positive = positive[torch.randperm(positive.numel(), device=kind.device)[:num_pos]]
    negative = negative[torch.randperm(negative.numel(), device=kind.device)[:num_neg]]
    return positive, negative


def objects_with_area(target: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """An image's objects that have an area: (``boxes Tensor[M, 4]`` float32 xyxy, ``labels Tensor[M]`` int64, 0-based).
    A box without area cannot be regressed to (its log-size target is infinite)."""
    boxes = target["boxes"].reshape(-1, 4).to(device, torch.float32)
    labels = target["labels"].reshape(-1).to(device, torch.long)
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[has_area], labels[has_area]
