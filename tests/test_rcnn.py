"""R-CNN's stages (`cvlab train model=rcnn`): the fine-tuning windows and their 32 + 96 batches, the SVMs' hard
negatives (all below IoU 0.3), the ridge targets and the whitening folded back into one linear map, the settings
checks, and the whole pipeline on tiny data with fake proposals: metrics.json, a checkpoint that `cvlab eval` scores
the same, and a rerun that skips every finished stage (and reruns only what a changed setting touches)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import cvlab.engine.rcnn as rcnn
from conftest import FAST
from cvlab.data.regions import RegionBatchSampler, RegionDataset, SplitBoxes
from cvlab.engine import restore_task, run_train
from cvlab.engine.rcnn import (
    RegionFeatures,
    check_settings,
    finetune_config,
    fit_box_regressors,
    fit_class_regressor,
    mine_class_svm,
    regression_targets,
)
from cvlab.utils.config import compose
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny data: 8 / 4 / 4 shape scenes of 64 px, 16 px windows, the test split in one batch.
TINY = ["model=rcnn", "task=detection", "data=shapes_det", "data.train_size=8", "data.val_size=4",
        "data.image_size=64", "data.batch_size=4", "model.warp_size=16", "model.pipeline.features.images=null",
        "model.pipeline.timing_images=2"]


def grid_proposals(image, mode="fast", max_proposals=2000, min_size=8):
    """A stand-in for selective search: squares of 12, 20 and 32 px on a grid (a function of the image size only)."""
    height, width = image.shape[-2:]
    boxes = [[x, y, min(x + side, width), min(y + side, height)] for side in (12, 20, 32)
             for y in range(0, height - side // 2, side // 2) for x in range(0, width - side // 2, side // 2)]
    return torch.tensor(boxes, dtype=torch.float32)[:max_proposals]


# ------------------------------------------------------------------------------------------------- windows
def boxes_of_one_image() -> SplitBoxes:
    gt = np.array([[0, 0, 10, 10]], np.float32)
    proposals = np.array([[0, 0, 10, 9], [0, 0, 10, 5], [0, 0, 10, 4.9], [20, 20, 30, 30]], np.float32)
    return SplitBoxes(proposals, np.array([4]), gt, np.array([2]), np.array([1]))


def test_windows_are_the_objects_and_proposals_labelled_by_iou_0_5():
    regions = RegionDataset([None], boxes_of_one_image(), warp_size=16, padding=1.0)
    # the object itself, IoU 0.9, exactly 0.5 (positive: >=), 0.49 and 0 (background); class 2 is label 3
    assert regions.labels.tolist() == [3, 3, 3, 0, 0]
    assert regions.windows[0].tolist() == [0, 0, 10, 10] and regions.image_index.tolist() == [0] * 5


def test_a_batch_holds_32_positive_and_96_background_windows_redrawn_each_epoch():
    labels = torch.tensor([0] * 500 + [1, 2, 3] * 20)
    sampler = RegionBatchSampler(labels, 32, 96, batches=3, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    for batch in batches:
        assert len(batch) == 128
        assert (labels[batch[:32]] > 0).all() and (labels[batch[32:]] == 0).all()
    assert list(sampler) == batches  # the same epoch replays
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(UserError, match="0 positive"):
        RegionBatchSampler(torch.zeros(10, dtype=torch.int64), 32, 96, 1)


def test_split_boxes_round_trip_through_npy_without_pickle(tmp_path):
    boxes = boxes_of_one_image()
    boxes.save(tmp_path, "val")
    again = SplitBoxes.load(tmp_path, "val")
    for got, want in zip(again.image(0), boxes.image(0)):
        assert torch.equal(got, want)
    np.save(tmp_path / "val_gt_counts.npy", np.array([2]))  # no longer adds up
    with pytest.raises(UserError, match="cannot read the val boxes"):
        SplitBoxes.load(tmp_path, "val")


# ------------------------------------------------------------------------------------------------- SVMs and ridge
def synthetic_regions(rng, positives=40, negatives=400, near=60, dimension=8) -> RegionFeatures:
    """Class 0: ground-truth windows around +1, proposals near the objects (IoU 0.3-0.6, never negatives) and far
    ones (IoU < 0.3) spread around -1, some of them on the positive side."""
    features = np.concatenate([rng.normal(1, 0.5, (positives, dimension)),
                               rng.normal(0.5, 0.5, (near, dimension)),
                               rng.normal(-1, 1.0, (negatives, dimension))]).astype(np.float32)
    total = len(features)
    overlaps = np.concatenate([np.ones(positives), rng.uniform(0.3, 0.6, near),
                               rng.uniform(0, 0.3, negatives)]).astype(np.float32)[:, None]
    gt_label = np.concatenate([np.zeros(positives), -np.ones(near + negatives)]).astype(np.int64)
    zeros = np.zeros(total, np.float32)
    return RegionFeatures(features, np.zeros(total, np.int64), np.zeros((total, 4), np.float32), gt_label, overlaps,
                          np.zeros((total, 4), np.float32), np.zeros(total, np.int64), zeros)


SVM = {"C": 0.001, "positive_weight": 2.0, "bg_iou": 0.3, "rounds": 3, "hard_score": -1.0, "max_iter": 10000}


def test_svm_negatives_are_below_iou_0_3_and_mining_adds_the_hard_ones(monkeypatch):
    regions = synthetic_regions(np.random.default_rng(0))
    monkeypatch.setattr(rcnn, "INITIAL_NEGATIVES", 20)  # a first cache much smaller than the pool, as on real data
    weight, bias, record = mine_class_svm(regions, 0, 1.0, SVM, seed=0)
    negatives = record["negatives"]
    assert record["positives"] == 40 and record["pool"] == 400
    assert (regions.overlaps[negatives, 0] < 0.3).all()  # never the near windows (0.3 <= IoU < 0.6) or the objects
    assert record["added"][0] > 0  # the first SVM, trained on 20 negatives, had negatives inside its margin
    # the last round left no hard negative out of the cache (or the rounds ran out)
    scores = regions.features[np.flatnonzero(regions.overlaps[:, 0] < 0.3)] @ weight + bias
    pool = np.flatnonzero(regions.overlaps[:, 0] < 0.3)
    outside = np.setdiff1d(pool[scores > -1.0], negatives)
    assert len(record["added"]) <= 3 and (not len(outside) or len(record["added"]) == 3)
    assert (regions.features[:40] @ weight + bias).mean() > 0 > (regions.features[100:] @ weight + bias).mean()


def test_ridge_targets_are_the_papers_and_the_whitening_folds_back_into_one_map():
    proposal, gt = np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([[1.0, 2.0, 13.0, 12.0]])
    tx, ty, tw, th = regression_targets(gt, proposal)[0]
    # centres (5, 5) -> (7, 7), sizes 10 x 10 -> 12 x 10
    assert (tx, ty, tw, th) == pytest.approx((0.2, 0.2, math.log(1.2), 0.0))
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 6))
    mapping, offset = rng.normal(size=(4, 6)) * 0.1, np.array([0.05, -0.02, 0.1, 0.0])
    targets = features @ mapping.T + offset
    weight, bias = fit_class_regressor(features, targets, alpha=1e-6)
    assert np.allclose(weight, mapping, atol=1e-5) and np.allclose(bias, offset, atol=1e-5)
    shrunk, _ = fit_class_regressor(features, targets, alpha=1000.0)
    assert np.abs(shrunk).sum() < np.abs(weight).sum()  # lambda = 1000 shrinks the map


def test_box_regression_trains_on_proposals_with_iou_0_6_of_their_class_only():
    rng = np.random.default_rng(2)
    windows = np.array([[0, 0, 10, 10]] * 12, np.float32)
    matched = windows + np.array([1, 1, 1, 1], np.float32)  # every object 1 px right and down of its window
    iou = np.array([1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.59, 0.3, 0.9, 0.9, 0.9, 0.9], np.float32)
    label = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    gt_label = np.array([0] + [-1] * 11)  # the first window is an object itself
    regions = RegionFeatures(rng.normal(size=(12, 4)).astype(np.float32), np.zeros(12, np.int64), windows, gt_label,
                             np.zeros((12, 2), np.float32), matched, label, iou)
    weight, bias, record = fit_box_regressors(regions, 2, 1.0, {"alpha": 1.0, "min_iou": 0.6})
    assert record["samples"] == [5, 4]  # class 0: IoU 0.9 .. 0.6 (not the object, not 0.59 or 0.3)
    assert weight.shape == (8, 4) and bias.shape == (8,)
    assert record["iou_after"] > record["iou_before"]
    few, _, sparse = fit_box_regressors(regions, 2, 1.0, {"alpha": 1.0, "min_iou": 0.7})
    assert sparse["samples"] == [3, 4] and not few[:4].any()  # too few samples: class 0 left unregressed


# ------------------------------------------------------------------------------------------------- settings
def test_settings_are_checked_and_trainer_max_epochs_replaces_the_fine_tuning_epochs(tmp_path):
    cfg = compose("train", TINY)
    pipeline = OmegaConf.to_container(cfg.model.pipeline)
    assert finetune_config(cfg, pipeline).trainer.max_epochs == pipeline["finetune"]["epochs"] == 6
    assert compose("train", [*TINY, "trainer.max_epochs=2"]).trainer.max_epochs == 2
    assert finetune_config(compose("train", [*TINY, "trainer.max_epochs=2"]), pipeline).trainer.max_epochs == 2
    tuned = finetune_config(cfg, pipeline)
    assert tuned.model == {"name": "resnet18", "task": "classification", "stem": "standard"}
    assert tuned.task.name == "classification" and tuned.task.monitor == "val/acc"
    assert tuned.data.warp_size == 16 and tuned.data.positives == 32 and tuned.data.background == 96
    with pytest.raises(UserError, match="model.pipeline.svm.C"):
        check_settings({**pipeline, "svm": {**pipeline["svm"], "C": 0}})
    with pytest.raises(UserError, match="unknown key model.pipeline.svm.round"):
        check_settings({**pipeline, "svm": {**pipeline["svm"], "round": 2}})
    with pytest.raises(UserError, match="sampler=class_balanced"):
        run_train(compose("train", [*FAST, *TINY, "sampler=class_balanced", f"paths.output_dir={tmp_path}"]))
    assert not (tmp_path / "proposals").exists()  # refused before the first stage


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The whole pipeline once on tiny data with grid proposals (cached in a folder of this module's own)."""
    out = tmp_path_factory.mktemp("rcnn")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr("cvlab.ops.proposals.selective_search", grid_proposals)
        cfg = compose("train", [*FAST, *TINY, f"paths.output_dir={out}"])
        metrics, objects = run_train(cfg)
        yield out, cfg, metrics, objects, patch


