"""The imbalance metrics of every classification run: per-class recall, balanced accuracy and G-mean equal sklearn's
and imbalanced-learn's on the same predictions (and a hand computation); the many / medium / few frequency groups
follow the training counts; a tiny long-tailed run writes them all to metrics.json, equal to a recomputation from the
run's confusion matrix, prints the per-class recall table, and a study reports them as columns."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from imblearn.metrics import geometric_mean_score
from sklearn.metrics import balanced_accuracy_score, recall_score

from conftest import DIGITS_LT_COUNTS
from cvlab.metrics.classification import ClassRecalls, frequency_groups

DIGITS_LT_GROUPS = {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}


def _scores(truth, predicted, num_classes: int, groups=None, batches: int = 1) -> dict:
    """ClassRecalls of class-index predictions, given in ``batches`` updates."""
    metric = ClassRecalls(num_classes, groups)
    for y, p in zip(torch.tensor(truth).tensor_split(batches), torch.tensor(predicted).tensor_split(batches)):
        metric.update(p, y)
    return metric.compute()


def test_scores_equal_a_hand_computation_and_sklearn_imblearn():
    # Class 0: 4 of 4 right, class 1: 1 of 2, class 2: 1 of 4.
    truth = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 0, 0, 0, 1, 0, 2, 0, 1, 1]
    scores = _scores(truth, predicted, 3, batches=3)
    assert scores["recall_per_class"].tolist() == [1.0, 0.5, 0.25]
    assert scores["balanced_acc"].item() == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert scores["gmean"].item() == pytest.approx((1 * 0.5 * 0.25) ** (1 / 3))  # 0.5
    assert scores["balanced_acc"].item() == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert scores["gmean"].item() == pytest.approx(geometric_mean_score(truth, predicted))
    assert scores["balanced_acc"].item() != pytest.approx(sum(t == p for t, p in zip(truth, predicted)) / 10)


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: "y_pred contains classes not in y_true"
def test_classes_the_split_does_not_show_are_treated_as_sklearn_and_imblearn_do():
    # Of 5 classes, 3 is predicted but never true and 4 appears nowhere.
    truth = [0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 3, 1, 1, 2, 2, 3]
    scores = _scores(truth, predicted, 5)
    recall = scores["recall_per_class"]
    assert recall[:3].tolist() == pytest.approx([0.5, 1.0, 2 / 3]) and recall[3:].isnan().all()
    # balanced accuracy: the mean over the true classes only, not torchmetrics' macro recall (which counts class 3).
    assert scores["balanced_acc"].item() == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert scores["balanced_acc"].item() == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    # G-mean: class 3 (predicted, never recognised) has recall 0, so the G-mean is 0; class 4 does not count.
    assert geometric_mean_score(truth, predicted) == scores["gmean"].item() == 0.0
    assert _scores(truth, [0, 0, 1, 1, 2, 2, 2], 5)["gmean"].item() == pytest.approx(
        geometric_mean_score(truth, [0, 0, 1, 1, 2, 2, 2]))  # class 4 never shown: (1 · 1 · 1)^(1/3)


def test_scores_over_random_batches_equal_sklearn_and_imblearn():
    generator = torch.Generator().manual_seed(0)
    metric, truths, predictions = ClassRecalls(6), [], []
    for size in (13, 7, 20):
        truth = torch.randint(0, 6, (size,), generator=generator)
        logits = torch.randn(size, 6, generator=generator)
        logits[torch.arange(size), truth] += 3 * torch.rand(size, generator=generator)  # better than chance
        metric.update(logits, truth)
        truths.append(truth)
        predictions.append(logits.argmax(1))
    truth, predicted = torch.cat(truths).numpy(), torch.cat(predictions).numpy()
    scores = metric.compute()
    assert scores["recall_per_class"].numpy() == pytest.approx(recall_score(truth, predicted, average=None))
    assert scores["balanced_acc"].item() == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert scores["gmean"].item() == pytest.approx(geometric_mean_score(truth, predicted))
    assert scores["gmean"].item() > 0


def test_frequency_groups_are_thirds_of_the_log_count_range():
    assert frequency_groups(DIGITS_LT_COUNTS) == DIGITS_LT_GROUPS  # thresholds 122 · 61^(-1/3) = 31, ... = 7.9
    # The step profile: heads are many, tails few, nothing in between; equal counts share a group.
    assert frequency_groups([100] * 5 + [10] * 5) == {"many": [0, 1, 2, 3, 4], "few": [5, 6, 7, 8, 9]}
    # ImageNet-LT's range (1280 to 5 images): many above 201.6, few below 31.7.
    assert frequency_groups([1280, 202, 201, 32, 31, 5]) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    # Not long-tailed (ρ < 10: a balanced source's random split, a mild imbalance) or unknown counts: no groups.
    assert frequency_groups([125, 118, 130]) == {} and frequency_groups([100, 11]) == {} and frequency_groups([]) == {}
    assert frequency_groups([100, 10]) == {"many": [0], "few": [1]}
    assert frequency_groups([100, 50, 0]) == {"many": [0, 1], "few": [2]}  # no training image: few


def test_group_recalls_average_the_groups_classes_that_the_split_shows():
    groups = {"many": [0, 1], "medium": [2], "few": [3, 4]}
    truth = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # class 4 never shown
    predicted = [0, 0, 1, 0, 2, 0, 3, 0, 0, 4]
    scores = _scores(truth, predicted, 5, groups)
    assert scores["recall_many"].item() == pytest.approx((1 + 0.5) / 2)
    assert scores["recall_medium"].item() == pytest.approx(0.5)
    assert scores["recall_few"].item() == pytest.approx(0.25)  # class 3 alone
    assert "recall_few" not in _scores([0, 1, 2], [0, 1, 2], 5, groups)  # no class of it shown
    assert not any(key.startswith("recall_") and key != "recall_per_class" for key in _scores(truth, predicted, 5))


def _confusion_scores(confusion: np.ndarray, groups: dict[str, list[int]]) -> dict[str, float]:
    """The reference: every figure read off a confusion matrix (rows true classes) in numpy."""
    truth, predicted, correct = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    recall = np.where(truth > 0, correct / np.maximum(truth, 1), np.nan)
    counted = (truth > 0) | (predicted > 0)
    scores = {"balanced_acc": np.nanmean(recall), "acc": correct.sum() / confusion.sum(),
              "gmean": float(np.prod(np.nan_to_num(recall[counted])) ** (1 / counted.sum()))}
    scores.update({f"recall_{name}": np.nanmean(recall[classes]) for name, classes in groups.items()})
    return {**scores, "recall": recall}


def test_long_tailed_run_writes_the_metrics_of_its_confusion_matrix(train_cfg, tmp_path, capsys):
    from cvlab.engine import run_train
    from cvlab.engine.study import StudyPlan, report_metrics

    out = tmp_path / "run"
    # The whole (balanced) val and test splits, so every class is scored; two training batches of the long tail.
    cfg = train_cfg("data=digits_lt", "data.batch_size=64", "trainer.limit_val_batches=null",
                    "trainer.limit_test_batches=null", out=out)
    _, objects = run_train(cfg)
    task = objects["task"]
    assert list(task.data_info.class_counts) == DIGITS_LT_COUNTS
    assert task.frequency_groups == DIGITS_LT_GROUPS
    metrics = json.loads((out / "metrics.json").read_text())
    names = task.class_names
    assert metrics["frequency_groups"] == {group: [names[i] for i in classes]
                                           for group, classes in DIGITS_LT_GROUPS.items()}
    # The task's confusion matrix is the test pass's, the last evaluation.
    confusion = task.confusion.compute().numpy().astype(np.float64)
    assert confusion.sum() == len(objects["datamodule"].test_set)
    expected = _confusion_scores(confusion, DIGITS_LT_GROUPS)
    for key in ("acc", "balanced_acc", "gmean", "recall_many", "recall_medium", "recall_few"):
        assert metrics[f"test/{key}"] == pytest.approx(expected[key], abs=1e-6), key
        assert math.isfinite(metrics[f"val/{key}"]), key
    assert metrics["recall_per_class"] == pytest.approx(dict(zip(names, expected["recall"].tolist())), abs=1e-6)
    # The group means differ, so a swapped or ignored grouping would show.
    assert len({round(metrics[f"test/recall_{group}"], 6) for group in DIGITS_LT_GROUPS}) == 3
    table = capsys.readouterr().out
    table = table[table.index("recall per class (test)"):]
    row = next(line for line in table.splitlines() if line.strip("│ ").startswith("9 "))
    assert "few" in row and f"{metrics['recall_per_class']['9']:.4f}" in row and " 2 " in row  # train images
    # A study of such runs reports the new test metrics as columns.
    plan = StudyPlan(command="train", base=(), axes=(), seeds=(42,), split_seed=42, baseline=0, monitor="val/acc",
                     mode="max")
    assert {"test/balanced_acc", "test/gmean", "test/recall_many", "test/recall_medium",
            "test/recall_few"} <= set(report_metrics(plan, [metrics]))
