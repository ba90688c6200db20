"""Per-epoch results table (results.csv): one row per epoch with every logged epoch-level metric."""
from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl


class ResultsCSV(pl.Callback):
    """Appends a row after each training epoch (validation has run by then): epoch, lr and every epoch metric.

    A resumed run keeps the rows already written, so the file always has one row per finished epoch.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = {"epoch": trainer.current_epoch}
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.endswith("_step") or key.startswith("lr-"):  # lr is recorded once, above
                continue
            row[key.removesuffix("_epoch")] = float(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read()
        rows = [r for r in rows if int(r["epoch"]) < trainer.current_epoch] + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
