"""`cvlab study norm=bn,gn,sn seeds=5`: every setting (one value of each comma-separated override) with every seed,
each as its own `cvlab train` run (`cvlab distill` when the overrides name distill.*, teacher or student) in
``runs/<task>/studies/<time>/<cell>/``, then one table of mean ± std, Welch p-values against the baseline and ranks,
study.csv, cells.csv and study.png. The work is the engine's :mod:`cvlab.engine.study`.

Run again, the same command continues the latest study of the same settings and overrides: its finished cells are
skipped (more seeds add cells). ``study.dir=<study>`` continues that one; ``study.resume=false`` starts anew.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import (
    CellFailed,
    cli_cell_runner,
    plan_study,
    run_study,
    say_run_dir,
    study_directory,
)
from cvlab.utils.config import check, parse
from cvlab.utils.console import console, print_error
from cvlab.utils.errors import UserError

# `seeds=5` is study.seeds=5; every other study.* key is the study node's.
SHORTHANDS = {"seeds": "study.seeds"}
# What a study sets in each cell itself.
REFUSED = {
    "hydra.run.dir": "a study gives each cell its own directory; move the study with paths.runs=... or continue one "
                     "with study.dir=...",
    "hydra.sweep.dir": "a study gives each cell its own directory; move the study with paths.runs=...",
    "resume": "a study resumes itself: run the same command again (or give study.dir=<study>)",
}


def study_arguments(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(the study node's overrides, the cells' overrides)``; ``seeds=N`` is spelled ``study.seeds=N``."""
    study, cells = [], []
    for line, override in zip(overrides, parse(overrides)):
        key = override.key_or_group
        if key in SHORTHANDS:
            study.append(f"{SHORTHANDS[key]}={override.get_value_string()}")
        elif key == "study" or key.startswith("study."):
            study.append(line)
        elif key in REFUSED:
            raise UserError(f"{key}: {REFUSED[key]}.")
        else:
            cells.append(line)
    return study, cells


def run_study_command(command: str, overrides: list[str]) -> None:
    """Checks the overrides (one line, exit 2, for a mistake), plans the study, runs its cells as ``cvlab
    <command>`` processes and prints its table. ``command`` is train or distill; ``overrides`` are spelled as that
    command takes them."""
    study_overrides, cell_overrides = study_arguments(overrides)
    node = check("study", study_overrides).cfg.study
    cfg = check(command, cell_overrides).cfg
    plan = plan_study(command, cell_overrides, node, seed=int(cfg.seed), split_seed=int(cfg.data.seed),
                      monitor=str(cfg.task.monitor), mode=str(cfg.task.mode))
    task = "distillation" if command == "distill" else str(cfg.task.name)
    directory, continued = study_directory(Path(cfg.paths.runs) / task / "studies", plan, node.dir, node.resume)
    say_run_dir(directory, "continued" if continued else "start")
    console.print(f"{len(plan.settings)} settings x {len(plan.seeds)} seeds (seed={plan.seeds[0]}..{plan.seeds[-1]}), "
                  f"every cell on the splits of data.seed={plan.split_seed}", highlight=False)
    try:
        run_study(plan, directory, cli_cell_runner(command, plan.monitor))
    except CellFailed as error:
        print_error(str(error))
        sys.exit(1)
    say_run_dir(directory, "end")
