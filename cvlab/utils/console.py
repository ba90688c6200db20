"""Console output shared by the commands: the config tree, metric tables, error lines (rich)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """The one line a user sees for bad input."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


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


def class_ap_table(ap50_per_class: dict[str, float], ap_per_class: dict[str, float]) -> Table:
    """Detection's per-class table: AP@0.5 and AP@[.5:.95] for every class with ground truth."""
    table = Table(title="AP per class", title_justify="left")
    table.add_column("class")
    table.add_column("AP@0.5", justify="right")
    table.add_column("AP@[.5:.95]", justify="right")
    for name, ap50 in ap50_per_class.items():
        table.add_row(name, f"{ap50:.4f}", f"{ap_per_class[name]:.4f}")
    return table


def fail(message: str, code: int = 2):
    print_error(message)
    sys.exit(code)
