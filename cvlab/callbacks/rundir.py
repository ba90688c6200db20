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

The other processes of a multi-process job (``trainer.devices=2``, ``trainer=ddp``) work in the job's directory too.
Lightning's subprocess launcher starts each of them as ``LOCAL_RANK=k python -m <__main__.__spec__.name>
<sys.argv[1:]>`` (``python <sys.argv[0]> ...`` when ``__main__`` has no module spec), followed by
``hydra.run.dir=<the job's run.dir> hydra.output_subdir=null``. From the ``cvlab`` entry point that command names no
program (``sys.argv[0]`` is "cvlab train"), and in a sweep ``sys.argv`` is the whole sweep: every process would run
the sweep again, in run.dir, a directory no job writes to. So at the start of each job
(:meth:`ClaimRunDir.on_job_start`) the command is made this job alone: ``python -m cvlab.run.<entry> <the job's own
overrides>``, in run mode, with run.dir set to the job's output directory. The processes started so give
``hydra.run.dir``, so they claim nothing.
At the end of the job (:meth:`ClaimRunDir.on_job_end`) the command line and the environment are put back and the
job's process group is ended, so that the next job of a sweep starts processes of its own.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from hydra.core.hydra_config import HydraConfig
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


# What Lightning's launcher sets in the environment of the process that starts the others. A later job of a sweep in
# the same process must not inherit it: with LOCAL_RANK set, Lightning takes the processes as started already.
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class JobProcessState(NamedTuple):
    argv: list[str]
    main_spec: object
    environment: dict[str, str | None]


def relaunch_as_this_job(config: DictConfig, task_function) -> JobProcessState:
    """Makes the command Lightning's launcher re-executes for a job's other processes this job alone (see the module
    docstring): ``__main__``'s module spec becomes the job's Hydra entry (``cvlab.run.train``), ``sys.argv[1:]`` the
    job's overrides and Hydra's run.dir the job's output directory. Returns what :func:`end_job` puts back."""
    import __main__

    saved = JobProcessState(list(sys.argv), getattr(__main__, "__spec__", None),
                            {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT})
    entry = getattr(task_function, "__module__", "__main__")
    if entry != "__main__":  # a script run as a file is re-executed by its path, sys.argv[0]
        __main__.__spec__ = importlib.util.find_spec(entry)
    sys.argv = [sys.argv[0], *(str(o) for o in config.hydra.overrides.task)]
    run = HydraConfig.get().run
    with read_write(run):
        run.dir = str(config.hydra.runtime.output_dir)
    return saved


def end_job(saved: JobProcessState) -> None:
    """Puts back the command line and the environment of before the job, and ends the job's process group, so that
    the next job of a sweep starts its own processes."""
    import torch.distributed

    import __main__

    sys.argv[:] = saved.argv
    __main__.__spec__ = saved.main_spec
    for key, value in saved.environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def started_by_launcher() -> bool:
    """True in a process that Lightning's launcher (or torchrun) started: it sets LOCAL_RANK for them."""
    return "LOCAL_RANK" in os.environ


class ClaimRunDir(Callback):
    def __init__(self) -> None:
        self._before_job: JobProcessState | None = None

    def on_job_start(self, config: DictConfig, *, task_function=None, **kwargs) -> None:
        if not started_by_launcher():
            self._before_job = relaunch_as_this_job(config, task_function)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if self._before_job is not None:
            end_job(self._before_job)
            self._before_job = None

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
