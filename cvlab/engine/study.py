"""Controlled comparisons, the engine of ``cvlab study``: settings x seeds, then statistics over the seeds.

A study compares *settings*. Each override given with comma-separated values (``norm=bn,gn,sn``) is an axis, and
a setting takes one value of every axis (their cartesian product, in the order given). Every setting runs with each
of ``study.seeds`` seeds (``seed``, ``seed + 1``, ...). One setting with one seed is a *cell*: an ordinary
``cvlab train`` (or ``cvlab distill``) run in its own directory ``<study>/<cell>/``, with its metrics.json.

What stays fixed across cells is what makes the comparison fair:

- the data split: every cell gets ``data.seed=<split seed>`` (the first seed, or ``data.seed`` when given), which
  cuts the splits and draws generated data;
- the budget and every other override: they are the same command line.

The cell's ``seed`` changes only what it seeds: the model's initialisation and the training order.

The cells run one after another on the engine's stage runner (:func:`~cvlab.engine.stages.run_stages`): a cell
whose ``stage.json`` matches its command line is skipped. So a study run again continues where it stopped:
:func:`study_directory` finds the latest study of the same settings and overrides (the seeds may differ: more seeds
add cells), or ``study.dir=`` names one.

The study ends with one table, one row per setting: the mean ± std over the seeds of the task's main metric on val
and of every test metric, Welch's t-test p-value against the baseline setting (``scipy.stats.ttest_ind`` with
``equal_var=False``: the settings' variances need not be equal), and the rank by the main metric on val (test is
only reported: choosing on it would overstate the winner). ``study.csv`` holds the table (with the confidence
intervals), ``cells.csv`` each cell's figures, and ``study.png`` each seed's point with the mean ± the confidence
interval of the mean (t distribution).

Hand-written: Hydra's sweepers run each combination of overrides once and have no notion of repeated seeds or of
a fixed split; the statistics are scipy's.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cvlab.engine.runs import write_json
from cvlab.engine.stages import Column, Stage, run_stages
from cvlab.utils.console import console
from cvlab.utils.errors import UserError, suggest
from cvlab.utils.rundirs import WEIGHTS_DIR, claim_dir

RECORD = "study.json"  # the study's plan (read to resume it) and, once it ends, its table
SEED_KEYS = ("seed", "data.seed")  # what a study holds or varies itself; neither may be an axis


# ------------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (``ddof=1``; NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def ci_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half the width of the ``confidence`` interval of the mean: ``t_{(1 + c) / 2, n - 1} * s / sqrt(n)`` (Student's
    t distribution, for the few seeds a study has); NaN for fewer than two values."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return math.nan
    return float(t.ppf((1 + confidence) / 2, n - 1) * mean_std(values)[1] / math.sqrt(n))


def welch_p(values: Sequence[float], baseline: Sequence[float]) -> float:
    """The two-sided p-value of Welch's t-test (unequal variances) of ``values`` against ``baseline``; NaN when a
    side has fewer than two values or neither varies (no test is possible)."""
    import warnings

    from scipy.stats import ttest_ind

    if len(values) < 2 or len(baseline) < 2:
        return math.nan
    with warnings.catch_warnings():  # zero variance: scipy warns and answers NaN, which is the answer here
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(values, baseline, equal_var=False).pvalue)


def competition_ranks(scores: Sequence[float], higher_is_better: bool) -> list[int | None]:
    """Rank 1 for the best score; equal scores share a rank and the next one skips (1, 2, 2, 4); NaN gets None."""
    valid = [s for s in scores if not math.isnan(s)]
    return [None if math.isnan(s) else 1 + sum((v > s) if higher_is_better else (v < s) for v in valid)
            for s in scores]


# ------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Axis:
    """An override with several values: ``key`` as written (``norm``, ``data.batch_size``, ``model@teacher``) and
    each value in Hydra's spelling."""

    key: str
    values: tuple[str, ...]

    @property
    def header(self) -> str:
        return self.key.lstrip("+~")

    @property
    def short(self) -> str:
        """The key's last part, for cell names (``data.batch_size`` -> ``batch_size``, ``model@teacher`` ->
        ``teacher``)."""
        return self.header.rpartition("@")[2].rpartition(".")[2]


@dataclass(frozen=True)
class Setting:
    """One value of every axis; ``label`` writes them as ``study.baseline=`` takes them (``bn`` or ``bn/32``)."""

    values: tuple[str, ...]
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return "/".join(self.values)


