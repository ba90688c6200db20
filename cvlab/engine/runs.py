"""Run bookkeeping shared by every command: guarded execution (bad input -> one line, exit 2, nothing
half-written), the run directory, atomic json files, and a quiet Lightning."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from cvlab.utils.console import console, print_error
from cvlab.utils.errors import UserError


def quiet_lightning() -> None:
    """Keeps the console to what a user needs: Lightning's hardware banner, tips and known-harmless warnings go."""
    import logging
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*is deprecated.*",
                    ".*The number of training batches .* is smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def run_guarded(run: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig):
    """Runs ``run(cfg)``; a UserError prints one line, removes a run directory that holds no weights yet, exits 2.

    Returns the task's main metric, which Hydra's sweepers optimise.
    """
    out = output_dir(cfg)
    try:
        metrics, _ = run(cfg)
    except UserError as error:
        print_error(str(error))
        if out.exists() and not any(out.rglob("*.ckpt")):
            shutil.rmtree(out, ignore_errors=True)
            for parent in list(out.parents)[:3]:  # <runs>/<task>/<model>, if this run made them
                try:
                    parent.rmdir()
                except OSError:
                    break
        sys.exit(2)
    monitor = cfg.get("task", {}).get("monitor") if "task" in cfg else None
    return metrics.get(monitor) if monitor else None


def write_json(path: Path, payload) -> None:
    """Writes atomically: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def say_run_dir(out: Path, when: str) -> None:
    console.print(f"[bold]run directory{' (' + when + ')' if when else ''}:[/] {out}", highlight=False)
