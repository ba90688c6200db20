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


# What ``Trainer.fit(ckpt_path=...)`` continues from besides the weights; a finished run's best.ckpt keeps neither
# (:func:`cvlab.callbacks.checkpoint.keep_weights_only`).
RESUME_STATE_KEYS = ("optimizer_states", "loops")


def check_checkpoint(ckpt: Path, what: str = "checkpoint", file: str = "", resume: bool = False) -> Path:
    """``ckpt``, once checked as :func:`restore_task` would check it, for a caller that hands the path to Lightning
    (``Trainer.fit(ckpt_path=...)`` reads the file again, with ``weights_only=True``); a UserError otherwise.
    ``resume`` also refuses a file without the optimizer and loop states, naming the run's last.ckpt."""
    if not ckpt.is_file():
        raise missing_checkpoint(what, ckpt, file)
    try:
        checkpoint = read_checkpoint(ckpt)
        checked_task_class(checkpoint)
    except CheckpointError as error:
        raise error.about(what, ckpt) from None
    if resume and not all(key in checkpoint for key in RESUME_STATE_KEYS):
        last = ckpt.with_name("last.ckpt")
        instead = last if last.is_file() and last != ckpt else "the weights/last.ckpt of its run"
        raise UserError(f"{what} {str(ckpt)!r} holds only the weights (a finished run's best.ckpt keeps no optimizer "
                        f"or loop state); resume from {instead}.")
    return ckpt