@dataclass(frozen=True)
class Cell:
    """One setting with one seed: a run in ``<study>/<name>/`` whose command line is ``overrides``."""

    setting: Setting
    seed: int
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class StudyPlan:
    """What a study runs and how it reports: the command of each cell (``train`` or ``distill``), the overrides
    every cell shares, the axes, the seeds, the split seed, the baseline setting (an index of :attr:`settings`), the
    task's main metric and whether higher is better, and the confidence of the intervals."""

    command: str
    base: tuple[str, ...]
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    split_seed: int
    baseline: int
    monitor: str
    mode: str
    confidence: float = 0.95

    @property
    def settings(self) -> list[Setting]:
        return [Setting(values, tuple(f"{axis.key}={value}" for axis, value in zip(self.axes, values)))
                for values in itertools.product(*(axis.values for axis in self.axes))]

    @property
    def cells(self) -> list[Cell]:
        settings = self.settings
        slugs = [_slug(self.axes, setting) for setting in settings]
        if len(set(slugs)) < len(slugs):  # values that differ only in characters a folder name cannot hold
            slugs = [f"{position}-{slug}" for position, slug in enumerate(slugs)]
        return [Cell(setting, seed, f"{slug}-seed{seed}",
                     (*self.base, *setting.overrides, f"seed={seed}", f"data.seed={self.split_seed}"))
                for setting, slug in zip(settings, slugs) for seed in self.seeds]

    @property
    def key(self) -> dict:
        """What identifies the study's cells, to find it again: the seeds, the baseline and the confidence only
        change which cells are reported and how."""
        return {"command": self.command, "base": list(self.base), "split_seed": self.split_seed,
                "axes": [[axis.key, list(axis.values)] for axis in self.axes]}

    @property
    def test_monitor(self) -> str:
        """The main metric's test counterpart (``val/acc`` -> ``test/acc``)."""
        return "test/" + self.monitor.partition("/")[2]


def _slug(axes: Sequence[Axis], setting: Setting) -> str:
    text = "_".join(f"{axis.short}-{value}" for axis, value in zip(axes, setting.values))
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:80]


def _axis_values(override) -> list[str]:
    """The values of a sweep override in Hydra's spelling (a group's glob is matched against its options)."""
    from hydra.core.override_parser.types import Glob

    from cvlab.utils import config

    value = override.value()
    if isinstance(value, Glob):
        return value.filter(config.options(override.key_or_group))
    if not override.is_discrete_sweep():
        raise UserError(f"{override.input_line}: a study lists the values it compares (norm=bn,gn or range(1,4)); "
                        "interval(...) is a search space, for cvlab tune.")
    return list(override.sweep_string_iterator())


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """The overrides every cell shares (as written) and the axes (the overrides with several values)."""
    from cvlab.utils.config import parse

    base, axes = [], []
    for override in parse(list(overrides)):
        if not override.is_sweep_override():
            base.append(override.input_line)
            continue
        key = override.get_key_element()
        if override.key_or_group in SEED_KEYS:
            raise UserError(f"{override.input_line}: a study repeats every setting over its seeds and holds the split; "
                            "give seeds=N (seed= is the first, data.seed= the split's) instead of a list.")
        values = _axis_values(override)
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise UserError(f"{override.input_line} lists {', '.join(repeated)} more than once.")
        if any(axis.key == key for axis in axes):
            raise UserError(f"{override.key_or_group} is given two lists of values; give it one.")
        axes.append(Axis(key, tuple(values)))
    return base, axes


def plan_study(command: str, overrides: Sequence[str], study, seed: int, split_seed: int, monitor: str,
               mode: str) -> StudyPlan:
    """The plan of ``overrides`` (a cell's command line with lists of values) for the ``study`` node (seeds,
    baseline, confidence), the run's ``seed`` (the first cell seed) and ``split_seed``; a UserError, one line, for
    what cannot be a study."""
    base, axes = split_overrides(overrides)
    if not axes:
        raise UserError("a study compares settings: give at least one override with comma-separated values, e.g. "
                        "cvlab study norm=bn,gn seeds=5 (every value is run with every seed).")
    seeds = int(study.seeds)
    if seeds < 2:
        raise UserError(f"seeds={seeds}: a study needs at least 2 seeds per setting for a std, an interval and a "
                        "p-value (cvlab sweep runs each setting once).")
    confidence = float(study.confidence)
    if not 0 < confidence < 1:
        raise UserError(f"study.confidence={confidence}: the confidence of the intervals is in (0, 1), e.g. 0.95.")
    base = [line for line in base if line.partition("=")[0].lstrip("+") not in SEED_KEYS]
    plan = StudyPlan(command, tuple(base), tuple(axes), tuple(range(seed, seed + seeds)), split_seed, 0, monitor,
                     mode, confidence)
    if study.baseline is not None:
        labels = [setting.label for setting in plan.settings]
        wanted = str(study.baseline)
        if wanted not in labels:
            order = "/".join(axis.header for axis in axes)
            raise UserError(f"study.baseline={wanted} is not one of the settings ({order}): "
                            f"{', '.join(labels)}.{suggest(wanted, labels)}")
        plan = replace(plan, baseline=labels.index(wanted))
    return plan


