"""Progressive growing (Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and
Variation"): a progressive GAN (progan, stylegan) grows from 4x4 to its resolution by the real images it has seen.

The schedule, for ``K = model.kimg_per_phase`` thousand images per phase (:func:`progress_at`): phase 0 (4x4)
trains for K; each later phase fades its new block in over its first K / 2 (alpha rising linearly from 0 to 1) and
trains it stably over the second K / 2; the last phase, the model's resolution, then trains to the end of the run.
The paper's K is 1,600 (800 fading, 800 stabilising). The count of images seen is the task's ``images_seen``, saved in
its checkpoints, so a resumed run continues the schedule where it stopped; the model keeps its phase and alpha in
buffers, so a restored checkpoint samples at the resolution it was saved at.
"""
from __future__ import annotations

import pytorch_lightning as pl


def progress_at(images_seen: int, kimg_per_phase: float, num_phases: int) -> tuple[int, float]:
    """``(phase, alpha)`` after ``images_seen`` real images: see the module docstring."""
    per_phase = float(kimg_per_phase) * 1000
    if per_phase <= 0:
        raise ValueError(f"kimg_per_phase must be positive, got {kimg_per_phase}")
    phase = min(int(images_seen // per_phase), num_phases - 1)
    alpha = 1.0 if phase == 0 else min(1.0, (images_seen - phase * per_phase) / (per_phase / 2))
    return phase, alpha


class ProgressiveGrowing(pl.Callback):
    """Sets the phase and fade-in of a progressive ``pl_module.model`` (``progressive``, ``num_phases``,
    ``kimg_per_phase``, ``set_progress``) from ``pl_module.images_seen`` before fitting and before every training
    batch; any other model is left alone."""

    @staticmethod
    def _grow(pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if getattr(model, "progressive", False):
            model.set_progress(*progress_at(int(pl_module.images_seen), model.kimg_per_phase, model.num_phases))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._grow(pl_module)  # a fresh model is built fully grown: validation's sanity check sees phase 0 too

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._grow(pl_module)
