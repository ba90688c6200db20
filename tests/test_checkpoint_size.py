"""A finished run's best.ckpt keeps only the weights and what restoring the task needs; last.ckpt keeps what a resume
needs (issue 11, "Checkpoint size")."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import FAST
from cvlab.callbacks.checkpoint import WEIGHTS_ONLY_KEYS, keep_weights_only
from cvlab.engine import run_train
from cvlab.utils.config import compose
from cvlab.utils.errors import UserError

# AdamW (the default optimizer) keeps two moments per weight: last.ckpt holds about three times the weights.
SMALL = ["model=mobilenetv1", "model.width_mult=0.25", "trainer.max_epochs=2", "trainer.limit_test_batches=null"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A two-epoch AdamW run: (run directory, its metrics.json)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(compose("train", [*FAST, *SMALL, f"paths.output_dir={out}"]))
    return out, json.loads((out / "metrics.json").read_text())


def test_best_keeps_only_the_weights_and_what_restoring_needs(finished):
    run, _ = finished
    best, last = load(run / "weights" / "best.ckpt"), load(run / "weights" / "last.ckpt")
    assert set(best) == set(WEIGHTS_ONLY_KEYS) == {
        "state_dict", "hyper_parameters", "hparams_name", "cvlab_task", "epoch", "global_step",
        "pytorch-lightning_version", "best_score"}
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(last)
    assert best["cvlab_task"] == "classification" and best["hyper_parameters"]["model"]["name"] == "mobilenetv1"
    assert best["hyper_parameters"]["data_info"]["num_classes"] == 10
    # the weights keep their dtype: the same tensors' names and dtypes as the full last.ckpt
    assert {k: v.dtype for k, v in best["state_dict"].items()} == {k: v.dtype for k, v in last["state_dict"].items()}
    assert best["state_dict"]["model.classifier.1.weight"].dtype == torch.float32


def test_best_score_and_epoch_are_those_of_the_best_validation_epoch(finished):
    run, metrics = finished
    with open(run / "results.csv", newline="") as file:
        scores = [float(row["val/acc"]) for row in csv.DictReader(file)]
    best = load(run / "weights" / "best.ckpt")
    assert best["best_score"] == {"monitor": "val/acc", "mode": "max", "score": pytest.approx(max(scores), abs=1e-6)}
    assert best["epoch"] == scores.index(max(scores))
    assert metrics["val/acc"] == pytest.approx(max(scores), abs=1e-6)


def test_best_is_at_most_a_third_of_last_and_near_the_weights_floor(finished):
    run, _ = finished
    best, last = (run / "weights" / name for name in ("best.ckpt", "last.ckpt"))
    state = load(best)["state_dict"]
    floor = sum(t.numel() * t.element_size() for t in state.values())
    assert best.stat().st_size * 2.5 <= last.stat().st_size
    # torch.save's zip archive: a 64-byte aligned record per tensor, plus the pickle of the hyper-parameters
    assert floor < best.stat().st_size < floor + 600 * len(state) + 64_000


def test_eval_of_the_stripped_best_reproduces_the_test_figures_exactly(finished, tmp_path):
    from cvlab.run.eval import run_eval

    run, metrics = finished
    scores, _ = run_eval(compose("eval", [f"ckpt={run / 'weights' / 'best.ckpt'}", "trainer=debug",
                                          "trainer.limit_test_batches=null", f"paths.output_dir={tmp_path}"]))
    test_keys = sorted(key for key in metrics if key.startswith("test/"))
    assert test_keys and {key: scores[key] for key in test_keys} == {key: metrics[key] for key in test_keys}


def test_resume_from_the_stripped_best_is_refused_naming_last(finished, tmp_path):
    run, _ = finished
    best = run / "weights" / "best.ckpt"
    cfg = compose("train", [*FAST, *SMALL, f"resume={best}", f"paths.output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(UserError) as refused:
        run_train(cfg)
    assert str(refused.value) == (
        f"resume checkpoint {str(best)!r} holds only the weights (a finished run's best.ckpt keeps no optimizer or "
        f"loop state); resume from {run / 'weights' / 'last.ckpt'}.")


def test_distill_takes_a_stripped_best_as_teacher(finished, tmp_path):
    # What `cvlab distill teacher.ckpt=` does with the file before any stage runs: restore, check, score (the whole
    # pipeline on a stripped teacher runs in test_distill's sweep test).
    from cvlab.engine import build_datamodule, evaluate_checkpoint, restore_task
    from cvlab.tasks.distillation import check_teacher

    run, metrics = finished
    best = run / "weights" / "best.ckpt"
    cfg = compose("train", [*FAST, *SMALL, f"paths.output_dir={tmp_path}"])
    datamodule = build_datamodule(cfg)
    teacher = check_teacher(restore_task(best, "teacher.ckpt", "best.ckpt"), datamodule.info, "digits", str(best))
    scores = evaluate_checkpoint(teacher, datamodule, cfg.trainer, tmp_path, "test")
    assert scores["test/acc"] == metrics["test/acc"]


def test_stripping_is_atomic_and_leaves_a_stripped_file_alone(finished, tmp_path, monkeypatch):
    import shutil

    run, _ = finished
    full = tmp_path / "full.ckpt"
    shutil.copyfile(run / "weights" / "last.ckpt", full)
    before = full.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match="No space left"):
            keep_weights_only(full, "val/acc", "max", 0.5)
    assert full.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["full.ckpt"]
    keep_weights_only(full, "val/acc", "max", 0.5)
    assert load(full)["best_score"] == {"monitor": "val/acc", "mode": "max", "score": 0.5}
    stripped = full.read_bytes()
    keep_weights_only(full, "val/acc", "max", 0.9)  # already stripped (a resume kept the earlier best): untouched
    assert full.read_bytes() == stripped