# ------------------------------------------------------------------------------------------------- running
def study_directory(root: Path, plan: StudyPlan, given: str | None = None, resume: bool = True) -> tuple[Path, bool]:
    """The study's directory and whether it continues an earlier one: ``given`` (``study.dir=``, which must hold
    a study.json), else with ``resume`` the latest ``<root>/<time>/`` whose study has the same :attr:`StudyPlan.key`,
    else a new ``<root>/<time>/``."""
    if given:
        directory = Path(given).expanduser()
        if not (directory / RECORD).is_file():
            raise UserError(f"study.dir={given} holds no {RECORD}: give a directory cvlab study wrote "
                            "(runs/<task>/studies/<time>).")
        return directory, True
    if resume:
        for record in sorted(root.glob(f"*/{RECORD}"), key=lambda path: path.parent.name, reverse=True):
            try:
                if json.loads(record.read_text()).get("key") == json.loads(json.dumps(plan.key)):
                    return record.parent, True
            except (OSError, ValueError):  # a record being written by another study: not this one
                continue
    return claim_dir(root / time.strftime("%Y%m%d-%H%M%S")), False


# A cell's runner: ``run_cell(cell, directory) -> metrics`` (its metrics.json; ``{"status": ...}`` for a cell that
# ran but gave no metrics, such as a diverged one).
CellRunner = Callable[[Cell, Path], dict]


class CellFailed(RuntimeError):
    """A cell's run crashed; the message is the one line a user sees (its log holds the rest)."""


def cli_cell_runner(command: str, monitor: str) -> CellRunner:
    """Runs a cell as its own ``cvlab <command>`` process in the cell's directory (``hydra.run.dir``), its output
    in ``<cell>/cell.log``: every cell is exactly what the command line gives, and a multi-process trainer
    (``trainer=ddp``) re-launches that one cell, not the study. A finished cell keeps ``weights/best.ckpt`` only. A
    cell stopped by a non-finite loss is recorded as
    failed and the study goes on; one refused as bad input stops it with the cell's line (a UserError), and a
    crash stops it with :class:`CellFailed`."""
    import subprocess
    import sys

    from cvlab.callbacks.finite import NON_FINITE_EXIT_CODE
    from cvlab.callbacks.rundir import _quoted

    def run(cell: Cell, directory: Path) -> dict:
        log = directory / "cell.log"
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, "-m", "cvlab.cli", command, *cell.overrides,
                                   f"hydra.run.dir={_quoted(str(directory))}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        code, seconds = finished.returncode, time.perf_counter() - started
        # Written once the cell has ended: a cell refused as bad input removes its run directory (no weights yet),
        # which a log written meanwhile would go with.
        directory.mkdir(parents=True, exist_ok=True)
        log.write_bytes(finished.stdout or b"")
        if code == NON_FINITE_EXIT_CODE:
            console.print(f"stopped by a non-finite loss after {seconds:.0f} s: counted as failed (log: {log})",
                          highlight=False)
            return {"status": "non-finite"}
        if code != 0:
            last = _last_error_line(log)
            message = f"cell {cell.name} ({' '.join(cell.overrides)}) exited with {code}: {last} (log: {log})"
            raise UserError(message) if code == 2 else CellFailed(message)
        metrics = json.loads((directory / "metrics.json").read_text())
        # The stage runner reruns a killed cell from scratch, so a finished cell's last.ckpt files (a distillation
        # has one per stage) are never read again; 50 resnet18 cells with AdamW state would keep ~7 GB of them.
        # best.ckpt stays, for cvlab eval.
        for checkpoint in directory.glob(f"**/{WEIGHTS_DIR}/last.ckpt"):
            checkpoint.unlink()
        figures = "  ".join(f"{key} {metrics[key]:.4f}" for key in (monitor, "test/" + monitor.partition("/")[2])
                            if _is_number(metrics.get(key)))
        console.print(f"{figures}  ({seconds:.0f} s; log: {log})", highlight=False)
        return metrics

    return run


