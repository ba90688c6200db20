"""EasyEnsemble and BalanceCascade (strategy=easy_ensemble|balance_cascade): the balanced draws' class counts, the
cascade's shrinking majority pool and its thresholds on a hand-made example, probability averaging against a hand
computation, a member's budget (strategy.budget: a plain run's optimiser steps, or the run's epochs), the refusals,
and `cvlab train data=digits_lt strategy=...` end to end with tiny budgets (member stages, one row each plus the
ensemble's, the ensemble's figures recomputed from the saved member probabilities, a rerun that skips the finished
members)."""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from conftest import CVLAB, DIGITS_LT_COUNTS, QUIET
from cvlab.data.balanced import BalancedDrawDataModule, balanced_draw, majority_classes, read_pool
from cvlab.engine import build_datamodule, run_train
from cvlab.engine.ensembles import (
    average_probabilities,
    cascade_rates,
    check_strategy,
    member_config,
    shrink_pool,
)
from cvlab.metrics.classification import frequency_groups, score_probabilities
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A tiny member: MobileNetV1 at a quarter width; batches of 32 hold a member's 20 images (no dropped last batch).
TINY = ["data=digits_lt", "model=mobilenetv1", "model.width_mult=0.25", "data.batch_size=32", "optimizer=sgd"]


# ------------------------------------------------------------------------------------------------- balanced draws
def test_a_balanced_draw_keeps_the_minority_and_as_many_of_every_other_class():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    drawn = balanced_draw(labels, None, seed=0)
    assert np.bincount(labels[drawn]).tolist() == [3, 3, 3]
    assert set(range(16, 19)) <= set(drawn.tolist())  # the minority, all of it
    assert drawn.tolist() == sorted(set(drawn.tolist()))  # without replacement, in order
    other = balanced_draw(labels, None, seed=1)
    assert np.bincount(labels[other]).tolist() == [3, 3, 3] and other.tolist() != drawn.tolist()
    assert balanced_draw(labels, None, seed=0).tolist() == drawn.tolist()  # seeded
    # From a pool: only its images, down to the pool's smallest class (class 1 holds 2 of them here).
    pool = np.array([0, 1, 2, 3, 4, 10, 11, 16, 17, 18])
    from_pool = balanced_draw(labels, pool, seed=0)
    assert set(from_pool.tolist()) <= set(pool.tolist())
    assert np.bincount(labels[from_pool]).tolist() == [2, 2, 2]
    assert majority_classes([10, 6, 3, 3]) == [0, 1] and majority_classes([5, 5]) == []


def test_a_members_data_view_is_a_balanced_draw_of_digits_lt_and_keeps_the_splits(train_cfg, tmp_path):
    cfg = train_cfg(*TINY, "strategy=easy_ensemble")
    plain = build_datamodule(cfg)
    views = [build_datamodule(member_config(cfg, member, None, "epochs")) for member in (1, 2)]
    for member, view in zip((1, 2), views):
        assert isinstance(view, BalancedDrawDataModule) and view.order_seed == 42 + member - 1
        assert np.bincount(view.resampled_labels).tolist() == [2] * 10
        assert len(view.train_set) == 20 and len(view.train_dataloader().sampler) == 20
        assert len(view.train_dataloader()) == 1  # budget=epochs: one step an epoch (plain CE: 10)
        # the losses and the frequency groups see the split's counts, before the draw
        assert list(view.info.class_counts) == DIGITS_LT_COUNTS == list(plain.info.class_counts)
        minority = np.flatnonzero(np.asarray(plain.train_labels) == 9)
        assert set(minority.tolist()) <= set(view.drawn.tolist())
        for split in ("val_set", "test_set"):  # every member is chosen and scored on the run's own splits
            assert torch.equal(getattr(view, split)[5][0], getattr(plain, split)[5][0])
            assert len(getattr(view, split)) == 270
    assert views[0].drawn.tolist() != views[1].drawn.tolist()  # each member draws anew
    # a pool file (BalanceCascade's later members): the draw comes from it alone
    pool = np.concatenate([np.flatnonzero(np.asarray(plain.train_labels) == label)[:3] for label in range(10)])
    np.save(tmp_path / "pool.npy", pool)  # 3 of each class, 2 of class 9 (all it has)
    view = build_datamodule(member_config(cfg, 3, str(tmp_path / "pool.npy"), "steps"))
    assert set(view.drawn.tolist()) <= set(pool.tolist()) and np.bincount(view.resampled_labels).tolist() == [2] * 10


