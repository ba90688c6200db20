"""Run bookkeeping shared by every command: guarded execution (bad input -> one line, exit 2, nothing
half-written; a non-finite loss -> one line, exit 3), the run directory, atomic strict json files, and a quiet
Lightning."""
from __future__ import annotations

import json
import math
import numbers
import shutil
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from cvlab.callbacks.finite import NON_FINITE_EXIT_CODE, NonFiniteError
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
                    ".*The number of training batches .* is smaller than the logging interval.*",
                    ".*Checkpoint directory .* exists and is not empty.*"):  # a resumed run continues in its own
        warnings.filterwarnings("ignore", message=message)


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def run_guarded(run: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig):
    """Runs ``run(cfg)``; a UserError prints one line, removes a run directory that holds no weights yet, exits 2.
    A non-finite loss or weights (:class:`~cvlab.callbacks.finite.NonFiniteError`) prints one line and exits 3,
    keeping the run directory and its finite checkpoints; in a sweep the job is recorded as failed and the sweep
    goes on.

    Returns the task's main metric, which Hydra's sweepers optimise.
    """
    out = output_dir(cfg)
    try:
        metrics, _ = run(cfg)
    except NonFiniteError as error:
        print_error(str(error))
        if _in_sweep():
            return None
        sys.exit(NON_FINITE_EXIT_CODE)
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


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def json_ready(value):
    """``value`` with numbers as python int/float (tensors and numpy scalars too) and NaN/inf as None: strict
    JSON, which every parser reads (a bare NaN is not JSON)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)  # tensors, numpy scalars, fractions
    return number if math.isfinite(number) else None


def write_json(path: Path, payload) -> None:
    """Writes strict JSON (:func:`json_ready`) atomically: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_ready(payload), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(path)


def say_run_dir(out: Path, when: str) -> None:
    console.print(f"[bold]run directory{' (' + when + ')' if when else ''}:[/] {out}", highlight=False)
