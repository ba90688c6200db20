"""One full training epoch on digits through cvlab's training path (``run_train``), for one model of each backbone
family: ResNet, ResNeXt, MobileNet, ViT and Darknet. After the epoch the model must classify well above chance
(10 classes: 0.1) and its training loss must have fallen from the first step's.

Each family runs its cheapest member at a reduced width where the entry point offers one; the accuracies in the
comments were measured with seed 42 (the config default), and the thresholds leave a margin below them.
"""
from __future__ import annotations

import csv
import statistics

import pytest
import pytorch_lightning as pl

from cvlab.engine import run_train

ONE_EPOCH = ("trainer.max_epochs=1", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
             "trainer.limit_test_batches=null")
# digits: 1,797 images, 15 % for val and 15 % for test (270 each, stratified) -> 1,257 for training; batches of 16
# (tests/conftest.py's FAST), the last partial batch dropped.
TRAIN_STEPS = 1257 // 16


class StepLosses(pl.Callback):
    """The training loss of every optimizer step, in order."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


FAMILIES = [
    # val/acc, test/acc measured after the epoch (seed 42, 1,257 training images):
    pytest.param("resnet18", (), 0.85, id="resnet18"),  # 0.944, 0.919
    # ResNeXt shares ResNet's code path; its epoch costs ~35 s on 2 cores, so it runs with `make test-slow`.
    pytest.param("resnext50_32x4d", (), 0.75, id="resnext50_32x4d", marks=pytest.mark.slow),  # 0.922
    # One epoch of 78 steps leaves the half-width MobileNetV2 far from converged (its BN statistics lag); the code
    # before the 70/15/15 split gave 0.285 at this training size too.
    pytest.param("mobilenetv2", ("model.width_mult=0.5",), 0.2, id="mobilenetv2-0.5"),  # 0.256, 0.252
    # The CNNs' default lr (AdamW 3e-3) leaves a ViT at chance after one epoch (measured 0.10); 3e-4 is ViT's usual
    # from-scratch scale. 4x4 patches give 4 tokens + the class token on 8x8 digits.
    pytest.param("vit_tiny", ("model.patch_size=4", "optimizer.lr=3e-4"), 0.7, id="vit_tiny-p4"),  # 0.852, 0.815
    pytest.param("darknet19", ("model.width=0.25",), 0.7, id="darknet19-0.25"),  # 0.870, 0.900
]


@pytest.mark.parametrize("model, overrides, min_acc", FAMILIES)
def test_one_epoch_on_digits_learns(model, overrides, min_acc, train_cfg, tmp_path):
    steps = StepLosses()
    metrics, _ = run_train(train_cfg(f"model={model}", *overrides, *ONE_EPOCH, out=tmp_path / "run"),
                           extra_callbacks=[steps])
    with open(tmp_path / "run" / "results.csv", newline="") as f:
        (epoch,) = list(csv.DictReader(f))

    assert int(epoch["epoch"]) == 0
    assert len(steps.losses) == TRAIN_STEPS  # a whole epoch, not trainer=debug's two batches
    assert metrics["val/acc"] > min_acc and metrics["test/acc"] > min_acc
    first = steps.losses[0]
    assert float(epoch["train/loss"]) < first  # the epoch's mean loss
    assert statistics.mean(steps.losses[-10:]) < 0.8 * first
