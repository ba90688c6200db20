"""Hydra callback: every run gets a directory of its own, and a resumed run continues in the one it started in.

Hydra names a run's directory from the configured pattern (``runs/<task>/<model>/<time>``) and creates it with
``exist_ok=True``, so two runs started in the same second share one directory: the second one's ``.hydra/`` sits
beside the first one's checkpoints and metrics. Before Hydra gets there, this callback claims the directory
atomically (:func:`~cvlab.utils.rundirs.claim_dir`: ``<time>``, else ``<time>-1``, ...) and writes the claimed path
into the config, so ``.hydra/``, the weights and the metrics all land in it.

- ``resume=<run>/weights/last.ckpt`` continues in ``<run>``: its results.csv, best checkpoint and best score carry
  on. Hydra then rewrites ``.hydra/``; the record of the invocation before is kept in ``.hydra/before-resume[-n]/``.
  A checkpoint that lies in no run directory starts a new one.
- ``hydra.run.dir=`` / ``hydra.sweep.dir=`` given on the command line are used as given.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cvlab.utils.rundirs import claim_dir, run_dir_of_checkpoint


def _given(config: DictConfig, key: str) -> bool:
    return any(str(o).lstrip("+").partition("=")[0] == key for o in config.hydra.overrides.hydra)


def _keep_hydra_record(run: Path, subdir: str | None) -> None:
    """Copies ``<run>/<subdir>/*.yaml`` (config, hydra, overrides) to ``<run>/<subdir>/before-resume[-n]/``."""
    if subdir is None:
        return
    record = run / subdir
    files = sorted(record.glob("*.yaml"))
    if files:
        kept = claim_dir(record / "before-resume")
        for file in files:
            shutil.copy2(file, kept / file.name)


def _quoted(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClaimRunDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if _given(config, "hydra.run.dir"):
            return
        resume = OmegaConf.select(config, "resume")
        directory = run_dir_of_checkpoint(resume) if resume else None
        if directory is not None:
            _keep_hydra_record(directory, config.hydra.output_subdir)
        else:
            directory = claim_dir(config.hydra.run.dir)
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(directory)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if _given(config, "hydra.sweep.dir"):
            return
        directory = str(claim_dir(config.hydra.sweep.dir))
        # Each job's config is composed again from the sweep's overrides: the claimed directory travels as one.
        with read_write(config.hydra):
            config.hydra.sweep.dir = directory
            with open_dict(config.hydra.overrides):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_quoted(directory)}")
