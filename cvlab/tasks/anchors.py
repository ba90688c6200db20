"""Anchor shapes from a dataset: the boxes as a model sees them, the model's own anchors, and ``model.anchors=auto``.

YOLOv2's "dimension clusters" (Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017, §2): k-means over
the widths and heights of the training boxes with the distance ``1 - IoU`` (:func:`cvlab.ops.anchors.kmeans_anchors`).
The boxes are measured as the model sees them — letterboxed to ``data.image_size``, before augmentation — because a
model's anchors are pixels at its input size.

The number of anchors (and the hand-picked set) comes from the model itself: it is built on the ``meta`` device, which
allocates no weights, and its ``anchors`` buffer is read.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cvlab.ops.anchors import mean_best_iou
from cvlab.utils.console import console
from cvlab.utils.errors import UserError

__all__ = ["anchors_override", "auto_anchors", "box_sizes", "cluster_anchors", "mean_best_iou", "model_anchors"]


def box_sizes(dataset, image_size: int) -> Tensor:
    """``Tensor[M, 2]`` (width, height) of every box of a detection dataset, in pixels of its images letterboxed to
    ``image_size``. File datasets answer from their annotations, without decoding an image."""
    from cvlab.data.base import letterbox_geometry

    sizes = []
    for index in range(len(dataset)):
        boxes, _, height, width = dataset.annotation(index)
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        scale = letterbox_geometry(int(height), int(width), image_size)[0]
        sizes.append((boxes[:, 2:] - boxes[:, :2]) * scale)
    return torch.cat(sizes) if sizes else torch.zeros(0, 2)


def model_anchors(model_cfg: dict, num_classes: int, image_size: int) -> Tensor | None:
    """The model's own anchors ``Tensor[K, 2]`` (pixels at ``image_size``), or None for a model without anchors
    (YOLOv1, classifiers). A ``model_cfg["anchors"]`` entry is ignored: this is the model's default set."""
    from cvlab.models import create_model
    from cvlab.tasks.base import MODEL_META_KEYS

    kwargs = {k: v for k, v in model_cfg.items() if k not in (*MODEL_META_KEYS, "anchors")}
    with torch.device("meta"):
        model = create_model(model_cfg["name"], num_classes=num_classes, image_size=image_size, **kwargs)
    anchors = getattr(model, "anchors", None)
    return anchors.float() if isinstance(anchors, Tensor) else None


def cluster_anchors(wh: Tensor, k: int, seed: int) -> tuple[Tensor, float]:
    """:func:`~cvlab.ops.anchors.kmeans_anchors` of box sizes ``Tensor[M, 2]``, or a UserError for too few boxes."""
    from cvlab.ops.anchors import kmeans_anchors

    if len(wh) < k:
        raise UserError(f"the training set has {len(wh)} boxes, too few to cluster into {k} anchors")
    return kmeans_anchors(wh, k, seed=seed)


def anchors_override(anchors: Tensor) -> str:
    """The command-line override that trains with ``anchors``: ``model.anchors=[[w,h],...]`` (quote it in a shell)."""
    return "model.anchors=[" + ",".join(f"[{w:.1f},{h:.1f}]" for w, h in anchors.tolist()) + "]"


def auto_anchors(model_cfg: dict, train_set, info, seed: int) -> list[list[float]]:
    """``model.anchors=auto``: as many k-means anchors as the model has by default, from the training boxes, as a
    plain list (so the checkpoint stores the concrete anchors)."""
    default = model_anchors(model_cfg, info.num_classes, info.image_size)
    if default is None:
        raise UserError(f"model {model_cfg['name']} has no anchors; model.anchors=auto needs YOLOv2 or YOLOv3")
    anchors, iou = cluster_anchors(box_sizes(train_set, info.image_size), len(default), seed)
    console.print(f"model.anchors=auto: {len(anchors)} k-means anchors (mean best IoU {iou:.3f}): "
                  f"{anchors_override(anchors).partition('=')[2]}", highlight=False, soft_wrap=True)
    return anchors.tolist()