def _last_error_line(log: Path) -> str:
    """The line a failed run ended on: its ``error:`` line, else the last line of its output."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")


@dataclass
class SettingSummary:
    """A setting's figures over its seeds: ``values[metric]`` per finished cell, in seed order, and ``failed`` (the
    cells that ran but gave no metrics, e.g. a non-finite loss); :func:`summarise` fills ``p_values`` and ``rank``."""

    setting: Setting
    values: dict[str, list[float]]
    failed: int = 0
    p_values: dict[str, float] = field(default_factory=dict)
    rank: int | None = None

    def n(self, metric: str) -> int:
        return len(self.values.get(metric, []))

    def mean(self, metric: str) -> float:
        return mean_std(self.values.get(metric, []))[0]

    def std(self, metric: str) -> float:
        return mean_std(self.values.get(metric, []))[1]


def report_metrics(plan: StudyPlan, cell_metrics: Sequence[dict]) -> list[str]:
    """The metrics a study reports: the main one on val, then the test metrics (its counterpart first)."""
    tests = sorted({key for metrics in cell_metrics for key, value in metrics.items()
                    if key.startswith("test/") and key.count("/") == 1 and _is_number(value)})
    if plan.test_monitor in tests:
        tests.remove(plan.test_monitor)
        tests.insert(0, plan.test_monitor)
    return [plan.monitor, *tests]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise(plan: StudyPlan, results: dict[str, dict], metrics: Sequence[str]) -> list[SettingSummary]:
    """One summary per setting from ``results`` ({cell name: its metrics}), with Welch p-values of every metric
    against the baseline setting and the ranks by the main metric's mean."""
    summaries, cells_of_plan = [], plan.cells
    for setting in plan.settings:
        cells = [results[cell.name] for cell in cells_of_plan if cell.setting == setting and cell.name in results]
        finished = [cell for cell in cells if _is_number(cell.get(plan.monitor))]
        values = {metric: [float(cell[metric]) for cell in finished if _is_number(cell.get(metric))]
                  for metric in metrics}
        summaries.append(SettingSummary(setting, values, failed=len(cells) - len(finished)))
    baseline = summaries[plan.baseline]
    for summary in summaries:
        summary.p_values = {metric: math.nan if summary is baseline else
                            welch_p(summary.values[metric], baseline.values[metric]) for metric in metrics}
    ranks = competition_ranks([summary.mean(plan.monitor) for summary in summaries], plan.mode == "max")
    for summary, rank in zip(summaries, ranks):
        summary.rank = rank
    return summaries


