"""Anchor shapes from data: k-means "dimension clusters" with an IoU distance.

YOLOv2 (Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017, §2 "Dimension Clusters") picks its
anchor widths and heights by k-means over the training boxes with the distance ``d(box, centroid) = 1 - IoU``,
where box and centroid are compared as if they shared a corner — only their sizes matter. Euclidean k-means
would let large boxes dominate; the IoU distance is scale-free. YOLOv3 uses the same procedure for its nine
anchors.

Hand-written: scikit-learn's and scipy's k-means only take Euclidean distances. Details chosen here:
k-means++ seeding under the IoU distance (one centroid per true cluster far more often than uniform seeding),
centroids updated to the per-cluster *median* width and height (robust to outlier boxes, and unbiased for
multiplicative size noise), and an emptied cluster re-seeded at the box worst served by the current anchors.
"""
from __future__ import annotations

import torch
from torch import Tensor


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of ``Tensor[M, 2]`` and ``Tensor[K, 2]`` (width, height) pairs aligned at a shared corner:
    ``min(w) min(h) / (w1 h1 + w2 h2 - min(w) min(h))``. Returns ``Tensor[M, K]``."""
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    return inter / (wh1.prod(1)[:, None] + wh2.prod(1)[None, :] - inter)


def mean_best_iou(wh: Tensor, anchors: Tensor) -> float:
    """Mean over boxes ``Tensor[M, 2]`` of the IoU with their best-fitting anchor ``Tensor[K, 2]`` (YOLOv2's
    "Avg IOU", the score to compare anchor sets by)."""
    return wh_iou(wh.double(), anchors.double()).amax(1).mean().item()


def _kmeans_pp_init(wh: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++: each next centroid is a box drawn with probability proportional to its squared distance."""
    centroids = wh[torch.randint(len(wh), (1,), generator=generator)]
    for _ in range(1, k):
        distance = 1 - wh_iou(wh, centroids).amax(1)
        weights = distance.square()
        if weights.sum() <= 0:  # fewer distinct sizes than k: any box will do
            weights = torch.ones_like(weights)
        centroids = torch.cat([centroids, wh[torch.multinomial(weights, 1, generator=generator)]])
    return centroids


def kmeans_anchors(wh: Tensor, k: int, seed: int = 0, iters: int = 300) -> tuple[Tensor, float]:
    """Cluster box sizes into ``k`` anchors with the ``1 - IoU`` distance.

    Args:
        wh: ``Tensor[M, 2]`` positive box widths and heights (pixels, at the size the model will see).
        k: number of anchors (YOLOv2: 5; YOLOv3: 9, three per scale).
        seed: seeds the k-means++ initialisation.
        iters: at most this many assignment/update rounds; stops early when no box changes cluster.

    Returns:
        ``(anchors Tensor[k, 2] sorted by area, smallest first, mean best IoU of the boxes with them)``.
    """
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh must be Tensor[M, 2], got shape {tuple(wh.shape)}")
    if len(wh) < k:
        raise ValueError(f"need at least k={k} boxes, got {len(wh)}")
    if not bool((wh > 0).all()):
        raise ValueError("every width and height must be positive")
    wh = wh.double()
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp_init(wh, k, generator)
    assignment = None
    for _ in range(iters):
        iou = wh_iou(wh, centroids)
        new_assignment = iou.argmax(1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(k):
            members = wh[assignment == cluster]
            if len(members):
                centroids[cluster] = members.median(0).values
            else:
                centroids[cluster] = wh[iou.amax(1).argmin()]
    anchors = centroids[centroids.prod(1).argsort()].float()
    return anchors, mean_best_iou(wh, anchors)
