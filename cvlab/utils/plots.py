"""PNG plots written into run directories (matplotlib, Agg backend: no screen needed)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path,
                          title: str = "confusion matrix") -> None:
    """Rows are true classes, columns predictions; cells show counts, colour shows the row-normalised rate."""
    plt = _pyplot()
    n = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    # Labelled cells up to 30 classes (15.5 in); beyond, the colour map alone, capped (1000 classes would be 45,000 px)
    size = min(max(4.0, 0.45 * n + 2), 16.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(results_csv: Path, path: Path) -> None:
    """One panel per metric family (loss, acc, ...) against epoch, train and val together, five panels a row."""
    if not results_csv.exists():
        return
    with results_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in rows]
    families: dict[str, list[str]] = {}
    for key in rows[0]:
        if "/" in key:
            families.setdefault(key.split("/", 1)[1], []).append(key)
    families["lr"] = ["lr"]
    # At most five panels a row: detection logs ten families, which in one row would be unreadably wide.
    columns = min(len(families), 5)
    rows_of_panels = -(-len(families) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4 * columns, 3.2 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    for ax, (family, keys) in zip(axes.flat, families.items()):
        for key in keys:
            values = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]
            ax.plot(epochs, values, marker="o", label=key)
        ax.set_title(family)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(curves: dict[str, dict], path: Path) -> None:
    """Precision against recall at IoU 0.5, one line per class (COCOeval's 101-point interpolated curves), each
    labelled with its AP@0.5, the mean of its curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], label=f"{name} (AP@0.5 {curve['precision'].mean():.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall at IoU 0.5")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc_curves(curves: dict[str, dict], path: Path, title: str = "ROC curve") -> None:
    """True-positive against false-positive rate, one line per entry (``{"val": {"fpr", "tpr", "auroc"}}``), each
    labelled with its AUROC, over the diagonal of a score that knows nothing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUROC {curve['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mask_overlays(rows: list[tuple[np.ndarray, ...]], class_names: list[str], palette: list[tuple[int, int, int]],
                       path: Path, titles: tuple[str, ...] = ("image", "truth", "prediction")) -> None:
    """One row of panels per image (uint8 ``H x W x 3`` arrays: the image, then its masks drawn over it), titled
    once, above a legend of the class colours (the first 30 classes, six a row)."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    legend = [Patch(color=np.asarray(colour) / 255, label=name) for name, colour in zip(class_names[:30], palette)]
    legend_height = 0.25 * -(-len(legend) // 6) + 0.1  # inches
    columns = len(titles)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.4 * len(rows) + legend_height),
                             squeeze=False)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- image grids
# Grid tiles are enlarged (nearest) to at least this side, so 8-32 px samples stay visible; and the padding between.
MIN_TILE = 64
GRID_PADDING = 2


def uint8_images(images):
    """Images ``Tensor[N, C, H, W]`` in [-1, 1] (a generator's range) as uint8 ``Tensor[N, C, H, W]`` on the CPU."""
    import torch

    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_image_grid(images, path: Path, nrow: int) -> None:
    """A PNG of ``images`` (``Tensor[N, C, H, W]`` in [-1, 1]) in rows of ``nrow``, each enlarged (nearest) to at
    least :data:`MIN_TILE` px, :data:`GRID_PADDING` px of white between and around them (torchvision's make_grid).
    :func:`grid_row` reads a row back."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    scale = max(1, -(-MIN_TILE // images.shape[-1]))
    tiles = uint8_images(images).float() / 255
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(F.interpolate(tiles, scale_factor=scale, mode="nearest"), path, nrow=nrow, padding=GRID_PADDING,
               pad_value=1.0)


def grid_row(path: Path, rows: int, row: int = 0) -> np.ndarray:
    """Row ``row`` (with the padding above and below it) of a grid that :func:`save_image_grid` wrote with ``rows``
    rows: ``uint8 H x W x 3``."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    tile = (pixels.shape[0] - GRID_PADDING) // rows - GRID_PADDING
    top = row * (tile + GRID_PADDING)
    return pixels[top:top + tile + 2 * GRID_PADDING]


def plot_image_table(cells: list[list], path: Path, row_labels: list[str] | None = None,
                     column_labels: list[str] | None = None, title: str | None = None) -> None:
    """A table of images: ``cells[r][c]`` is an ``H x W`` (grey) or ``H x W x 3`` uint8 array, or None for an empty
    cell; rows and columns optionally labelled (truncation sweeps, style-mixing grids, progression strips)."""
    plt = _pyplot()
    rows, columns = len(cells), max(len(row) for row in cells)
    widths = [max((cells[r][c].shape[1] / cells[r][c].shape[0] for r in range(rows)
                   if c < len(cells[r]) and cells[r][c] is not None), default=1.0) for c in range(columns)]
    side = 1.1 if columns * rows <= 64 else 0.8  # inches a square panel takes
    fig, axes = plt.subplots(rows, columns, squeeze=False, gridspec_kw={"width_ratios": widths},
                             figsize=(side * sum(widths) + (0.9 if row_labels else 0.2),
                                      side * rows + (0.4 if column_labels else 0.1) + (0.4 if title else 0)))
    for r in range(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = cells[r][c] if c < len(cells[r]) else None
            if cell is None:
                ax.axis("off")
            else:
                ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            if column_labels and r == 0:
                ax.set_title(column_labels[c], fontsize=8)
            if row_labels and c == 0:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(cell is not None)
                ax.set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