def test_a_steps_budget_gives_a_member_epochs_of_the_splits_length(train_cfg):
    cfg = train_cfg(*TINY, "strategy=easy_ensemble")
    assert check_strategy(cfg).budget == "epochs"  # the default
    assert check_strategy(train_cfg(*TINY, "strategy=easy_ensemble", "strategy.budget=steps")).budget == "steps"
    plain = build_datamodule(cfg)
    assert len(plain.train_dataloader()) == 336 // 32 == 10  # the last short batch dropped
    view = build_datamodule(member_config(cfg, 1, None, "steps"))
    loader = view.train_dataloader()
    assert len(view.drawn) == 20 and len(loader.sampler) == 336 and len(loader) == 10
    # Each epoch: each of the 20 drawn images 16 or 17 times (336 = 16 x 20 + 16), the 16 that come once more
    # drawn anew each epoch; only the draw's images are read.
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        draws = list(loader.sampler)
        assert max(draws) == 19 and sorted(np.bincount(draws).tolist()) == [16] * 4 + [17] * 16
        epochs.append(np.bincount(draws))
    assert not np.array_equal(*epochs)
    items = {view.train_set.base.indices[i] for i in range(336)}
    assert items == set(view.drawn.tolist())
    with pytest.raises(UserError, match="sampler=class_balanced resamples the training split"):
        build_datamodule(member_config(train_cfg(*TINY, "sampler=class_balanced"), 1, None, "steps"))


def test_members_train_the_plain_runs_steps_and_schedule(train_cfg, tmp_path, monkeypatch):
    """One epoch, every batch: plain CE's 10 optimiser steps (336 images in batches of 32) and its warm-up cosine
    plan of 10 steps, for each member with strategy.budget=steps (the default, epochs: 1, the 20 drawn images, as
    the data view test shows)."""
    from cvlab.engine import ensembles

    full = ["trainer.limit_train_batches=null", "trainer.max_epochs=1"]
    _, plain = run_train(train_cfg(*TINY, *full, out=tmp_path / "plain"))
    plan = plain["trainer"].lr_scheduler_configs[0].scheduler.total_steps
    assert plain["trainer"].global_step == plan == 10
    trainers = []
    real_run_train = ensembles.run_train

    def recorded(cfg):
        metrics, objects = real_run_train(cfg)
        trainers.append(objects["trainer"])
        return metrics, objects

    monkeypatch.setattr(ensembles, "run_train", recorded)
    out = tmp_path / "ensemble"
    run_train(train_cfg(*TINY, *full, "strategy=easy_ensemble", "strategy.members=2", "strategy.budget=steps",
                        out=out))
    rows = _rows(out)
    assert [rows[m]["steps"] for m in ("member1", "member2")] == [10, 10]
    assert [rows[m]["train_images"] for m in ("member1", "member2")] == [20, 20]
    assert [(t.global_step, t.lr_scheduler_configs[0].scheduler.total_steps) for t in trainers] == [(10, 10)] * 2


def test_a_pool_file_is_data_checked_before_use(tmp_path):
    np.save(tmp_path / "out_of_range.npy", np.array([0, 5, 99]))
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.0]))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert read_pool(tmp_path / "out_of_range.npy", 100).tolist() == [0, 5, 99]
    for name, message in (("out_of_range.npy", "unique training images 0..49"), ("floats.npy", "integer indices"),
                          ("objects.npy", "cannot read"), ("missing.npy", "cannot read")):
        with pytest.raises(UserError, match=message):
            read_pool(tmp_path / name, 50)


# ------------------------------------------------------------------------------------------------- the cascade
def test_cascade_rates_take_each_majority_class_to_the_minority_in_t_minus_1_members():
    rates = cascade_rates([8, 4, 2, 2], members=3)
    assert rates.tolist() == pytest.approx([0.5, math.sqrt(0.5), 1.0, 1.0])  # (2 / n_c)^(1 / 2)
    assert cascade_rates([8, 4, 2], members=3, fpr=0.25).tolist() == [0.25, 0.25, 1.0]
    assert cascade_rates([8, 4, 2], members=2).tolist() == pytest.approx([0.25, 0.5, 1.0])  # all the way at once


def test_the_strategy_settings_reach_the_cascade(train_cfg):
    counts = [8, 4, 2]
    default = check_strategy(train_cfg("strategy=balance_cascade"))
    assert (default.method, default.members, default.fpr) == ("balance_cascade", 4, None)
    assert default.rates(counts).tolist() == pytest.approx([0.25 ** (1 / 3), 0.5 ** (1 / 3), 1.0])
    chosen = check_strategy(train_cfg("strategy=balance_cascade", "strategy.members=3", "strategy.fpr=0.25"))
    assert chosen.members == 3 and chosen.rates(counts).tolist() == [0.25, 0.25, 1.0]
    assert check_strategy(train_cfg("strategy=easy_ensemble", "strategy.members=5")).members == 5


