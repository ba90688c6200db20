"""Restoring a task from a checkpoint file alone, for training on or for a read-only pass (fused, where the task
asks for it), and checking a file before Lightning reads it (a resume), with one line for a file that is not a cvlab
checkpoint or that asks for anything cvlab refuses to build (:mod:`cvlab.utils.safety`: nothing in the file is ever
run)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from cvlab.layers.rep import fuse_modules
from cvlab.tasks.base import BaseTask, checked_task_class, load_task
from cvlab.utils.console import console
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


def restore_for_inference(ckpt: Path, what: str = "checkpoint", file: str = "") -> BaseTask:
    """:func:`restore_task` for a read-only pass (`cvlab eval`, `cvlab predict` of a checkpoint): when the task asks
    for it (``fused_inference``: detection), its inference model (the weight EMA, where the task keeps one) is put in
    eval mode and fused in place by its modules' fuse hooks (:func:`cvlab.layers.rep.fuse_modules`: each conv's
    BatchNorm folded into it, RepVGG branches merged), the network `cvlab export` writes, and one dim line says how
    many BatchNorms were folded. The task must not train afterwards; a training run never fuses its network."""
    task = restore_task(ckpt, what, file)
    if task.fused_inference:
        network = task.inference_model
        before = _batch_norms(network)
        fuse_modules(network.eval())
        if folded := before - _batch_norms(network):
            console.print(f"fused for inference: {folded} BatchNorm layers folded into their convs", style="dim",
                          highlight=False)
    return task


def _batch_norms(network: nn.Module) -> int:
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in network.modules())


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
