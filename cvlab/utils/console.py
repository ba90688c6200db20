"""Console output shared by the commands: the config tree, metric tables, error and warning lines (rich)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """The one line a user sees for bad input."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """A setting that works but is known to train poorly: one line, with the override that fixes it."""
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def config_tree(cfg, title: str = "config") -> Tree:
    from omegaconf import OmegaConf

    tree = Tree(f"[bold]{title}")

    def add(node: Tree, value: dict) -> None:
        for key, child in value.items():
            if isinstance(child, dict):
                add(node.add(f"[cyan]{key}"), child)
            else:
                node.add(f"[cyan]{key}[/]: {'null' if child is None else child}")

    add(tree, OmegaConf.to_container(cfg, resolve=True))
    return tree


def metrics_table(metrics: dict, title: str = "results", columns: tuple[str, str] = ("metric", "value")) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def split_metrics_table(metrics: dict, title: str = "results", splits: tuple[str, ...] = ("val", "test")) -> Table:
    """The metrics of each split side by side (``val/acc`` and ``test/acc`` on one row); the other entries (epochs,
    time, parameters, ...) go in the caption."""
    names = list(dict.fromkeys(key.partition("/")[2] for key in metrics if key.partition("/")[0] in splits))
    present = [split for split in splits if any(f"{split}/{name}" in metrics for name in names)]
    table = Table(title=title, title_justify="left", caption_justify="left", min_width=len(title) + 4)
    table.add_column("metric")
    for split in present:
        table.add_column(split, justify="right")
    for name in names:
        values = (metrics.get(f"{split}/{name}") for split in present)
        table.add_row(name, *(f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v) for v in values))
    others = {key: value for key, value in metrics.items() if key.partition("/")[0] not in splits or "/" not in key}
    table.caption = "  ".join(f"{key} {f'{value:,}' if isinstance(value, int) else value}"
                              for key, value in others.items())
    return table


def class_ap_table(ap50_per_class: dict[str, float], ap_per_class: dict[str, float]) -> Table:
    """Detection's per-class table: AP@0.5 and AP@[.5:.95] for every class with ground truth."""
    table = Table(title="AP per class", title_justify="left")
    table.add_column("class")
    table.add_column("AP@0.5", justify="right")
    table.add_column("AP@[.5:.95]", justify="right")
    for name, ap50 in ap50_per_class.items():
        table.add_row(name, f"{ap50:.4f}", f"{ap_per_class[name]:.4f}")
    return table


def class_iou_table(class_names: list[str], iou: list[float | None], acc: list[float | None],
                    pixels: list[int]) -> Table:
    """Segmentation's per-class table: IoU, accuracy (recall) and the true pixels of every class; "-" where a figure
    is undefined (a class the evaluated data never shows, or shows nowhere in the truth)."""
    table = Table(title="IoU per class", title_justify="left")
    table.add_column("class")
    for column in ("IoU", "acc", "pixels"):
        table.add_column(column, justify="right")
    for name, class_iou, class_acc, count in zip(class_names, iou, acc, pixels):
        table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in (class_iou, class_acc)), f"{count:,}")
    return table


def class_recall_table(class_names: list[str], recall: list[float | None], images: list[int], title: str,
                       train_counts: list[int] | None = None, groups: dict[str, list[int]] | None = None) -> Table:
    """Classification's per-class table: each class's recall and images on the evaluated split ("-" where it shows
    none of the class), beside its training images when known and its frequency group (many / medium / few) when
    the training counts are long-tailed."""
    group_of = {index: name for name, classes in (groups or {}).items() for index in classes}
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    if train_counts:
        table.add_column("train images", justify="right")
    if group_of:
        table.add_column("group")
    table.add_column("recall", justify="right")
    table.add_column("images", justify="right")
    for index, (name, class_recall, count) in enumerate(zip(class_names, recall, images)):
        cells = [f"{train_counts[index]:,}"] if train_counts else []
        cells += [group_of.get(index, "")] if group_of else []
        table.add_row(name, *cells, "-" if class_recall is None else f"{class_recall:.4f}", f"{count:,}")
    return table


def fail(message: str, code: int = 2):
    print_error(message)
    sys.exit(code)
