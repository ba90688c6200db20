"""Anomaly detection's measures over a split: the anomalies are the positive class, ranked by the anomaly score
(higher: more anomalous).

- **AUROC**: the area under the ROC curve (``sklearn.metrics.roc_auc_score``);
- **AUPRC**: the average precision ``Σ (R_n − R_{n−1}) P_n`` (``average_precision_score``), beside the anomaly rate
  of the split, the AUPRC of a score that knows nothing;
- **F1 at the best threshold**: the highest F1 over the thresholds of the precision-recall curve
  (``precision_recall_curve``; an image is flagged when its score is at least the threshold), and that threshold.
  It is chosen on the split it is measured on, so it is the most any threshold reaches there, an upper bound of one
  set beforehand;
- the ROC curve (``roc_curve``), and per class of the data its images, mean score, the share flagged at that
  threshold and, for an anomaly class, the AUROC of the normal images against that class alone.

:class:`AnomalyScores` keeps one score and one label per image (bounded: 12 bytes an image) as torchmetrics states,
gathered across processes; the figures come from scikit-learn in float64 rather than torchmetrics' binary measures,
which read scores outside [0, 1] as logits and squash them with a sigmoid: in float32 every score above ~17 becomes
1.0, and a one-class SVM's scores reach hundreds.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# The scalar figures of a split, in the order they are logged and tabled.
MEASURES = ("auroc", "auprc", "f1", "threshold", "anomaly_rate")


def best_f1(anomalous: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(the highest F1 over the thresholds, the threshold that gives it) for boolean ``anomalous`` and ``scores``."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(anomalous, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def anomaly_measures(scores: np.ndarray, labels: np.ndarray, normal_labels: Sequence[int], num_classes: int) -> dict:
    """The figures of the module docstring for ``scores`` and class ``labels`` (both ``[N]``): the scalars of
    :data:`MEASURES`, ``roc`` (``fpr``, ``tpr`` arrays) and ``per_class`` (lists of ``num_classes``, None where a
    figure is undefined). The scalars are NaN when the split lacks normal images or anomalies."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    anomalous = ~np.isin(labels, list(normal_labels))
    figures: dict = dict.fromkeys(MEASURES, float("nan"))
    figures["anomaly_rate"] = float(anomalous.mean()) if len(labels) else float("nan")
    figures["roc"] = {"fpr": np.zeros(0), "tpr": np.zeros(0)}
    both = 0 < anomalous.sum() < len(anomalous)
    if both:
        figures["auroc"] = float(roc_auc_score(anomalous, scores))
        figures["auprc"] = float(average_precision_score(anomalous, scores))
        figures["f1"], figures["threshold"] = best_f1(anomalous, scores)
        fpr, tpr, _ = roc_curve(anomalous, scores)
        figures["roc"] = {"fpr": fpr, "tpr": tpr}
    normal_scores = scores[~anomalous]
    per_class: dict[str, list] = {"images": [], "mean_score": [], "flagged": [], "auroc": []}
    for label in range(num_classes):
        mine = scores[labels == label]
        per_class["images"].append(int(len(mine)))
        per_class["mean_score"].append(float(mine.mean()) if len(mine) else None)
        per_class["flagged"].append(float((mine >= figures["threshold"]).mean()) if len(mine) and both else None)
        separable = label not in normal_labels and len(mine) and len(normal_scores)
        per_class["auroc"].append(float(roc_auc_score(np.r_[np.zeros(len(normal_scores)), np.ones(len(mine))],
                                                      np.r_[normal_scores, mine])) if separable else None)
    figures["per_class"] = per_class
    return figures


class AnomalyScores(Metric):
    """Collects ``update(scores: Tensor[N], labels: Tensor[N])`` over a split (class labels; the classes not in
    ``normal_labels`` are the anomalies); ``compute()`` gives :func:`anomaly_measures`."""

    full_state_update = False

    def __init__(self, normal_labels: Sequence[int], num_classes: int):
        super().__init__()
        self.normal_labels, self.num_classes = tuple(int(label) for label in normal_labels), int(num_classes)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        self.scores.append(scores.detach().float().flatten())
        self.labels.append(labels.detach().long().flatten())

    def compute(self) -> dict:
        if isinstance(self.scores, list) and not self.scores:  # nothing seen (synchronised states are tensors)
            return anomaly_measures(np.zeros(0), np.zeros(0), self.normal_labels, self.num_classes)
        scores, labels = (dim_zero_cat(state).cpu().numpy() for state in (self.scores, self.labels))
        return anomaly_measures(scores, labels, self.normal_labels, self.num_classes)


__all__ = ["MEASURES", "AnomalyScores", "anomaly_measures", "best_f1"]