def test_the_pipeline_writes_every_stage_and_a_detection_run(pipeline_run):
    out, _, metrics, objects, _ = pipeline_run
    stages = ("proposals", "finetune", "features", "svms", "box_regression", "test")
    summary = json.loads((out / "stages.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == list(stages)
    saved = json.loads((out / "metrics.json").read_text())
    assert 0 <= saved["test/map_50"] <= 1 and saved["test/map_50"] == metrics["test/map_50"]
    assert saved["test/proposal_s_per_image"] > 0 and saved["test/network_s_per_image"] > 0
    assert set(saved["ap50_per_class"]) <= {"circle", "square", "triangle", "diamond", "cross"}
    assert all(saved[f"time/{stage}_s"] >= 0 for stage in stages) and saved["time/finetune_s"] > 0
    assert saved["train_time_s"] == pytest.approx(sum(saved[f"time/{stage}_s"] for stage in stages[:-1]), abs=0.05)
    # the data's sizes took effect: 8 / 4 / 4 images, each with its grid proposals inside 64 px
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        boxes = SplitBoxes.load(out / "proposals", split)
        assert len(boxes) == count and (boxes.proposal_counts == len(grid_proposals(torch.zeros(3, 64, 64)))).all()
    # fine-tuning: trainer.max_epochs=1 (FAST) and two 128-window batches (limit_train_batches=2)
    finetune = json.loads((out / "finetune" / "metrics.json").read_text())
    assert finetune["epochs"] == 1 and (out / "finetune" / "weights" / "best.ckpt").is_file()
    classifier = restore_task(out / "finetune" / "weights" / "best.ckpt")  # a (K + 1)-way classifier of 16 px windows
    assert classifier.name == "classification" and classifier.data_info.image_size == 16
    assert classifier.class_names == ["background", "circle", "square", "triangle", "diamond", "cross"]
    features, train = RegionFeatures.load(out / "features"), SplitBoxes.load(out / "proposals", "train")
    # every window of the 8 training images (features.images=null): its objects and its proposals
    assert features.features.shape == (int(train.proposal_counts.sum() + train.gt_counts.sum()), 512)
    assert (features.gt_label >= 0).sum() == len(train.gt_labels)
    assert np.load(out / "svms" / "weight.npy").shape == (5, 512)
    assert np.load(out / "box_regression" / "weight.npy").shape == (20, 512)
    assert (out / "test" / "pr_curves.png").is_file() and (out / "test" / "metrics.json").is_file()
    assert objects["task"].model.feature_scale.item() == pytest.approx(
        json.loads((out / "features" / "stage.json").read_text())["metrics"]["feature_scale"])


def test_its_checkpoint_restores_as_a_detection_task_and_eval_gives_the_same_test_figure(pipeline_run, tmp_path):
    from cvlab.run.eval import run_eval

    out, _, metrics, _, _ = pipeline_run
    ckpt = out / "test" / "weights" / "best.ckpt"
    task = restore_task(ckpt)
    assert task.name == "detection" and task.hparams.model["name"] == "rcnn"
    assert "pipeline" not in task.hparams.model and task.model.svm.weight.abs().sum() > 0
    evaluated, _ = run_eval(compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path}", "trainer=cpu"]))
    assert evaluated["test/map_50"] == pytest.approx(metrics["test/map_50"], abs=1e-6)
    assert evaluated["test/map"] == pytest.approx(metrics["test/map"], abs=1e-6)


def test_a_rerun_skips_every_finished_stage_and_a_changed_setting_reruns_only_what_it_touches(pipeline_run,
                                                                                             monkeypatch):
    out, cfg, metrics, _, patch = pipeline_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    fit_svms = rcnn.fit_svms
    monkeypatch.setattr(rcnn, "extract_features", must_not_run)
    monkeypatch.setattr(rcnn, "fit_svms", must_not_run)
    again, objects = run_train(cfg)
    assert again["test/map_50"] == metrics["test/map_50"]
    assert all(result.skipped for result in objects["stages"].values())
    # one mining round instead of three, and another evaluation batch size: the SVMs and the test stage run again,
    # the features, the fine-tuning and the proposals do not (a loader's batch size changes none of them)
    monkeypatch.setattr(rcnn, "fit_svms", fit_svms)
    changed, objects = run_train(compose("train", [*FAST, *TINY, f"paths.output_dir={out}",
                                                   "model.pipeline.svm.rounds=1", "data.batch_size=2"]))
    ran = [name for name, result in objects["stages"].items() if not result.skipped]
    assert ran == ["svms", "test"]
    assert 0 <= changed["test/map_50"] <= 1

