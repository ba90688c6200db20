"""Restoring a task from a checkpoint file alone, with one clear line for a file that is not a cvlab checkpoint."""
from __future__ import annotations

from pathlib import Path

from cvlab.tasks.base import BaseTask, load_task
from cvlab.utils.errors import UserError, missing_checkpoint


def restore_task(ckpt: Path, what: str = "checkpoint", file: str = "") -> BaseTask:
    """The task saved in ``ckpt``, or a UserError saying what is wrong with the file (``what`` names the option
    that gave it, ``file`` the checkpoint a run usually gives it)."""
    import pickle

    if not ckpt.is_file():
        raise missing_checkpoint(what, ckpt, file)
    try:
        return load_task(str(ckpt))
    except (KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the loader wrote
        raise UserError(f"{what} {str(ckpt)!r} is not a cvlab checkpoint "
                        f"({type(error).__name__}: {reason}).") from None
