"""Hydra callback: at the end of a multirun (`cvlab sweep`), rank the jobs by the task's main metric."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def collect(sweep_dir: Path) -> list[dict]:
    """One row per finished job: its overrides, its metrics.json (jobs that failed have none)."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        metrics_path = job / "metrics.json"
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else []
        row = {"job": int(job.name), "overrides": [str(o) for o in overrides]}
        if metrics_path.exists():
            row.update(json.loads(metrics_path.read_text()))
        else:
            row["status"] = "failed"
        rows.append(row)
    # Show what differs between jobs; the overrides every job shares say nothing about the ranking.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in shared)
    return rows


def rank(rows: list[dict], monitor: str, mode: str) -> list[dict]:
    worst = float("-inf") if mode == "max" else float("inf")
    return sorted(rows, key=lambda r: r.get(monitor, worst), reverse=(mode == "max"))


def write_leaderboard(sweep_dir: Path, monitor: str, mode: str) -> list[dict]:
    from rich.table import Table

    from cvlab.utils.console import console

    rows = rank(collect(sweep_dir), monitor, mode)
    if not rows:
        return rows
    columns = ["rank", "job", "overrides", monitor] + sorted(
        {k for r in rows for k in r if isinstance(r.get(k), (int, float)) and k not in (monitor, "job", "params")}
    )
    with (sweep_dir / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for position, row in enumerate(rows, 1):
            writer.writerow({"rank": position, **row})
    table = Table(title=f"leaderboard ({monitor}, {'higher' if mode == 'max' else 'lower'} is better)",
                  title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "overrides" else "right")
    for position, row in enumerate(rows, 1):
        table.add_row(*(_cell(row, c, position) for c in columns))
    console.print(table)
    console.print(f"[bold]leaderboard:[/] {sweep_dir / 'leaderboard.csv'}", highlight=False)
    return rows


def _cell(row: dict, column: str, position: int) -> str:
    if column == "rank":
        return str(position)
    value = row.get(column, row.get("status", "") if column not in ("job", "overrides") else "")
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class LeaderboardCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            write_leaderboard(sweep_dir, config.task.monitor, config.task.mode)
