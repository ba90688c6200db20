"""`cvlab anchors data=... [model=yolov3] [n=9]`: anchor shapes for a dataset, and ``model.anchors=auto``.

YOLOv2's "dimension clusters" (Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017, §2): k-means over
the widths and heights of the training boxes with the distance ``1 - IoU`` (:func:`cvlab.ops.anchors.kmeans_anchors`).
The boxes are measured as the model sees them — letterboxed to ``data.img_size``, before augmentation — because a
model's anchors are pixels at its input size. The command prints the clustered anchors and their mean best IoU beside
the model's hand-picked ones (its released anchors scaled to the input size) and the override that trains with them.

The number of anchors (and the hand-picked set) comes from the model itself: it is built on the ``meta`` device, which
allocates no weights, and its ``anchors`` buffer is read.
"""
from __future__ import annotations

import PIL.Image
import torch
from omegaconf import DictConfig
from torch import Tensor

from cvlab.utils.console import console
from cvlab.utils.errors import UserError


def box_sizes(dataset, img_size: int) -> Tensor:
    """``Tensor[M, 2]`` (width, height) of every box of a :class:`~cvlab.data.detection.DetectionDataset`, in pixels
    of its images letterboxed to ``img_size``. File datasets read only the image headers."""
    from cvlab.data.detection import letterbox_geometry

    records = getattr(dataset, "records", None)
    sizes = []
    for index in range(len(dataset)):
        if records is not None:
            boxes = torch.from_numpy(records[index].boxes)
            with PIL.Image.open(records[index].path) as image:
                width, height = image.size
        else:
            image, boxes, _, _ = dataset.load(index)
            height, width = image.shape[-2:]
        scale = letterbox_geometry(int(height), int(width), img_size)[0]
        sizes.append((boxes[:, 2:] - boxes[:, :2]) * scale)
    return torch.cat(sizes) if sizes else torch.zeros(0, 2)


def model_anchors(model_cfg: dict, num_classes: int, img_size: int) -> Tensor | None:
    """The model's own anchors ``Tensor[K, 2]`` (pixels at ``img_size``), or None for a model without anchors
    (YOLOv1, classifiers). A ``model_cfg["anchors"]`` entry is ignored: this is the model's default set."""
    from cvlab.models import create_model
    from cvlab.tasks.base import MODEL_META_KEYS

    kwargs = {k: v for k, v in model_cfg.items() if k not in (*MODEL_META_KEYS, "anchors")}
    with torch.device("meta"):
        model = create_model(model_cfg["name"], num_classes=num_classes, img_size=img_size, **kwargs)
    anchors = getattr(model, "anchors", None)
    return anchors.float() if isinstance(anchors, Tensor) else None


def cluster_anchors(wh: Tensor, k: int, seed: int) -> tuple[Tensor, float]:
    """:func:`~cvlab.ops.anchors.kmeans_anchors` of box sizes ``Tensor[M, 2]``, or a UserError for too few boxes."""
    from cvlab.ops.anchors import kmeans_anchors

    if len(wh) < k:
        raise UserError(f"the training set has {len(wh)} boxes, too few to cluster into {k} anchors")
    return kmeans_anchors(wh, k, seed=seed)


def auto_anchors(model_cfg: dict, train_set, data_info: dict, seed: int) -> list[list[float]]:
    """``model.anchors=auto``: as many k-means anchors as the model has by default, from the training boxes, as a
    plain list (so the checkpoint stores the concrete anchors)."""
    default = model_anchors(model_cfg, data_info["num_classes"], data_info["image_size"])
    if default is None:
        raise UserError(f"model {model_cfg['name']} has no anchors; model.anchors=auto needs YOLOv2 or YOLOv3")
    anchors, iou = cluster_anchors(box_sizes(train_set, data_info["image_size"]), len(default), seed)
    console.print(f"model.anchors=auto: {len(anchors)} k-means anchors (mean best IoU {iou:.3f}): "
                  f"{anchors_override(anchors).partition('=')[2]}", highlight=False, soft_wrap=True)
    return anchors.tolist()


def anchors_override(anchors: Tensor) -> str:
    """The command-line override that trains with ``anchors``: ``model.anchors=[[w,h],...]`` (quote it in a shell)."""
    return "model.anchors=[" + ",".join(f"[{w:.1f},{h:.1f}]" for w, h in anchors.tolist()) + "]"


def run_anchors(cfg: DictConfig) -> dict:
    """Clusters ``cfg.n`` anchors (default: the model's count) and prints them beside the model's own."""
    from rich.table import Table

    from cvlab.ops.anchors import mean_best_iou
    from cvlab.run.common import to_plain
    from cvlab.run.train import build_datamodule

    datamodule = build_datamodule(cfg)
    info = datamodule.info
    size = info["image_size"]
    default = model_anchors(to_plain(cfg.model), info["num_classes"], size)
    k = cfg.n if cfg.n is not None else (len(default) if default is not None else None)
    if k is None:
        raise UserError(f"model {cfg.model.name} has no anchors to compare with; give the number: n=9")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"n expects a positive integer, got {k!r}")
    wh = box_sizes(datamodule.train_set, size)
    anchors, iou = cluster_anchors(wh, k, cfg.seed)
    default_iou = mean_best_iou(wh, default) if default is not None else None

    table = Table(title=f"anchors (w x h px at {size}) for {cfg.data.name}: {len(datamodule.train_set)} training "
                        f"images", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column(f"k-means (k={k})", justify="right")
    if default is not None:
        table.add_column(f"{cfg.model.name} default", justify="right")
    for i in range(max(k, len(default) if default is not None else 0)):
        row = [str(i), f"{anchors[i, 0]:.1f} x {anchors[i, 1]:.1f}" if i < k else ""]
        if default is not None:
            row.append(f"{default[i, 0]:.1f} x {default[i, 1]:.1f}" if i < len(default) else "")
        table.add_row(*row)
    table.add_row("mean best IoU", f"{iou:.4f}", *([f"{default_iou:.4f}"] if default is not None else []))
    console.print(table)
    console.print(f"train with them: '{anchors_override(anchors)}' (or model.anchors=auto)", highlight=False,
                  soft_wrap=True)
    return {"anchors": anchors, "mean_iou": iou, "default_anchors": default, "default_mean_iou": default_iou}