def test_shrink_pool_drops_the_majority_images_the_member_is_surest_of():
    labels = np.array([0] * 8 + [1] * 4 + [2] * 2)
    confidence = np.array([0.9, 0.1, 0.8, 0.3, 0.95, 0.2, 0.6, 0.4,  # class 0
                           0.7, 0.2, 0.9, 0.5,  # class 1
                           0.99, 0.98])  # class 2, the minority: never dropped, however sure the member is
    rates = cascade_rates(np.bincount(labels), members=3)
    pool, thresholds = shrink_pool(np.arange(14), labels, confidence, rates, n_min=2)
    # class 0 keeps round(0.5 * 8) = 4, its least confident: 0.1, 0.2, 0.3, 0.4 (θ = 0.4; 0.6, 0.8, 0.9, 0.95 go);
    # class 1 keeps round(0.707 * 4) = 3: 0.2, 0.5, 0.7 (θ = 0.7; 0.9 goes); class 2 keeps both.
    assert pool.tolist() == [1, 3, 5, 7, 8, 9, 11, 12, 13]
    assert thresholds == {0: 0.4, 1: 0.7}
    assert all(confidence[i] > thresholds[labels[i]] for i in set(range(12)) - set(pool.tolist()))
    # The second member: class 0 keeps round(0.5 * 4) = 2, class 1 round(0.707 * 3) = 2 = n_min, as the paper's f
    # promises after T - 1 = 2 members.
    later = np.array([0.0, 0.5, 0.0, 0.1, 0.0, 0.9, 0.0, 0.3, 0.6, 0.8, 0.0, 0.1, 0.5, 0.5])
    pool, thresholds = shrink_pool(pool, labels, later, rates, n_min=2)
    assert np.bincount(labels[pool]).tolist() == [2, 2, 2]
    assert pool.tolist() == [3, 7, 8, 11, 12, 13] and thresholds == {0: 0.3, 1: 0.6}
    # strategy.fpr=0.25 for every class, never below n_min: class 0 keeps 2, class 1 max(2, 1) = 2
    pool, _ = shrink_pool(np.arange(14), labels, confidence, cascade_rates(np.bincount(labels), 3, 0.25), n_min=2)
    assert pool.tolist() == [1, 5, 9, 11, 12, 13]


