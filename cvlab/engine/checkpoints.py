"""Restoring a task from a checkpoint file alone, and checking a file before Lightning reads it (a resume), with one
line for a file that is not a cvlab checkpoint or that asks for anything cvlab refuses to build
(:mod:`cvlab.utils.safety`: nothing in the file is ever run)."""
from __future__ import annotations

from pathlib import Path

from cvlab.tasks.base import BaseTask, checked_task_class, load_task
from cvlab.utils.errors import UserError, missing_checkpoint
from cvlab.utils.safety import CheckpointError, one_line, read_checkpoint


def restore_task(ckpt: Path, what: str = "checkpoint", file: str = "") -> BaseTask:
    """The task saved in ``ckpt``, or a UserError saying what is wrong with the file (``what`` names the option
    that gave it, ``file`` the checkpoint a run usually gives it)."""
    if not ckpt.is_file():
        raise missing_checkpoint(what, ckpt, file)
    try:
        return load_task(ckpt)
    except CheckpointError as error:
        raise error.about(what, ckpt) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        # Read safely and on the allowlist, but not what a task is built from (a missing entry, wrong shapes).
        raise UserError(f"{what} {str(ckpt)!r} is not a cvlab checkpoint: {one_line(error)}.") from None


def check_checkpoint(ckpt: Path, what: str = "checkpoint", file: str = "") -> Path:
    """``ckpt``, once checked as :func:`restore_task` would check it, for a caller that hands the path to Lightning
    (``Trainer.fit(ckpt_path=...)`` reads the file again, with ``weights_only=True``); a UserError otherwise."""
    if not ckpt.is_file():
        raise missing_checkpoint(what, ckpt, file)
    try:
        checked_task_class(read_checkpoint(ckpt))
    except CheckpointError as error:
        raise error.about(what, ckpt) from None
    return ckpt
