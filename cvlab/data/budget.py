"""Classification data with fewer training labels: the data view of distillation's label-budget stages.

``train_fraction`` of the training split is kept (stratified by class, drawn with the data seed), and of those
``labeled_fraction`` keep their labels. ``unlabeled="drop"`` leaves the other images out; ``"hide"`` keeps them with
the label :data:`~cvlab.data.base.UNLABELED` (semi-supervised distillation). The validation and test
splits are untouched.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from cvlab.data.base import UNLABELED
from cvlab.data.classification import ClassificationDataModule
from cvlab.utils.errors import UserError
from cvlab.utils.plugins import missing_arguments


class HiddenLabels(Dataset):
    """(image, label) pairs of ``base`` with the label replaced by ``UNLABELED`` where ``hidden[i]``."""

    def __init__(self, base: Dataset, hidden: np.ndarray):
        self.base, self.hidden = base, hidden

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, UNLABELED if self.hidden[index] else label


def _stratified_subset(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if fraction >= 1:
        return indices
    if not 0 < fraction < 1:
        raise UserError(f"{what} is a share of the training images in (0, 1], got {fraction}.")
    try:
        kept, _ = train_test_split(indices, train_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        classes = len(np.unique(labels))
        raise UserError(f"{what}={fraction} keeps {int(fraction * len(indices))} of {len(indices)} training images, "
                        f"fewer than the {classes} classes; raise it.") from None
    return np.sort(kept)


class LabelBudgetDataModule(ClassificationDataModule):
    """The classification data with fewer training labels (see the module docstring); ``train_labels`` holds
    ``UNLABELED`` for the hidden ones, and ``info.class_counts`` counts the labeled images only."""

    def __init__(self, *args, train_fraction: float = 1.0, labeled_fraction: float = 1.0, unlabeled: str = "drop",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if unlabeled not in ("drop", "hide"):
            raise UserError(f"unlabeled is drop or hide, got {unlabeled!r}.")
        if unlabeled == "hide" and "labels" in missing_arguments(self.sampler_config):
            raise UserError(f"sampler={self.sampler_config.get('name', self.sampler_config['_target_'])} draws by "
                            "class label, which semi-supervised distillation withholds; use sampler=none.")

    def read(self) -> None:
        super().read()
        hp = self.hparams
        labels = np.asarray(self.train_labels)
        kept = _stratified_subset(np.arange(len(labels)), labels, hp.train_fraction, hp.seed, "distill.train_fraction")
        labeled = _stratified_subset(kept, labels[kept], hp.labeled_fraction, hp.seed, "distill.labeled_fraction")
        if hp.unlabeled == "drop":
            self.train_set, train_labels = Subset(self.train_set, labeled.tolist()), labels[labeled]
        else:
            hidden = ~np.isin(kept, labeled)
            self.train_set = HiddenLabels(Subset(self.train_set, kept.tolist()), hidden)
            train_labels = np.where(hidden, UNLABELED, labels[kept])
        self.train_labels = train_labels.tolist()
