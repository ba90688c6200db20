"""Cosine learning-rate schedule with optional linear warm-up, in closed form.

torch's CosineAnnealingLR updates the rate recursively from its current value, so a run resumed with more
epochs (after the rate reached 0) can never climb back onto the new plan; this one computes the factor from the
step index alone. torch ships no warm-up + cosine schedule either.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """lr rises linearly from 0 over the first ``warmup_fraction`` of ``total_steps``, then follows a half cosine to 0.

    The factor depends only on the step index, so a resumed run with a larger ``total_steps`` simply re-plans.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0, last_epoch: int = -1):
        if total_steps is None or total_steps < 1:
            raise ValueError("WarmupCosineLR needs total_steps >= 1")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(round(warmup_fraction * self.total_steps))
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


# State entries that encode the plan (how long the run is), not progress; a resume keeps the new plan's values.
PLAN_KEYS = ("T_max", "total_steps", "warmup_steps", "epochs", "steps_per_epoch")
