"""sampler.space=features: imbalanced-learn's samplers on embeddings, then the classifier head re-trained on them
(Kang et al. 2020's classifier re-training). Resampled counts and SMOTE's interpolation checked by hand, the head
found in the zoo's classifiers (and refused where there is none), the head's re-training loop on a hand-made
problem, `cvlab train data=digits_lt sampler=smote sampler.space=features` end to end with tiny budgets (the
embeddings' class counts, an encoder left exactly as it trained while its head changed, the whole model's val
score equal to the head's best epoch, figures other than the encoder's and pixel-space SMOTE's), a given encoder
checkpoint, a rerun that skips what did not change, and the refusals."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CVLAB, DIGITS_LT_COUNTS, QUIET
from cvlab.data.classification import ClassificationDataModule
from cvlab.data.imbalance import Resampler
from cvlab.engine import build_datamodule, restore_task, run_train
from cvlab.engine.feature_resampling import (
    Embeddings,
    HeadMonitor,
    classifier_head,
    extract_embeddings,
    find_head,
    retrain_head,
)
from cvlab.tasks.base import build_model
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small budget: ResNet-18 (its head: fc, 512 -> 10; MobileNetV1 on 8x8 digits gives every image one embedding
# after two epochs) for two epochs of 11 batches, a whole epoch of digits_lt's 336 images, or 352 of pixel-space
# SMOTE's 1,220; every evaluation sees the whole split, so the head stage's val score can be checked against its own.
TINY = ["data=digits_lt", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=11",
        "trainer.limit_val_batches=null", "trainer.limit_test_batches=null"]
FEATURES = ["sampler=smote", "sampler.space=features", "sampler.head_epochs=3"]
HEAD = "model.fc."


# ------------------------------------------------------------------------------------------------- resampling
def test_feature_space_resampling_gives_imbalanced_learns_counts_by_hand():
    # Three classes of 2-D embeddings: 6 on the line y = 0, 3 on y = 10, 2 on y = 20.
    features = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [0, 10], [1, 10], [2, 10], [0, 20], [4, 20]],
                        dtype=np.float32)
    labels = [0] * 6 + [1] * 3 + [2] * 2
    smote = Resampler(labels, 0, "smote", space="features")
    assert smote.lowered == "k_neighbors 5 -> 1 (the smallest class has 2 images)"
    resampled, resampled_labels, indices = smote.resample(features)
    assert np.bincount(resampled_labels).tolist() == [6, 6, 6] and indices is None
    assert np.array_equal(resampled[:11], features)  # the originals first, then 3 + 4 new ones
    new, new_labels = resampled[11:], resampled_labels[11:]
    assert new_labels.tolist() == [1, 1, 1, 2, 2, 2, 2]
    # each new embedding lies between two of its class: on its line, within the class's extent
    assert np.all(new[:, 1] == 10 * new_labels) and np.all((new[:, 0] >= 0) & (new[:, 0] <= 4))
    assert np.all(new[new_labels == 1, 0] <= 2)
    # sampling_strategy keeps imbalanced-learn's meaning: {class: count} after resampling (text keys as typed)
    chosen = Resampler(labels, 0, "smote", space="features", sampling_strategy={"2": 4}).resample(features)[1]
    assert np.bincount(chosen).tolist() == [6, 3, 4]
    under, under_labels, kept = Resampler(labels, 0, "random_under", space="features").resample(features)
    assert np.bincount(under_labels).tolist() == [2, 2, 2] and np.array_equal(under, features[kept])
    assert np.bincount(Resampler(labels, 0, "random_over", space="features").resample(features)[1]).tolist() == [6] * 3


# ------------------------------------------------------------------------------------------------- the head
def _model(name: str, image_size: int = 8, **kwargs) -> nn.Module:
    layers = {"norm": {"name": "default"}, "activation": {"name": "default"}, "attention": {"name": "none"},
              "init": {"name": "default"}}
    return build_model({"name": name, **kwargs}, *layers.values(), num_classes=10, in_chans=1, image_size=image_size)


@pytest.mark.parametrize("name, kwargs, image_size, head, in_features", [
    ("resnet18", {}, 8, "fc", 512),
    ("mobilenetv1", {"width_mult": 0.25}, 8, "classifier.1", 256),
    ("vit_tiny", {}, 32, "head", 192),
])
def test_the_classifier_head_is_the_linear_layer_that_gives_the_logits(name, kwargs, image_size, head, in_features):
    model = _model(name, image_size, **kwargs)
    found = classifier_head(model, 10, 1, image_size)
    assert found is model.get_submodule(head) and found.in_features == in_features
    assert model.training  # the probe leaves the model's mode as it was


def test_a_model_without_a_linear_head_is_refused():
    model = _model("darknet19")  # Darknet-19 classifies each position with a 1x1 convolution, then averages
    assert classifier_head(model, 10, 1, 8) is None
    info = type("Info", (), {"num_classes": 10, "in_chans": 1, "image_size": 8})
    with pytest.raises(UserError, match=r"model=darknet19 gives its logits through no linear classifier head"):
        find_head(model, info, "darknet19")


def _separable(count: int, seed: int) -> Embeddings:
    """Three classes of 4-D embeddings around three corners."""
    generator = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), count)
    centres = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], dtype=np.float32)
    return Embeddings((centres[labels] + generator.normal(0, 1, (len(labels), 4))).astype(np.float32), labels)


def test_retrain_head_trains_the_head_alone_from_a_seeded_start_and_keeps_its_best_epoch():
    train, val = _separable(30, 0), _separable(20, 1)
    monitor = HeadMonitor("val/acc", "max", nn.CrossEntropyLoss(), 3, {})
    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5}
    runs = []
    for _ in range(2):
        head = nn.Linear(4, 3)
        history, best = retrain_head(head, train, val, nn.CrossEntropyLoss(), optimizer, 5, 16, seed=3,
                                     monitor=monitor)
        runs.append((history, best, head.weight.detach().clone()))
        assert len(history) == 5 and history[best - 1] == max(history) and history.index(max(history)) == best - 1
        assert monitor.score(head, val) == max(history)  # the head keeps its best epoch's weights
        assert max(history) > 0.85  # three separable clusters: far above chance
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][2], runs[1][2])  # the start and the order are seeded
    loss = HeadMonitor("val/loss", "min", nn.CrossEntropyLoss(), 3, {})
    history, best = retrain_head(nn.Linear(4, 3), train, val, nn.CrossEntropyLoss(), optimizer, 4, 16, 3, loss)
    assert history[best - 1] == min(history)
    with pytest.raises(UserError, match=r"task.monitor=val/auc: .* one of val/loss, val/acc, val/f1"):
        HeadMonitor("val/auc", "max", nn.CrossEntropyLoss(), 3, {})


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    """`cvlab train data=digits_lt sampler=smote sampler.space=features` as typed, tiny budgets."""
    cwd = tmp_path_factory.mktemp("features")
    env = {**os.environ, "CVLAB_RUNS": str(cwd / "runs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*CVLAB, "train", *FEATURES, *QUIET, *TINY], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "runs" / "classification" / "resnet18").iterdir()
    rows = {row["stage"]: row for row in json.loads((run / "stages.json").read_text())["stages"]}
    return run, rows, result.stdout


def _state(ckpt) -> dict:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def test_cli_feature_space_smote_resamples_the_encoders_embeddings(feature_run, train_cfg):
    run, rows, _ = feature_run
    assert list(rows) == ["encoder", "features", "head"] and not any(row["skipped"] for row in rows.values())
    saved = np.load(run / "features" / "embeddings.npz")
    # SMOTE up to the largest class: 122 of each, 336 originals then 884 new embeddings of 512 values
    assert np.bincount(saved["train_labels"]).tolist() == [122] * 10 and saved["train_features"].shape == (1220, 512)
    assert rows["features"]["resampled"] == 1220 and rows["features"]["train_images"] == 336
    assert rows["features"]["lowered"] == "k_neighbors 5 -> 1 (the smallest class has 2 images)"
    # The originals are the encoder's embeddings of the training images in eval mode, without augmentation.
    encoder = restore_task(run / "encoder" / "weights" / "best.ckpt")
    data = build_datamodule(train_cfg(*TINY))
    original = extract_embeddings(encoder.model, encoder.model.fc, data.train_eval_dataloader(), torch.device("cpu"))
    assert np.bincount(original.labels).tolist() == DIGITS_LT_COUNTS
    assert np.array_equal(saved["train_labels"][:336], original.labels)
    assert np.allclose(saved["train_features"][:336], original.features, atol=1e-5)
    # Class 9 has two images, so each of its 120 new embeddings lies on the segment between them (k = 1).
    a, b = original.features[original.labels == 9]
    new = saved["train_features"][336:][saved["train_labels"][336:] == 9]
    share = (new - a) @ (b - a) / ((b - a) @ (b - a))
    assert len(new) == 120 and np.all((share >= 0) & (share <= 1))
    assert np.allclose(a + share[:, None] * (b - a), new, atol=1e-4)
    assert saved["val_features"].shape == (270, 512)


def test_cli_feature_space_retrains_the_head_alone_and_scores_the_whole_model(feature_run):
    run, rows, stdout = feature_run
    encoder = _state(run / "encoder" / "weights" / "best.ckpt")
    retrained = _state(run / "head" / "weights" / "best.ckpt")
    assert encoder.keys() == retrained.keys()
    frozen = [key for key in encoder if not key.startswith(HEAD)]
    assert len(frozen) > 50 and any("running_mean" in key for key in frozen)
    assert all(torch.equal(encoder[key], retrained[key]) for key in frozen)  # weights and BatchNorm statistics
    assert sorted(set(encoder) - set(frozen)) == [HEAD + "bias", HEAD + "weight"]
    assert not torch.allclose(encoder[HEAD + "weight"], retrained[HEAD + "weight"])
    head = rows["head"]
    history = head["head_history"]["per_epoch"]
    assert head["head_history"]["monitor"] == "val/acc" and len(history) == 3 and head["head_params"] == 5130
    # The whole model, scored by the classification task on the 270 validation images, is the head's best epoch.
    assert head["val/acc"] == pytest.approx(max(history), abs=1e-6) and history[head["best_epoch"] - 1] == max(history)
    # Re-training changed what the model predicts (so the option cannot be silently ignored).
    figures = ("test/acc", "test/balanced_acc", "test/f1")
    assert [head[key] for key in figures] != [rows["encoder"][key] for key in figures]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "test/acc", "test/balanced_acc", "test/f1", "test/gmean", "test/recall_few"):
        assert metrics[key] == head[key]
    assert metrics["encoder/test/balanced_acc"] == rows["encoder"]["test/balanced_acc"] and metrics["resampled"] == 1220
    for name in ("encoder/results.csv", "head/metrics.json", "head/confusion_matrix.png"):
        assert (run / name).is_file(), name
    table = stdout[stdout.index("classifier re-training on smote embeddings: resnet18 on digits_lt"):]
    lines = [line for line in table.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == [
        "encoder (no sampler)", "embeddings resampled (smote)", "head re-trained"]
    assert "336 -> 1,220 embeddings (smote)" in lines[1] and f"{head['test/balanced_acc']:.4f}" in lines[2]


def test_feature_space_differs_from_pixel_space(feature_run, train_cfg, tmp_path):
    _, rows, _ = feature_run
    pixels, objects = run_train(train_cfg(*FEATURES[:1], *TINY, out=tmp_path / "pixels"))
    assert np.bincount(objects["datamodule"].resampled_labels).tolist() == [122] * 10  # SMOTE on the images
    figures = ("test/acc", "test/balanced_acc", "test/f1")
    assert [pixels[key] for key in figures] != [rows["head"][key] for key in figures]


def test_a_given_encoder_is_used_as_it_is_and_a_rerun_skips_what_did_not_change(feature_run, train_cfg, tmp_path):
    run, rows, _ = feature_run
    ckpt = run / "encoder" / "weights" / "best.ckpt"
    out = tmp_path / "given"
    # Another run seed (SMOTE's draws and the head's start) on the same split (data.seed): an encoder trained anew
    # at seed 7 would give other embeddings; the given one gives the same.
    given = [*FEATURES, *TINY, f"sampler.encoder={ckpt}", "seed=7", "data.seed=42"]
    metrics, _ = run_train(train_cfg(*given, out=out))
    stages = {row["stage"]: row for row in json.loads((out / "stages.json").read_text())["stages"]}
    assert stages["encoder"]["trained_on"] == "sampler.encoder (best.ckpt)"
    assert stages["encoder"]["test/acc"] == rows["encoder"]["test/acc"]
    assert not (out / "encoder" / "weights").exists()  # nothing trained
    ours, theirs = np.load(out / "features" / "embeddings.npz"), np.load(run / "features" / "embeddings.npz")
    assert np.allclose(ours["train_features"][:336], theirs["train_features"][:336], atol=1e-6)
    assert not np.allclose(ours["train_features"][336:], theirs["train_features"][336:])  # seed 7's synthesis
    assert metrics["encoder/test/acc"] == rows["encoder"]["test/acc"]
    # Only the head's epochs change: the encoder and the embeddings are reused.
    run_train(train_cfg(*given, "sampler.head_epochs=1", out=out))
    again = json.loads((out / "stages.json").read_text())["stages"]
    assert [(row["stage"], row["skipped"]) for row in again] == [("encoder", True), ("features", True),
                                                                 ("head", False)]
    assert len(again[2]["head_history"]["per_epoch"]) == 1


def test_an_encoder_of_another_model_or_data_is_refused(feature_run, train_cfg):
    run, _, _ = feature_run
    ckpt = run / "encoder" / "weights" / "best.ckpt"
    with pytest.raises(UserError, match=r"sampler.encoder holds a resnet18, but the run's model is mobilenetv1: "
                                        r"add model=resnet18"):
        run_train(train_cfg(*FEATURES, "data=digits_lt", "model=mobilenetv1", f"sampler.encoder={ckpt}"))
    with pytest.raises(UserError, match=r"sampler.encoder was trained on 10 classes \(0, 1, 2, 3, ...\) of 1x8x8 but "
                                        r"data=digits32 has 10 classes \(0, 1, 2, 3, ...\) of \dx32x32"):
        run_train(train_cfg(*FEATURES, "data=digits32", f"sampler.encoder={ckpt}"))


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, message", [
    (["sampler=class_balanced", "sampler.space=features"],
     r"^sampler.space does not apply to sampler=class_balanced; it is a setting of sampler=enn, nearmiss, random_over, "
     r"random_under, smote, smote_enn.$"),
    (["sampler=smote", "sampler.encoder=runs/x/weights/best.ckpt"],
     r"sampler.encoder gives the network whose embeddings sampler.space=features resamples; sampler.space=pixels"),
    (["sampler=smote", "sampler.space=features", "sampler.head_epochs=0"],
     r"sampler.head_epochs must be an integer >= 1"),
])
def test_bad_feature_space_settings_are_refused_on_the_command_line(overrides, message):
    from cvlab.utils.config import check_overrides

    with pytest.raises(UserError, match=message):
        check_overrides("train", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["sampler=class_balanced", "+sampler.space=features"],
     r"sampler=class_balanced draws among the training images themselves and has no feature space; .*"
     r"sampler=random_over sampler.space=features re-trains the head on class-balanced embeddings"),
    ([*FEATURES, "sampler.encoder=/nowhere/best.ckpt"], r"sampler.encoder '/nowhere/best.ckpt' does not exist"),
    ([*FEATURES, "model=darknet19"], r"model=darknet19 gives its logits through no linear classifier head"),
    ([*FEATURES, "resume=last.ckpt"], r"resumes a killed run by running it again in the same run directory"),
    ([*FEATURES, "data=digits_lt", "sampler.sampling_strategy={0: 10}"],  # fewer than class 0 has: no over-sampling
     r"sampler=smote: imbalanced-learn refuses it: With over-sampling methods, the number of samples in a class"),
])
def test_bad_feature_space_runs_are_refused_before_training(train_cfg, monkeypatch, overrides, message):
    from cvlab.engine import feature_resampling

    monkeypatch.setattr(feature_resampling, "run_train", lambda cfg: pytest.fail("an encoder trained"))
    with pytest.raises(UserError, match=message):
        run_train(train_cfg(*overrides))


def test_feature_space_runs_only_as_the_train_pipeline(train_cfg):
    smote = {"_target_": "cvlab.data.imbalance.Resampler", "name": "smote", "method": "smote", "space": "features"}
    datamodule = ClassificationDataModule(source="digits", image_size=8, in_chans=1, sampler=smote)  # checks pass
    with pytest.raises(UserError, match=r"sampler=smote sampler.space=features re-trains .* use sampler.space=pixels"):
        datamodule.setup()
    with pytest.raises(UserError, match=r"sampler.space=features trains as separate stages \(feature_resampling\), "
                                        r"which take no extra training callbacks"):
        run_train(train_cfg(*FEATURES), extra_callbacks=[object()])


def test_cvlab_distill_refuses_feature_space_before_training(tmp_path):
    from cvlab.run.distill import run_distill
    from cvlab.utils.config import compose

    cfg = compose("distill", ["sampler=smote", "sampler.space=features", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError, match="sampler=smote sampler.space=features re-trains a classifier's head"):
        run_distill(cfg)
    assert not any(tmp_path.iterdir())  # refused before the teacher's stage wrote anything
