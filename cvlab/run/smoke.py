"""`cvlab smoke`: every registered model trains and validates for a few batches on tiny embedded data for its task,
through the same run_train path as `cvlab train`; a table says which passed. CI runs it inside `make test`."""
from __future__ import annotations

import logging
import tempfile
import time
import traceback

from cvlab.engine import list_models, model_task, run_train
from cvlab.utils.config import compose, option_keys
from cvlab.utils.console import console

# Tiny data per task, so the whole zoo runs in a few minutes on a laptop CPU.
SMOKE_OVERRIDES = {
    "classification": ["data=digits", "data.batch_size=8"],
    "detection": ["data=shapes_det", "data.image_size=64", "data.train_size=16", "data.val_size=8",
                  "data.test_size=8", "data.batch_size=4"],
    "segmentation": ["data=shapes_seg", "data.image_size=64", "data.train_size=16", "data.val_size=8",
                     "data.test_size=8", "data.batch_size=4"],
}


def smoke_overrides(name: str, task: str, steps: int, out_dir: str) -> list[str]:
    # a quarter of the channels for the detectors that have a width multiplier (the YOLOs; not the R-CNN family)
    narrow = ["model.width=0.25"] if task == "detection" and "width" in option_keys("model", name) else []
    return [
        f"model={name}", f"task={task}", *SMOKE_OVERRIDES.get(task, []), *narrow,
        "trainer=debug", f"trainer.limit_train_batches={steps}", f"trainer.limit_val_batches={steps}",
        f"trainer.limit_test_batches={steps}", "trainer.enable_checkpointing=false", "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint", "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "logger=none",
        f"paths.output_dir={out_dir}",
    ]


def smoke_one(name: str, steps: int = 2) -> dict:
    """Trains ``name`` for ``steps`` batches; returns its final metrics (raises on failure)."""
    task = model_task(name)
    with tempfile.TemporaryDirectory(prefix=f"cvlab-smoke-{name}-") as out_dir:
        cfg = compose("train", smoke_overrides(name, task, steps, out_dir))
        metrics, _ = run_train(cfg)
    return metrics


def run_smoke(models: list[str] | None = None, steps: int = 2) -> list[str]:
    from rich.table import Table

    names = models or list_models()
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    table = Table(title=f"smoke: {len(names)} models, {steps} train + {steps} val batches each", title_justify="left")
    for column in ("model", "task", "status", "val loss | mAP50", "seconds"):
        table.add_column(column, justify="left" if column in ("model", "task", "status") else "right")
    failed = []
    for name in names:
        started = time.perf_counter()
        console.quiet = True
        try:
            metrics = smoke_one(name, steps)
            status, loss = "[green]passed", metrics.get("val/loss", metrics.get("val/map_50", float("nan")))
        except Exception as error:  # a smoke test reports every failure and goes on
            status, loss = f"[red]failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}", float("nan")
            failed.append(name)
            logging.getLogger(__name__).debug(traceback.format_exc())
        finally:
            console.quiet = False
        table.add_row(name, model_task(name), status, f"{loss:.3f}", f"{time.perf_counter() - started:.1f}")
        console.print(f"{name}: {status}", highlight=False)
    console.print(table)
    return failed
