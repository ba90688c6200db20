"""task=anomaly: the normal-class view of the data, the measures against scikit-learn's, the three detectors
(autoencoder, isolation_forest, one_class_svm), a run of each end to end with its checkpoint evaluated again, and
bad input as one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from conftest import FAST
from cvlab.cli import complete_task
from cvlab.data.classification import ClassificationDataModule
from cvlab.engine import build_datamodule, run_train
from cvlab.metrics.anomaly import AnomalyScores, anomaly_measures
from cvlab.models import create_model
from cvlab.models.anomaly.feature_outliers import rotations
from cvlab.utils.config import check, compose
from cvlab.utils.errors import UserError
from test_fuzz import refusal

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A tiny run: every validation and test image (so both normal images and anomalies), two training epochs of one
# batch each, and for the rotation network the standard stem, which shrinks the 8x8 digits at once.
TINY = [*FAST, "data.batch_size=64", "trainer.max_epochs=2", "trainer.limit_val_batches=null",
        "trainer.limit_test_batches=null"]
CHEAP_TRUNK = ["model.backbone_args.stem=standard"]


def digits(**kwargs) -> ClassificationDataModule:
    datamodule = ClassificationDataModule(source="digits", name="digits", image_size=8, **kwargs)
    datamodule.setup()
    return datamodule


# ------------------------------------------------------------------------------------------------- data
def test_the_training_split_holds_only_the_normal_classes():
    full, normal = digits(), digits(normal_classes=[0, "3"])  # an index and a class name
    counts = np.bincount(full.train_labels, minlength=10)
    assert normal.normal_labels == [0, 3] and sorted(set(normal.train_labels)) == [0, 3]
    assert len(normal.train_set) == counts[0] + counts[3] == 124 + 128
    assert normal.info.class_counts == tuple(int(counts[c]) if c in (0, 3) else 0 for c in range(10))
    # validation and test keep every class, image for image
    for split in ("val_set", "test_set"):
        assert [label for _, label in getattr(normal, split)] == [label for _, label in getattr(full, split)]
    single = digits(normal_classes=7)
    assert single.normal_labels == [7] and len(single.train_set) == counts[7]
    assert full.normal_labels is None and len(full.train_set) == counts.sum()


def test_the_task_yaml_gives_the_default_normal_class_and_data_normal_classes_replaces_it():
    assert compose("train", complete_task(["task=anomaly"])).data.normal_classes == [0]
    assert compose("train", complete_task(["task=anomaly", "data.normal_classes=4"])).data.normal_classes == 4
    assert compose("train", []).data.normal_classes is None  # classification reads every class


def test_fitting_reads_the_training_images_without_augmentation():
    datamodule = digits(normal_classes=[1], augment=True)
    fitted = torch.cat([images for images, _ in datamodule.train_eval_dataloader()])
    evaluation = datamodule.val_set.transform
    expected = torch.stack([evaluation(image) for image, _ in datamodule.train_set.base])
    assert torch.equal(fitted, expected) and len(fitted) == len(datamodule.train_set)


# ------------------------------------------------------------------------------------------------- measures
def test_the_measures_on_a_hand_example():
    # normal class 0: 0.1, 0.4; anomalies 0.35 (class 1), 0.8 (class 2). Flagging >= 0.35 finds both anomalies with
    # one false alarm: precision 2/3, recall 1, F1 0.8 (>= 0.4: 0.5 / 0.5; >= 0.8: 1 / 0.5; >= 0.1: 0.5 / 1).
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 2])
    figures = anomaly_measures(scores, labels, [0], 3)
    assert figures["auroc"] == pytest.approx(0.75)  # 3 of the 4 (normal, anomaly) pairs in order
    assert figures["auprc"] == pytest.approx((1 + 2 / 3) / 2)
    assert (figures["f1"], figures["threshold"], figures["anomaly_rate"]) == (pytest.approx(0.8), 0.35, 0.5)
    per_class = figures["per_class"]
    assert per_class["images"] == [2, 1, 1] and per_class["mean_score"] == pytest.approx([0.25, 0.35, 0.8])
    assert per_class["flagged"] == [0.5, 1.0, 1.0] and per_class["auroc"] == [None, 0.5, 1.0]
    # scores far outside [0, 1] (a one-class SVM's) rank the same: nothing squashes them
    shifted = anomaly_measures(scores * 100 + 1000, labels, [0], 3)
    assert [shifted[key] for key in ("auroc", "auprc", "f1")] == pytest.approx([0.75, (1 + 2 / 3) / 2, 0.8])
    assert shifted["threshold"] == pytest.approx(1035)


def test_the_measures_equal_sklearns_on_random_scores_in_batches():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    anomalous = ~np.isin(labels, [1, 3])
    scores = rng.normal(size=300) + anomalous * 0.8  # anomalies score higher, with overlap
    metric = AnomalyScores(normal_labels=[1, 3], num_classes=5)
    for part in np.array_split(np.arange(300), 4):
        metric.update(torch.from_numpy(scores[part]), torch.from_numpy(labels[part]))
    figures = metric.compute()
    assert figures["auroc"] == pytest.approx(roc_auc_score(anomalous, scores), abs=1e-6)
    assert figures["auprc"] == pytest.approx(average_precision_score(anomalous, scores), abs=1e-6)
    best = max(f1_score(anomalous, scores >= threshold) for threshold in np.unique(scores))
    assert figures["f1"] == pytest.approx(best, abs=1e-6)
    assert f1_score(anomalous, scores >= figures["threshold"]) == pytest.approx(best, abs=1e-6)
    normal = scores[~anomalous]
    mine = scores[labels == 4]
    assert figures["per_class"]["auroc"][4] == pytest.approx(
        roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(mine))], np.r_[normal, mine]), abs=1e-6)
    metric.reset()
    metric.update(torch.ones(3), torch.tensor([1, 3, 1]))  # no anomaly in the split: undefined, not a number
    assert np.isnan(metric.compute()["auroc"])


# ------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(("shape", "params"), [((1, 8, 8), 46_161), ((3, 32, 32), 174_035)])
def test_the_autoencoder_reconstructs_scores_its_error_and_trains_every_parameter(shape, params):
    torch.manual_seed(0)
    model = create_model("autoencoder", in_chans=shape[0], image_size=shape[1])
    assert sum(p.numel() for p in model.parameters()) == params
    images = torch.randn(4, *shape)
    reconstruction = model(images)
    assert reconstruction.shape == images.shape and torch.isfinite(reconstruction).all()
    scores = model.anomaly_score(images)
    assert scores.shape == (4,)
    assert torch.allclose(scores, ((model(images) - images) ** 2).mean(dim=(1, 2, 3)))
    model.training_loss(images).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_autoencoder_refuses_a_size_its_stages_cannot_halve():
    with pytest.raises(UserError, match=r"data.image_size=10 is no multiple of 4 .* set data.image_size=8"):
        create_model("autoencoder", image_size=10)


def test_the_rotation_network_features_and_its_gradients():
    torch.manual_seed(0)
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("isolation_forest").parameters()) == 11_169_732
    model = create_model("isolation_forest", backbone_args={"stem": "standard"})
    images = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8)
    turned = rotations(images)
    assert turned.shape == (8, 1, 8, 8) and torch.equal(turned[2:4], images.rot90(1, dims=(2, 3)))
    assert torch.equal(turned[6, 0], images[0, 0].rot90(3))
    assert model(images).shape == (2, 4)
    model.eval()
    features = model.features(images)
    assert features.shape == (2, model.num_features) == (2, 4 * 512)
    assert torch.allclose(features[:, 512:1024], model.pooled(images.rot90(1, dims=(2, 3))), atol=1e-6)
    model.train()
    model.training_loss(torch.randn(4, 1, 8, 8)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["isolation_forest", "one_class_svm"])
def test_the_estimator_is_fitted_on_features_reproducibly_and_scores_outliers_higher(name):
    torch.manual_seed(0)
    model = create_model(name, backbone_args={"stem": "standard"}).eval()
    images = torch.randn(6, 1, 8, 8)
    with pytest.raises(RuntimeError, match="fit"):
        model.anomaly_score(images)
    normal = torch.randn(200, model.num_features, dtype=torch.float64)
    model.fit(normal)
    scaler, estimator = model.scorer
    assert scaler.n_samples_seen_ == 200 and estimator.n_features_in_ == model.num_features
    outliers = torch.randn(20, model.num_features, dtype=torch.float64) * 4
    normality = model.scorer.score_samples(torch.cat([normal[:20], outliers]).numpy())
    assert (-normality[20:]).mean() > (-normality[:20]).mean()
    first = model.anomaly_score(images)
    model.fit(normal)  # the same features give the same estimator (the forest is seeded)
    assert torch.equal(model.anomaly_score(images), first)


def test_a_setting_sklearn_refuses_is_one_line():
    model = create_model("one_class_svm", nu=2.0, backbone_args={"stem": "standard"})
    with pytest.raises(UserError, match=r"OneClassSVM refuses model.kernel=rbf, model.nu=2.0, model.gamma=scale"):
        model.fit(torch.randn(10, model.num_features))


# ------------------------------------------------------------------------------------------------- runs
def anomaly_cfg(out: Path, *overrides: str):
    """The train config `cvlab train ...overrides` composes (the CLI's completion and checks), as a tiny run."""
    return check("train", complete_task([*TINY, *overrides, f"paths.output_dir={out}"])).cfg


@pytest.mark.parametrize("model", ["autoencoder", "isolation_forest",
                                   pytest.param("one_class_svm", marks=pytest.mark.slow)])  # make test-slow
def test_each_method_runs_end_to_end_and_its_checkpoint_scores_the_same_again(model, tmp_path):
    from cvlab.run.eval import run_eval

    trunk = CHEAP_TRUNK if model != "autoencoder" else []
    metrics, objects = run_train(anomaly_cfg(tmp_path / "run", f"model={model}", *trunk))
    run = tmp_path / "run"
    written = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0 <= written[f"{split}/auroc"] <= 1 and 0 <= written[f"{split}/f1"] <= 1
        assert written[f"{split}/anomaly_rate"] == pytest.approx(0.9, abs=0.01)  # 9 of the 10 digits
        assert written[f"{split}/auprc"] >= written[f"{split}/anomaly_rate"] - 0.05
    per_class = written["test/per_class"]
    assert written["normal_classes"] == ["0"] and per_class["0"]["auroc"] is None
    assert sum(entry["images"] for entry in per_class.values()) == len(objects["datamodule"].test_set)
    assert (run / "roc_curve.png").stat().st_size > 0
    assert "val/auroc" in (run / "results.csv").read_text().splitlines()[0].split(",")
    assert objects["task"].figures["test"]["auroc"] == pytest.approx(metrics["test/auroc"])
    if objects["task"].model.needs_fit:  # fitted on the 124 normal training digits (every one, unaugmented)
        assert objects["task"].model.scorer[0].n_samples_seen_ == len(objects["datamodule"].train_set) == 124
    # cvlab eval: the checkpoint alone (the estimator fitted again, nothing unpickled) gives the same figures
    again, _ = run_eval(compose("eval", [f"ckpt={run / 'weights' / 'best.ckpt'}", "split=test",
                                         f"paths.output_dir={tmp_path / 'eval'}"]))
    assert again["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)
    assert again["test/f1"] == pytest.approx(metrics["test/f1"], abs=1e-6)


@pytest.mark.slow
def test_the_autoencoder_reaches_an_auroc_of_090_on_digits_at_its_defaults(tmp_path):
    """The issue's number: one digit normal (0), the other nine anomalies, `cvlab train task=anomaly` as it is."""
    overrides = ["task=anomaly", "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
                 f"paths.output_dir={tmp_path / 'run'}"]
    metrics, _ = run_train(check("train", complete_task(overrides)).cfg)
    assert metrics["test/auroc"] >= 0.90


# ------------------------------------------------------------------------------------------------- bad input
def test_the_cli_completes_the_anomaly_task_and_refuses_what_it_does_not_read(capsys):
    assert complete_task(["task=anomaly"]) == ["model=autoencoder", "data=digits", "~loss", "task=anomaly"]
    assert complete_task(["model=one_class_svm"])[:3] == ["task=anomaly", "data=digits", "~loss"]
    line = refusal(capsys, "train", ["model=autoencoder", "loss=focal"])
    assert "task=anomaly does not read loss" in line and "drop loss=focal" in line
    line = refusal(capsys, "train", ["task=anomaly", "model=resnet18"])
    assert "task=anomaly takes one of autoencoder, isolation_forest, one_class_svm" in line


@pytest.mark.parametrize(("normal", "expected"), [
    ("[12]", "data.normal_classes: there is no class 12; the data's 10 classes are 0..9 (0, 1, 2"),
    ("[zero]", "data.normal_classes: the data has no class named 'zero'. Give class indices 0..9 or names"),
    ("[0,1,2,3,4,5,6,7,8,9]", "data.normal_classes names all 10 classes, so no class is left to be an anomaly; name "
                              "fewer, e.g. data.normal_classes=[0]"),
])
def test_normal_classes_the_data_cannot_give_are_one_line(normal, expected, capsys):
    overrides = ["task=anomaly", f"data.normal_classes={normal}"]
    assert refusal(capsys, "train", overrides) is None  # well-formed: the data is read to tell
    with pytest.raises(UserError) as error:
        build_datamodule(check("train", complete_task(overrides)).cfg)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


@pytest.mark.parametrize("normal", ["[]", "true", "[[0]]"])
def test_malformed_normal_classes_are_refused_before_anything_is_read(normal, capsys):
    line = refusal(capsys, "train", ["task=anomaly", f"data.normal_classes={normal}"])
    assert line is not None and "data.normal_classes" in line


def test_a_bad_normal_class_through_the_real_command_is_one_line_exit_2(cli_here):
    result = cli_here("train", "task=anomaly", "data.normal_classes=[12]", "logger=none")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "there is no class 12" in lines[0] and "Traceback" not in result.stdout + result.stderr
