"""`cvlab anchors data=... [model=yolov3] [n=9]`: k-means anchor shapes for a dataset beside the model's own.

The clustering and the box measurement are :mod:`cvlab.tasks.anchors` (YOLOv2's dimension clusters, boxes as the
model sees them, letterboxed to ``data.image_size``); this command prints the clustered anchors and their mean best
IoU beside the model's hand-picked ones (its released anchors scaled to the input size) and the override that trains
with them. ``model.anchors=auto`` does the same inside training.
"""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.engine import anchors, build_datamodule, to_plain
from cvlab.utils.console import console
from cvlab.utils.errors import UserError


def run_anchors(cfg: DictConfig) -> dict:
    """Clusters ``cfg.n`` anchors (default: the model's count) and prints them beside the model's own."""
    from rich.table import Table

    datamodule = build_datamodule(cfg)
    info = datamodule.info
    size = info.image_size
    default = anchors.model_anchors(to_plain(cfg.model), info.num_classes, size)
    k = cfg.n if cfg.n is not None else (len(default) if default is not None else None)
    if k is None:
        raise UserError(f"model {cfg.model.name} has no anchors to compare with; give the number: n=9")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"n expects a positive integer, got {k!r}")
    wh = anchors.box_sizes(datamodule.train_set, size)
    clustered, iou = anchors.cluster_anchors(wh, k, cfg.seed)
    default_iou = anchors.mean_best_iou(wh, default) if default is not None else None

    table = Table(title=f"anchors (w x h px at {size}) for {cfg.data.name}: {len(datamodule.train_set)} training "
                        f"images", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column(f"k-means (k={k})", justify="right")
    if default is not None:
        table.add_column(f"{cfg.model.name} default", justify="right")
    for i in range(max(k, len(default) if default is not None else 0)):
        row = [str(i), f"{clustered[i, 0]:.1f} x {clustered[i, 1]:.1f}" if i < k else ""]
        if default is not None:
            row.append(f"{default[i, 0]:.1f} x {default[i, 1]:.1f}" if i < len(default) else "")
        table.add_row(*row)
    table.add_row("mean best IoU", f"{iou:.4f}", *([f"{default_iou:.4f}"] if default is not None else []))
    console.print(table)
    console.print(f"train with them: '{anchors.anchors_override(clustered)}' (or model.anchors=auto)", highlight=False,
                  soft_wrap=True)
    return {"anchors": clustered, "mean_iou": iou, "default_anchors": default, "default_mean_iou": default_iou}
