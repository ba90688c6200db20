"""Optuna pruning for a Lightning fit (`cvlab tune`): after every validation epoch the trial is told the metric the
search optimises, and the fit stops with :class:`optuna.TrialPruned` when the study's pruner (a median pruner)
judges the trial behind the others at the same epoch. Lightning tears the fit down and re-raises the exception, so
the search records the trial as pruned, with the epochs it trained.

Hand-written: Optuna's own Lightning callback lives in the separate optuna-integration package, which cvlab does not
depend on.
"""
from __future__ import annotations

import optuna
import pytorch_lightning as pl

from cvlab.utils.errors import UserError


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` (from ``trainer.callback_metrics``) to ``trial`` at step = epoch after each validation
    epoch (not the sanity check), then raises :class:`optuna.TrialPruned` if ``trial.should_prune()``."""

    def __init__(self, trial: optuna.trial.Trial, monitor: str):
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise UserError(f"the pruner needs {self.monitor} after every validation epoch; the task logged {logged}.")
        epoch, score = trainer.current_epoch, float(value)
        self.trial.report(score, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor} {score:.4f}")