def run_study(plan: StudyPlan, directory: Path, run_cell: CellRunner) -> list[SettingSummary]:
    """Runs the cells of ``plan`` in ``directory`` (the finished ones are skipped), then writes and prints the
    study's table (:func:`write_study`); returns the summaries."""
    cells = plan.cells
    write_json(directory / RECORD, {"key": plan.key, "seeds": list(plan.seeds), "cells": [cell.name for cell in cells],
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def stage(cell: Cell) -> Stage:
        def run(context) -> dict:
            return {"setting": cell.setting.label, "seed": cell.seed, **run_cell(cell, context.out_dir)}

        return Stage(cell.name, run, params={"command": plan.command, "overrides": list(cell.overrides)},
                     title=f"{cell.setting.label}, seed {cell.seed}", label=cell.name)

    columns = [Column("setting", "setting", justify="left"), Column("seed"),
               Column(plan.monitor, plan.monitor, "{:.4f}"), Column(plan.test_monitor, plan.test_monitor, "{:.4f}"),
               Column("status")]
    results = run_stages([stage(cell) for cell in cells], directory, columns, title="cells")
    cell_metrics = {name: result.metrics for name, result in results.items()}
    metrics = report_metrics(plan, list(cell_metrics.values()))
    summaries = summarise(plan, cell_metrics, metrics)
    write_study(plan, directory, summaries, metrics, cell_metrics)
    return summaries


# ------------------------------------------------------------------------------------------------- reporting
def _mean_std_text(summary: SettingSummary, metric: str) -> str:
    mean, std = mean_std(summary.values.get(metric, []))
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _p_text(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3g}" if p >= 1e-4 else "<1e-4"


def study_table(plan: StudyPlan, summaries: Sequence[SettingSummary], metrics: Sequence[str]):
    """The rich table: the axes' values, the finished cells, mean ± std of each metric, the p-values of the main
    metric on val and on test against the baseline, and the rank."""
    from rich.table import Table

    compared = [metric for metric in (plan.monitor, plan.test_monitor) if metric in metrics]
    better = "higher" if plan.mode == "max" else "lower"
    table = Table(title=f"study: {len(summaries)} settings x {len(plan.seeds)} seeds, mean ± std over the seeds "
                        f"(ranked by {plan.monitor}, {better} is better)", title_justify="left",
                  caption=f"p: Welch's t-test against {summaries[plan.baseline].setting.label}; every cell cut "
                          f"its splits with data.seed={plan.split_seed}", caption_justify="left")
    for axis in plan.axes:
        table.add_column(axis.header, justify="left")
    table.add_column("n", justify="right")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for metric in compared:
        table.add_column(f"p {metric}", justify="right")
    table.add_column("rank", justify="right")
    for position, summary in enumerate(summaries):
        n = str(summary.n(plan.monitor)) + (f" (+{summary.failed} failed)" if summary.failed else "")
        p_values = ["baseline" if position == plan.baseline else _p_text(summary.p_values[metric])
                    for metric in compared]
        table.add_row(*summary.setting.values, n, *(_mean_std_text(summary, metric) for metric in metrics), *p_values,
                      "-" if summary.rank is None else str(summary.rank))
    return table


def study_rows(plan: StudyPlan, summaries: Sequence[SettingSummary], metrics: Sequence[str]) -> list[dict]:
    """The rows of study.csv: per setting, each metric's mean, std, CI half-width and p-value, and the rank."""
    ci = f"ci{100 * plan.confidence:g}"
    rows = []
    for summary in summaries:
        row = {axis.header: value for axis, value in zip(plan.axes, summary.setting.values)}
        row.update(setting=summary.setting.label, n=summary.n(plan.monitor), failed=summary.failed)
        for metric in metrics:
            values = summary.values[metric]
            row.update({f"{metric} mean": mean_std(values)[0], f"{metric} std": mean_std(values)[1],
                        f"{metric} {ci}": ci_half_width(values, plan.confidence),
                        f"{metric} p": summary.p_values[metric]})
        row["rank"] = summary.rank
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if _is_nan(value) else value for key, value in row.items()})


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_study(plan: StudyPlan, directory: Path, summaries: Sequence[SettingSummary], metrics: Sequence[str],
                cell_metrics: dict[str, dict]) -> None:
    """study.csv, cells.csv, study.png and the finished study.json; prints the table and the files."""
    rows = study_rows(plan, summaries, metrics)
    _write_csv(directory / "study.csv", rows)
    cells = [{"cell": cell.name, **dict(zip((a.header for a in plan.axes), cell.setting.values)), "seed": cell.seed,
              "status": cell_metrics[cell.name].get("status", "ok"),
              **{metric: cell_metrics[cell.name].get(metric) for metric in metrics}} for cell in plan.cells]
    _write_csv(directory / "cells.csv", cells)
    plot_study(plan, summaries, [m for m in (plan.monitor, plan.test_monitor) if m in metrics],
               directory / "study.png")
    write_json(directory / RECORD, {"key": plan.key, "seeds": list(plan.seeds), "cells": [c["cell"] for c in cells],
                                    "baseline": summaries[plan.baseline].setting.label, "monitor": plan.monitor,
                                    "mode": plan.mode, "confidence": plan.confidence, "rows": rows,
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    console.print(study_table(plan, summaries, metrics))
    console.print(f"[bold]study:[/] {directory / 'study.csv'}, {directory / 'cells.csv'}, {directory / 'study.png'}",
                  highlight=False)


def plot_study(plan: StudyPlan, summaries: Sequence[SettingSummary], metrics: Sequence[str], path: Path) -> None:
    """One panel per metric: each seed's value as a point beside its setting, and the mean with its confidence
    interval (t distribution) as a bar."""
    from cvlab.utils.plots import _pyplot

    plt = _pyplot()
    labels = [summary.setting.label for summary in summaries]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 0.9 * len(labels) + 2) * len(metrics), 4.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for x, summary in enumerate(summaries):
            values = summary.values[metric]
            if not values:
                continue
            offsets = np.linspace(-0.3, 0.0, len(values)) if len(values) > 1 else np.full(1, -0.15)
            ax.scatter(x + offsets, values, s=18, alpha=0.6, color="tab:blue", zorder=2)
            half = ci_half_width(values, plan.confidence)
            ax.errorbar(x + 0.2, summary.mean(metric), yerr=0 if math.isnan(half) else half, fmt="o", color="black",
                        capsize=4, zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right"
                      if len(labels) > 4 else "center")
        ax.get_xticklabels()[plan.baseline].set_fontweight("bold")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: seeds, mean ± {100 * plan.confidence:g} % CI (t)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
