"""Sample grids of a generation run: the generator's EMA on the same fixed latents after every training epoch
(``samples/epoch_<n>.png``), and at the end of fitting ``progression.png``, the first row of up to ``rows`` of those
grids, evenly spaced over the run, one row per epoch: how the samples of one set of latents developed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from cvlab.utils.plots import grid_row, plot_image_table, save_image_grid

PROGRESSION_FILE = "progression.png"


class SampleGrids(pl.Callback):
    """``pl_module.grid_images()`` (``Tensor[N, C, H, W]`` in [-1, 1], drawn as ``pl_module.grid_shape``: rows, columns)
    saved into ``dirpath`` after every training epoch; ``progression.png`` beside ``dirpath`` at the end. The grids of
    a resumed run's earlier epochs are on disk already, so its progression spans the whole run."""

    def __init__(self, dirpath: str, rows: int = 10):
        self.dirpath = Path(dirpath)
        self.rows = int(rows)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        save_image_grid(pl_module.grid_images(), self.dirpath / f"epoch_{trainer.current_epoch:03d}.png",
                        pl_module.grid_shape[1])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grids = sorted(self.dirpath.glob("epoch_*.png"))
        if not trainer.is_global_zero or not grids:
            return
        chosen = sorted({int(round(i)) for i in np.linspace(0, len(grids) - 1, min(self.rows, len(grids)))})
        rows = pl_module.grid_shape[0]
        plot_image_table([[grid_row(grids[i], rows)] for i in chosen], self.dirpath.parent / PROGRESSION_FILE,
                         row_labels=[f"epoch {int(grids[i].stem.partition('_')[2])}" for i in chosen],
                         title="samples of fixed latents through the run (generator EMA)")