# ------------------------------------------------------------------------------------------------- combining
def test_the_ensemble_averages_probabilities_rather_than_voting():
    members = [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.4, 0.6], [0.4, 0.6]]),
               torch.tensor([[0.45, 0.55], [0.3, 0.7]])]
    averaged = average_probabilities(members)
    assert averaged.flatten().tolist() == pytest.approx([1.75 / 3, 1.25 / 3, 0.3, 0.7])
    assert averaged.argmax(1).tolist() == [0, 1]  # two of three members vote class 1 for the first image
    scores = score_probabilities(averaged, torch.tensor([0, 0]), num_classes=2)
    # one of two right; class 0's recall 1/2, class 1 never true: balanced accuracy over the true classes, 0.5;
    # F1 of class 0: 2 * 1 * 0.5 / 1.5 = 2/3, of class 1 (one false positive): 0, macro 1/3
    assert (scores["acc"], scores["balanced_acc"], scores["f1"]) == pytest.approx((0.5, 0.5, 1 / 3))
    assert scores["recall_per_class"] == [0.5, None]


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("overrides", "expected"), [
    (["strategy=easy_ensemble", "strategy.members=1"], "strategy.members must be an integer >= 2"),
    (["strategy=balance_cascade", "strategy.budget=step"], "strategy.budget is one of steps, epochs; got 'step'"),
    (["strategy=balance_cascade", "strategy.fpr=1.0"], "strategy.fpr must be a number in (0, 1)"),
    (["strategy=easy_ensemble", "sampler=smote"], "Leave sampler=none"),
    (["strategy=balance_cascade", "resume=last.ckpt"], "not with resume="),
    (["strategy=easy_ensemble", "trainer.devices=2"], "Use trainer.devices=1"),
    (["strategy=easy_ensemble", "data=shapes_det", "model=yolov3_tiny", "task=detection"],
     "task=detection is not classification"),
])
def test_bad_settings_are_one_line_user_errors(train_cfg, overrides, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")) as error:
        check_strategy(train_cfg(*overrides))
    assert "\n" not in str(error.value)


def test_cvlab_distill_refuses_a_strategy(tmp_path):
    from cvlab.run.distill import run_distill
    from cvlab.utils.config import compose

    cfg = compose("distill", ["strategy=easy_ensemble", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError, match="strategy=easy_ensemble is a method of cvlab train"):
        run_distill(cfg)


def test_cli_lists_the_strategies_and_refuses_a_bad_one_in_one_line(cli_here):
    listed = cli_here("list", "strategy")
    assert listed.returncode == 0, listed.stderr
    for option, words in (("none", "One model"), ("easy_ensemble", "EasyEnsemble (Liu, Wu & Zhou 2009)"),
                          ("balance_cascade", "imbalanced-learn removed it in 0.6")):
        assert f" {option} " in listed.stdout and words in listed.stdout.replace("\n", " ")
    refused = cli_here("train", "strategy=easy_ensemble", "strategy.fpr=0.5")  # fpr is BalanceCascade's alone
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "strategy.fpr" in refused.stderr


# ------------------------------------------------------------------------------------------------- end to end
def _rows(run) -> dict:
    return {row["stage"]: row for row in json.loads((run / "stages.json").read_text())["stages"]}


def _assert_ensemble_is_the_members_mean(run, members: int) -> dict:
    """The ensemble's figures, recomputed here (sklearn) from the members' saved probabilities."""
    saved = [np.load(run / f"member{m}" / "predictions.npz") for m in range(1, members + 1)]
    ensemble = _rows(run)["ensemble"]
    few = frequency_groups(DIGITS_LT_COUNTS)["few"]
    for split in ("val", "test"):
        labels = saved[0][f"{split}_labels"]
        assert all(np.array_equal(member[f"{split}_labels"], labels) for member in saved) and len(labels) == 270
        mean = np.mean([member[f"{split}_probabilities"] for member in saved], axis=0)
        assert np.allclose(np.load(run / "ensemble" / "predictions.npz")[f"{split}_probabilities"], mean, atol=1e-6)
        predicted = mean.argmax(1)
        assert ensemble[f"{split}/acc"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
        assert ensemble[f"{split}/balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-6)
        assert ensemble[f"{split}/f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-6)
        recall = recall_score(labels, predicted, average=None, labels=list(range(10)), zero_division=0)
        assert ensemble[f"{split}/recall_few"] == pytest.approx(recall[few].mean(), abs=1e-6)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "test/acc", "test/balanced_acc", "test/f1", "test/recall_few"):
        assert metrics[key] == ensemble[key]
    return metrics


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    """`cvlab train data=digits_lt strategy=balance_cascade strategy.members=2` as typed, tiny budgets."""
    cwd = tmp_path_factory.mktemp("cascade")
    env = {**os.environ, "CVLAB_RUNS": str(cwd / "runs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*CVLAB, "train", "strategy=balance_cascade", "strategy.members=2", *QUIET, *TINY],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "runs" / "classification" / "mobilenetv1").iterdir()
    return run, result


def _assert_pools_follow_the_members(run, members: int) -> dict:
    """Each member's pool is what the member before it left: :func:`shrink_pool` recomputed here from that member's
    saved probabilities of the training images; returns the rows."""
    rows = _rows(run)
    train = np.load(run / "member1" / "predictions.npz")["train_labels"]
    assert np.bincount(train).tolist() == DIGITS_LT_COUNTS
    rates = cascade_rates(DIGITS_LT_COUNTS, members=members)
    pool = np.arange(len(train))
    for member in range(1, members):
        probabilities = np.load(run / f"member{member}" / "predictions.npz")["train_probabilities"]
        pool, thresholds = shrink_pool(pool, train, probabilities[np.arange(len(train)), train], rates, 2)
        assert np.array_equal(np.load(run / f"member{member}" / "next_pool.npy"), pool)
        assert np.array_equal(np.load(run / f"member{member + 1}" / "pool.npy"), pool)
        assert rows[f"member{member}"]["thresholds"] == pytest.approx({str(c): t for c, t in thresholds.items()})
        assert rows[f"member{member}"]["next_majority_pool"] == rows[f"member{member + 1}"]["majority_pool"]
    last = f"member{members}"
    assert "next_majority_pool" not in rows[last] and not (run / last / "next_pool.npy").exists()
    return rows


def test_cli_balance_cascade_trains_members_on_a_shrinking_pool_and_averages_them(cascade):
    run, result = cascade
    rows = _assert_pools_follow_the_members(run, 2)
    assert list(rows) == ["member1", "member2", "ensemble"]
    for member in (1, 2):
        for name in ("weights/best.ckpt", "results.csv", "metrics.json", "stage.json", "predictions.npz"):
            assert (run / f"member{member}" / name).is_file(), f"member{member}/{name}"
        assert rows[f"member{member}"]["train_images"] == 20 and rows[f"member{member}"]["seed"] == 41 + member
        assert rows[f"member{member}"]["steps"] == 1  # budget=epochs: the 20 drawn images, one batch
    # The majority pool each member drew from: all 334 majority images, then (T = 2: f_c = 2 / n_c) the minority's
    # count, 2, of each of the 9 majority classes.
    assert [rows[f"member{m}"]["majority_pool"] for m in (1, 2)] == [334, 18]
    assert list(rows["member1"]["majority_pool_per_class"].values()) == DIGITS_LT_COUNTS[:9]
    assert list(rows["member2"]["majority_pool_per_class"].values()) == [2] * 9
    _assert_ensemble_is_the_members_mean(run, 2)
    table = result.stdout[result.stdout.index("BalanceCascade: 2 x mobilenetv1 on digits_lt"):]
    header = next(line for line in table.splitlines() if "train images" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "", "train images", "steps", "majority pool", "val acc", "test acc", "test bal. acc", "test macro-F1",
        "test few recall"]
    lines = [line for line in table.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == [
        "member 1", "member 2", "BalanceCascade (mean probability)"]
    assert lines[1].split("│")[4].strip() == "18" and f"{rows['ensemble']['test/f1']:.4f}" in lines[2]


@pytest.mark.slow
def test_a_three_member_cascade_halves_the_log_count_each_member(train_cfg, tmp_path):
    out = tmp_path / "run"
    run_train(train_cfg(*TINY, "strategy=balance_cascade", "strategy.members=3", out=out))
    rows = _assert_pools_follow_the_members(out, 3)
    # f_c = (2 / n_c)^(1/2): class c keeps round(sqrt(2 n_c)) after member 1, then 2, the minority's count
    assert [rows[f"member{m}"]["majority_pool"] for m in (1, 2, 3)] == [334, 66, 18]
    assert list(rows["member2"]["majority_pool_per_class"].values()) == [16, 12, 10, 8, 6, 5, 4, 3, 2]
    assert list(rows["member3"]["majority_pool_per_class"].values()) == [2] * 9
    _assert_ensemble_is_the_members_mean(out, 3)


def test_a_member_checkpoint_evaluates_on_its_runs_splits(cascade):
    from cvlab.engine import checkpoint_datamodule, restore_task

    run, _ = cascade
    task = restore_task(run / "member2" / "weights" / "best.ckpt", "member checkpoint", "best.ckpt")
    assert task.hparams.data["pool"] == str(run / "member2" / "pool.npy")
    datamodule = checkpoint_datamodule(task, None, 0)
    assert isinstance(datamodule, BalancedDrawDataModule) and len(datamodule.test_set) == 270
    assert set(datamodule.drawn.tolist()) <= set(np.load(run / "member2" / "pool.npy").tolist())


def test_easy_ensemble_members_are_independent_draws_and_resume(train_cfg, tmp_path, monkeypatch):
    from cvlab.engine import ensembles

    out = tmp_path / "run"
    metrics, _ = run_train(train_cfg(*TINY, "strategy=easy_ensemble", "strategy.members=2", out=out))
    rows = _rows(out)
    assert list(rows) == ["member1", "member2", "ensemble"]
    assert [rows[m]["majority_pool"] for m in ("member1", "member2")] == [334, 334]  # always the whole split
    draws = [torch.load(out / m / "weights" / "best.ckpt", weights_only=True)["hyper_parameters"]["data"]
             for m in ("member1", "member2")]
    assert [(d["_target_"], d["seed"], d["pool"]) for d in draws] == [
        ("cvlab.data.balanced.BalancedDrawDataModule", 42, None)] * 2
    assert _assert_ensemble_is_the_members_mean(out, 2) == metrics
    # A third member later: the two finished ones are skipped (an EasyEnsemble member does not depend on T),
    # member3 and the ensemble run.
    trained = []
    real_run_train = ensembles.run_train
    monkeypatch.setattr(ensembles, "run_train", lambda cfg: trained.append(int(cfg.seed)) or real_run_train(cfg))
    run_train(train_cfg(*TINY, "strategy=easy_ensemble", "strategy.members=3", out=out))
    assert trained == [44]
    assert [(row["stage"], row["skipped"]) for row in json.loads((out / "stages.json").read_text())["stages"]] == [
        ("member1", True), ("member2", True), ("member3", False), ("ensemble", False)]
    _assert_ensemble_is_the_members_mean(out, 3)
