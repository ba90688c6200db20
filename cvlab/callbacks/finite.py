"""A non-finite loss stops the run before it reaches the weights.

A diverging run (too high a learning rate, an fp16 overflow) produces an inf or NaN loss; one backward pass of it
turns every weight into NaN, and the run would go on "training" and checkpointing NaN weights. The check costs one
``isfinite`` of the loss scalar per step, before backward: the run stops (:data:`NON_FINITE_EXIT_CODE`) with one
line naming the step, the loss terms that are not finite and the learning rate, and no update is made from that
loss, so the checkpoints keep the last finite epoch. (:class:`~cvlab.callbacks.checkpoint.RunCheckpoint` checks
the weights themselves before every save.)
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch

# The exit code of a run stopped by a non-finite loss or weights (2 is bad input, 1 a crash).
NON_FINITE_EXIT_CODE = 3
ADVICE = "Lower optimizer.lr or clip the gradients (trainer.gradient_clip_val=1)."


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; the message is the one line a user sees."""


def learning_rate(trainer: pl.Trainer) -> str:
    return f"{trainer.optimizers[0].param_groups[0]['lr']:g}" if trainer.optimizers else "?"


def non_finite_count(module: torch.nn.Module) -> int:
    """How many entries of ``module``'s floating-point parameters and buffers are NaN or inf (one device sync)."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return 0
    return int(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum())


def _non_finite_terms(trainer: pl.Trainer) -> list[str]:
    """``name=value`` of the loss terms the task logged in this training step (``train/loss_*``) that are not
    finite.

    Read from Lightning's result collection, the one place the step's logged terms are held. Every earlier step had
    a finite loss (the run stops at the first that has not), so a term whose epoch accumulation is not finite is one
    that is not finite in this step.
    """
    found = []
    for result in (trainer._results or {}).values():
        name = result.meta.name
        if (result.meta.fx == "training_step" and result.is_tensor and "loss" in name.rpartition("/")[2]
                and name != "train/loss" and not torch.isfinite(result.value).all()):
            found.append(f"{name.rpartition('/')[2]}={float(result.value)}")
    return found


class StopOnNonFiniteLoss(pl.Callback):
    def __init__(self):
        self.batch_idx = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Every process stops together (one that went on alone would wait for the others forever).
        if trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss).all()), all=True):
            return
        terms = _non_finite_terms(trainer)
        raise NonFiniteError(
            f"training stopped: the loss is {float(loss.detach().float().mean())} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self.batch_idx})"
            f"{'; not finite: ' + ', '.join(terms) if terms else ''}; lr {learning_rate(trainer)}. No update was "
            f"made from it, and no checkpoint holds non-finite weights. {ADVICE}")
