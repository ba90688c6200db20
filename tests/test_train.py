"""Training end to end: files of a run, final metrics, eval from the checkpoint alone, exact resume, sweeps."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from cvlab.engine import run_train


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_train_writes_the_whole_run_directory(cli, tmp_path):
    result = cli("train", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
                 "data.batch_size=16")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "runs" / "classification" / "resnet18").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert result.stdout.count(f"run directory (start): {run}") == 1
    assert f"run directory (end): {run}" in result.stdout.replace("\n", "")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "weights/best.ckpt", "weights/last.ckpt",
                 "results.csv", "metrics.json", "confusion_matrix.png", "curves.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    rows = read_csv(run / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"lr", "train/loss", "val/loss", "val/acc"} <= set(rows[0])
    metrics = json.loads((run / "metrics.json").read_text())
    best = max(float(r["val/acc"]) for r in rows)
    assert metrics["val/acc"] == pytest.approx(best, abs=1e-6)  # metrics.json describes the best checkpoint
    assert {"test/acc", "test/f1", "test/loss"} <= set(metrics)  # ... and reports it on the test split
    assert not any(key.startswith("test/") for key in rows[0])  # the test split is never seen during training
    assert metrics["params"] == 11_172_810  # resnet18, small stem, 1 input channel, 10 classes
    table = result.stdout[result.stdout.index("(best checkpoint on val)"):]
    header = next(line for line in table.splitlines() if "metric" in line)
    assert header.index("val") < header.index("test")  # the final table has val beside test
    acc_row = next(line for line in table.splitlines() if line.strip("│ ").startswith("acc "))
    assert f"{metrics['val/acc']:.4f}" in acc_row and f"{metrics['test/acc']:.4f}" in acc_row


@pytest.mark.parametrize("split", ["test", pytest.param("val", marks=pytest.mark.slow)])  # val: make test-slow
def test_eval_restores_from_checkpoint_alone_and_reproduces_metrics(train_cfg, cli, tmp_path, split):
    # A seed other than the default: eval must cut the same splits from the checkpoint's own data config and seed.
    cfg = train_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=null",
                    "trainer.limit_test_batches=null", "seed=7", out=tmp_path / "run")
    metrics, _ = run_train(cfg)
    assert metrics["val/acc"] != metrics["test/acc"] or metrics["val/loss"] != metrics["test/loss"]
    ckpt = tmp_path / "run" / "weights" / "best.ckpt"
    result = cli("eval", f"ckpt={ckpt}", "trainer=cpu", *([f"split={split}"] if split == "val" else []), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (eval_json,) = (tmp_path / "run" / "eval").glob("*/eval.json")
    scores = json.loads(eval_json.read_text())
    assert scores["split"] == split
    assert scores[f"{split}/acc"] == pytest.approx(metrics[f"{split}/acc"], abs=1e-6)
    assert scores[f"{split}/loss"] == pytest.approx(metrics[f"{split}/loss"], rel=1e-5)
    assert not any(key.startswith("val/" if split == "test" else "test/") for key in scores)


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_eval_refuses_data_with_other_classes(train_cfg, cli, tmp_path):
    run_train(train_cfg(out=tmp_path / "run"))
    result = cli("eval", f"ckpt={tmp_path / 'run' / 'weights' / 'last.ckpt'}", "data=shapes", cwd=tmp_path)
    assert result.returncode == 2
    assert "has 5 classes x 3 channels but the checkpoint was trained on 10 x 1" in result.stderr


def _lr_and_weights(run_dir):
    rows = read_csv(run_dir / "results.csv")
    state = torch.load(run_dir / "weights" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return [float(r["lr"]) for r in rows], state


class StopAfter:
    """Interrupts a run at the end of an epoch, as a killed job would leave it (last.ckpt written)."""

    def __new__(cls, epochs: int):
        import pytorch_lightning as pl

        class _Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch + 1 >= epochs:
                    trainer.should_stop = True

        return _Stop()


RESUME = ("trainer.max_epochs=4", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
          "scheduler=cosine", "model.drop_rate=0.3", "data.augment=true")


def test_interrupted_and_resumed_run_equals_uninterrupted(train_cfg, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(train_cfg(*RESUME, out=full))
    run_train(train_cfg(*RESUME, out=part), extra_callbacks=[StopAfter(2)])
    lrs_part, _ = _lr_and_weights(part)
    assert len(lrs_part) == 2
    run_train(train_cfg(*RESUME, f"resume={part / 'weights' / 'last.ckpt'}", out=part))
    lrs_full, weights_full = _lr_and_weights(full)
    lrs_resumed, weights_resumed = _lr_and_weights(part)
    assert lrs_resumed == pytest.approx(lrs_full, abs=0)
    assert weights_full.keys() == weights_resumed.keys()
    for key in weights_full:
        torch.testing.assert_close(weights_resumed[key], weights_full[key], rtol=0, atol=0, msg=key)
    # The resumed run kept its best from before the interruption: it reports what the uninterrupted run reports.
    metrics_full, metrics_resumed = (json.loads((run / "metrics.json").read_text()) for run in (full, part))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert metrics_resumed[key] == metrics_full[key], key
    best_full, best_resumed = (torch.load(run / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
                               for run in (full, part))
    assert best_resumed["epoch"] == best_full["epoch"]


def test_resume_with_more_epochs_replans_the_schedule(train_cfg, tmp_path):
    import math

    run = tmp_path / "run"
    short = [o for o in RESUME if not o.startswith("trainer.max_epochs")]
    run_train(train_cfg(*short, "trainer.max_epochs=2", out=run))
    run_train(train_cfg(*short, "trainer.max_epochs=4", f"resume={run / 'weights' / 'last.ckpt'}", out=run))
    lrs, _ = _lr_and_weights(run)
    base = 3e-3  # adamw's lr; cosine steps per epoch, results.csv records the lr after each epoch's step
    planned_for_2 = [base * (1 + math.cos(math.pi * e / 2)) / 2 for e in (1, 2)]
    planned_for_4 = [base * (1 + math.cos(math.pi * e / 4)) / 2 for e in (3, 4)]
    assert lrs == pytest.approx(planned_for_2 + planned_for_4, abs=1e-9)


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_sweep_prints_and_writes_a_sorted_leaderboard(cli, tmp_path):
    result = cli("sweep", "trainer=debug", "optimizer=sgd,adam", "logger=none", "data.batch_size=16",
                 "~callbacks.progress_bar", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    (board,) = (tmp_path / "runs" / "classification" / "sweeps").glob("*/leaderboard.csv")
    rows = read_csv(board)
    assert sorted(r["overrides"] for r in rows) == ["optimizer=adam", "optimizer=sgd"]
    accs = [float(r["val/acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    for row in rows:
        job_metrics = json.loads((board.parent / row["job"] / "metrics.json").read_text())
        assert float(row["val/acc"]) == pytest.approx(job_metrics["val/acc"])
    assert "leaderboard (val/acc, higher is better)" in result.stdout
