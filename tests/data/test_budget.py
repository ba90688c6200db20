"""LabelBudgetDataModule: fewer training labels, counted in DataInfo; a label-drawing sampler is refused when the
labels are hidden."""
import numpy as np
import pytest

from cvlab.data.base import UNLABELED
from cvlab.data.budget import LabelBudgetDataModule
from cvlab.utils.errors import UserError

BALANCED = {"_target_": "cvlab.data.samplers.ClassBalancedSampler", "name": "class_balanced"}


def _budget(**kwargs) -> LabelBudgetDataModule:
    dm = LabelBudgetDataModule(source="digits", image_size=8, in_chans=1, train_fraction=0.5, labeled_fraction=0.2,
                               **kwargs)
    dm.setup()
    return dm


def test_hidden_labels_are_kept_as_unlabeled_and_not_counted():
    from cvlab.losses.distillation import UNLABELED as LOSS_UNLABELED

    assert UNLABELED == LOSS_UNLABELED  # the data's withheld label is the one the distillation loss skips
    hidden = _budget(unlabeled="hide")
    labels = np.asarray(hidden.train_labels)
    assert len(labels) == len(hidden.train_set) == 628 and (labels == UNLABELED).sum() == 628 - 125
    assert sum(hidden.info.class_counts) == 125 and min(hidden.info.class_counts) == 12
    assert [hidden.train_set[i][1] for i in range(5)] == labels[:5].tolist()


def test_dropped_labels_leave_a_smaller_training_set_for_any_sampler():
    dropped = _budget(unlabeled="drop", sampler=BALANCED)
    assert len(dropped.train_set) == 125 and UNLABELED not in dropped.train_labels
    assert dropped.info.class_counts == tuple(np.bincount(dropped.train_labels).tolist())
    assert len(dropped.train_dataloader().sampler) == 125


def test_a_sampler_that_draws_by_label_is_refused_when_labels_are_hidden():
    with pytest.raises(UserError, match="sampler=class_balanced draws by class label, which semi-supervised"):
        LabelBudgetDataModule(source="digits", unlabeled="hide", sampler=BALANCED)
    with pytest.raises(UserError, match="unlabeled is drop or hide"):
        LabelBudgetDataModule(source="digits", unlabeled="keep")
