"""Shared fixtures: compose a train config in-process with a temporary run directory, and run the real CLI, through a
new interpreter (``cli``) or in this one (``cli_here``)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

CVLAB = [sys.executable, "-m", "cvlab.cli"]

# A quiet, tiny, CPU-only training run: QUIET at the data's own batch size, FAST at 16.
QUIET = ["trainer=debug", "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]
FAST = [*QUIET, "data.batch_size=16"]
# digits_lt's training counts (ρ = 50 on the 1,257 training digits of seed 42), classes 0..9: 336 images.
DIGITS_LT_COUNTS = [122, 78, 51, 33, 21, 13, 8, 5, 3, 2]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch CPU thread for a module of tiny networks (``pytestmark = pytest.mark.usefixtures(...)``): on the
    shared 2-core machine a second thread mostly waits (depthwise convolutions run 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory, monkeypatch):
    """The image-check cache of each test session lives in a temporary folder, not in ~/.cache/cvlab."""
    cache = tmp_path_factory.getbasetemp() / "cvlab-cache"
    monkeypatch.setenv("CVLAB_CACHE", str(cache))
    return cache


@pytest.fixture
def train_cfg(tmp_path):
    """compose("train", overrides) with the run directory in tmp_path."""
    from cvlab.utils.config import compose

    def make(*overrides: str, out: Path | None = None):
        return compose("train", [*FAST, *overrides, f"paths.output_dir={out or tmp_path / 'run'}"])

    return make


@pytest.fixture
def cli(tmp_path):
    """Runs `cvlab ARGS` in a fresh working directory; returns the CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "CVLAB_RUNS": str((cwd or tmp_path) / "runs"), "COLUMNS": "200"}
        return subprocess.run([*CVLAB, *args], cwd=cwd or tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run


def _all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                   if isinstance(logger, logging.Logger))]


def _logging_state() -> dict:
    return {logger: (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
            for logger in _all_loggers()}


def _restore_logging(saved: dict) -> None:
    """Undoes what a run did to logging: Hydra's job logging points handlers at this test's captured streams, which
    are closed after it, so a later test's log record would print a 'Logging error' into its output."""
    for logger in _all_loggers():
        handlers = saved[logger][0] if logger in saved else []  # a logger the run created keeps its level
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        if logger in saved:
            logger.level, logger.propagate, logger.disabled = saved[logger][1:]


@pytest.fixture
def cli_here(tmp_path, monkeypatch, capfd):
    """Runs `cvlab ARGS` in this process, as typed (the Typer app, Hydra and its run directory), in ``cwd`` (default
    tmp_path) with runs under ``cwd/runs``; returns a CompletedProcess like ``cli``'s. It skips a new interpreter's
    ~4 s of imports, which is most of a refusal test's time; ``cli`` stays for what only a new process shows (start-up,
    exit codes the interpreter sets)."""
    from cvlab.cli import app

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        where = cwd or tmp_path
        monkeypatch.chdir(where)
        monkeypatch.setenv("CVLAB_RUNS", str(where / "runs"))
        monkeypatch.setenv("COLUMNS", "200")
        monkeypatch.setattr(sys, "argv", ["cvlab", *args])
        capfd.readouterr()
        saved = _logging_state()
        try:
            with pytest.raises(SystemExit) as exit_info:  # Typer's standalone mode always ends in one
                app(list(args))
        finally:
            _restore_logging(saved)
        out, err = capfd.readouterr()
        code = exit_info.value.code
        # As the interpreter would turn it into an exit status: None is 0, a message is 1.
        status = code if isinstance(code, int) else 0 if code is None else 1
        return subprocess.CompletedProcess(["cvlab", *args], status, out, err)

    return run
