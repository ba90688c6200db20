"""Classification metrics for imbalanced data: per-class recall, balanced accuracy, G-mean, and the mean recall of
the long-tail literature's many / medium / few frequency groups.

:class:`ClassRecalls` is torchmetrics' ``MulticlassRecall(average=None)``: its states count each class's true and
false positives and false negatives over the whole split (summed over processes under DDP), and the per-class recall
is torchmetrics' own. The other figures are read off the same counts here: torchmetrics has no G-mean, and its macro
recall also averages classes that are predicted but never true, which sklearn's balanced accuracy leaves out.

- ``balanced_acc``: the mean recall over the classes the evaluated split shows (sklearn's
  ``balanced_accuracy_score``);
- ``gmean``: the geometric mean of the recalls of the classes that are true or predicted somewhere
  (imbalanced-learn's ``geometric_mean_score``, multiclass, at its default ``correction=0``): 0 as soon as one such
  class is never recognised, whatever the others score;
- ``recall_many`` / ``recall_medium`` / ``recall_few``: the mean recall over each group's classes that the split
  shows (:func:`frequency_groups`), only for long-tailed training counts and groups the split shows.

A class the split never shows has an undefined recall, NaN in ``recall_per_class``.

:func:`evaluation_metrics` is the set every classification evaluation reports (the task's val and test passes), and
:func:`score_probabilities` scores predictions made outside a task with it (an ensemble's averaged probabilities).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

GROUPS = ("many", "medium", "few")
# The training counts are long-tailed when the largest class has at least this many times the images of the
# smallest: the mildest imbalance ratio of the CIFAR-LT benchmarks (10, 50, 100). A random split of a balanced source
# (ρ about 1.1 on digits) has no tail whose classes could be grouped.
LONG_TAIL_RATIO = 10


def frequency_groups(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """The classes (indices) of each frequency group, many / medium / few, by their training images ``class_counts``;
    ``{}`` when the counts are not long-tailed (ρ = n_max / n_min below :data:`LONG_TAIL_RATIO`) or unknown. A group
    without classes is left out.

    The literature's thresholds (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World", on
    ImageNet-LT: many > 100, medium 20-100, few < 20 training images) are absolute, set for ImageNet-LT's 1280 to 5
    images per class; on digits_lt (122 to 2) they would leave one class in many. Here the thresholds are relative to
    the data: the thirds of the log-count range between the largest and the smallest class, many above
    n_max · ρ^(-1/3), few below n_max · ρ^(-2/3), medium between (ImageNet-LT: 201.6 and 31.7). On the exponential
    profile, whose log-counts fall linearly with the class rank, that is about a third of the classes each
    (digits_lt: thresholds 31 and 7.9, so 4 / 3 / 3 classes: 122, 78, 51, 33 / 21, 13, 8 / 5, 3, 2); on the step
    profile the head classes are many and the tail classes few, with none medium, where thirds by rank would mix
    them; and classes of one count always share a group. A class without training images counts as one image (few).
    """
    counts = [max(int(n), 1) for n in class_counts]
    if not counts:
        return {}
    n_max, n_min = max(counts), min(counts)
    if n_max < LONG_TAIL_RATIO * n_min:
        return {}
    # n > n_max · (n_min / n_max)^(1/3) and n < n_max · (n_min / n_max)^(2/3), cubed: exact in integers.
    groups = {"many": [i for i, n in enumerate(counts) if n ** 3 > n_max ** 2 * n_min],
              "few": [i for i, n in enumerate(counts) if n ** 3 < n_max * n_min ** 2]}
    grouped = set(groups["many"]) | set(groups["few"])
    groups["medium"] = [i for i in range(len(counts)) if i not in grouped]
    return {name: groups[name] for name in GROUPS if groups[name]}


class ClassRecalls(MulticlassRecall):
    """``update(preds, target)`` as torchmetrics' MulticlassRecall (logits ``Tensor[N, C]`` or class indices
    ``Tensor[N]``, target class indices ``Tensor[N]``).

    ``compute()`` returns ``{"balanced_acc", "gmean"}`` and ``"recall_<group>"`` for each of ``frequency_groups``
    (:func:`frequency_groups`) that the split shows (scalar tensors), and ``"recall_per_class"`` (``Tensor[C]``, NaN
    for a class the split never shows): see the module docstring.
    """

    def __init__(self, num_classes: int, frequency_groups: Mapping[str, Sequence[int]] | None = None, **kwargs):
        super().__init__(num_classes, average=None, **kwargs)
        self.frequency_groups = {name: list(classes) for name, classes in (frequency_groups or {}).items()}

    def compute(self) -> dict[str, Tensor]:
        recall = super().compute().double()  # 0 for a class that is never true (torchmetrics' zero_division)
        tp, fp, _, fn = self._final_state()
        shown = tp + fn > 0
        per_class = torch.where(shown, recall, torch.full_like(recall, float("nan")))
        # exp(mean(log r)): a product of many recalls would underflow; a recall of 0 gives log 0 = -inf and G-mean 0.
        scores = {"balanced_acc": per_class.nanmean(), "gmean": recall[shown | (fp > 0)].log().mean().exp()}
        for name, classes in self.frequency_groups.items():
            if shown[classes].any():
                scores[f"recall_{name}"] = per_class[classes].nanmean()
        return {**{key: value.float() for key, value in scores.items()}, "recall_per_class": per_class.float()}


def evaluation_metrics(num_classes: int, frequency_groups: Mapping[str, Sequence[int]] | None = None
                       ) -> MetricCollection:
    """What a classification evaluation reports: ``acc`` (micro accuracy), ``f1`` (macro-F1) and the
    :class:`ClassRecalls` figures (``balanced_acc``, ``gmean``, ``recall_<group>``, ``recall_per_class``);
    ``update(preds, target)`` with logits or probabilities ``Tensor[N, C]`` and class indices ``Tensor[N]``."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "recalls": ClassRecalls(num_classes, frequency_groups),
    })


def score_probabilities(probabilities: Tensor, labels: Tensor, num_classes: int,
                        frequency_groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, float | list]:
    """:func:`evaluation_metrics` of class probabilities ``Tensor[N, C]`` against ``labels`` ``Tensor[N]``, as
    plain numbers (``recall_per_class`` a list, None for a class the labels never show)."""
    metrics = evaluation_metrics(num_classes, frequency_groups)
    metrics.update(torch.as_tensor(probabilities, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
    scores = metrics.compute()
    per_class = [None if value != value else value for value in scores.pop("recall_per_class").tolist()]
    return {**{key: float(value) for key, value in scores.items()}, "recall_per_class": per_class}
