"""The class-imbalance losses of classification against hand computations on small tensors: weighted CE
(balanced = n / (k · count)), softmax focal, OHEM, class-balanced (effective number) and logit adjustment; soft
labels; the configs as plug-ins that receive the data's class counts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cvlab.losses.classification import (
    ClassBalancedLoss,
    FocalLoss,
    LogitAdjustedLoss,
    OHEMCrossEntropy,
    WeightedCrossEntropy,
    balanced_weights,
    effective_number_weights,
)
from cvlab.utils.errors import UserError
from cvlab.utils.plugins import instantiate_plugin

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
LABELS = torch.tensor([0, 2, 1, 0])
COUNTS = [6, 3, 1]


def _probabilities_of_truth() -> torch.Tensor:
    return LOGITS.softmax(-1)[torch.arange(4), LABELS]


def _loss_option(name: str, **available):
    from cvlab.utils.config import compose

    return instantiate_plugin(OmegaConf.to_container(compose("train", [f"loss={name}"]).loss), **available)


# ----------------------------------------------------------------------------------------------- weights
def test_balanced_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat([0, 1, 2], COUNTS)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert torch.allclose(balanced_weights(COUNTS, 3), torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert np.allclose(balanced_weights(COUNTS, 3).numpy(), expected)


def test_weighted_ce_balanced_and_listed():
    balanced = WeightedCrossEntropy(3, COUNTS)
    weights = torch.tensor([10 / 18, 10 / 9, 10 / 3])
    per_sample = -torch.log(_probabilities_of_truth())
    by_hand = (weights[LABELS] * per_sample).sum() / weights[LABELS].sum()  # torch's weighted mean
    assert torch.allclose(balanced(LOGITS, LABELS), by_hand)
    listed = WeightedCrossEntropy(3, weights=[1.0, 0.0, 0.0])
    assert torch.allclose(listed(LOGITS, LABELS), per_sample[LABELS == 0].mean())
    assert not torch.allclose(balanced(LOGITS, LABELS), F.cross_entropy(LOGITS, LABELS))


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": [1.0, 2.0]}, r"loss.weights has 2 weights but the data has 3 classes"),
    ({"weights": [1.0, -2.0, 1.0]}, r"loss.weights must be a number >= 0, got -2.0"),
    ({"weights": [0, 0, 0]}, r"loss.weights are all 0"),
    ({"weights": "inverse"}, r"loss.weights is 'balanced' .* or a list of 3 numbers, got 'inverse'"),
    ({"weights": "balanced", "class_counts": [5, 0, 5]}, r"class 1 has no training image"),
    ({"weights": "balanced", "class_counts": []}, r"needs the training images per class"),
])
def test_bad_weights_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        WeightedCrossEntropy(3, **{"class_counts": COUNTS, **kwargs})


# ----------------------------------------------------------------------------------------------- focal
def test_focal_with_gamma_zero_is_cross_entropy():
    assert torch.allclose(FocalLoss(3, gamma=0.0)(LOGITS, LABELS), F.cross_entropy(LOGITS, LABELS))


def test_focal_by_hand():
    p = _probabilities_of_truth()
    by_hand = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(FocalLoss(3, gamma=2.0)(LOGITS, LABELS), by_hand)
    alpha = torch.tensor([0.5, 1.0, 2.0])
    weighted = (-alpha[LABELS] * (1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(FocalLoss(3, gamma=2.0, alpha=[0.5, 1.0, 2.0])(LOGITS, LABELS), weighted)
    balanced = FocalLoss(3, gamma=2.0, alpha="balanced", class_counts=COUNTS)
    assert torch.allclose(balanced.alpha, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    # Well-classified images weigh less: the focal loss of the easiest sample is far below its cross-entropy.
    easy = torch.tensor([[6.0, 0.0, 0.0]])
    assert FocalLoss(3)(easy, torch.tensor([0])) < 1e-3 * F.cross_entropy(easy, torch.tensor([0]))


def test_soft_labels_weigh_each_class():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    one_hot = F.one_hot(LABELS, 3).float()
    for loss in (FocalLoss(3, gamma=0.0), OHEMCrossEntropy(keep=1.0), LogitAdjustedLoss(3, [1, 1, 1])):
        assert torch.allclose(loss(LOGITS, soft), F.cross_entropy(LOGITS, soft))
        assert torch.allclose(loss(LOGITS, one_hot), loss(LOGITS, LABELS))
    log_p, p = LOGITS.log_softmax(-1), LOGITS.softmax(-1)
    by_hand = (-(soft * (1 - p) ** 2 * log_p).sum(-1)).mean()
    assert torch.allclose(FocalLoss(3)(LOGITS, soft), by_hand)


# ----------------------------------------------------------------------------------------------- OHEM
def test_ohem_keeps_the_hardest_share():
    per_sample = -torch.log(_probabilities_of_truth())
    hardest = per_sample.topk(2).indices
    logits = LOGITS.clone().requires_grad_(True)
    loss = OHEMCrossEntropy(keep=0.5)(logits, LABELS)
    assert torch.allclose(loss, per_sample[hardest].mean())
    loss.backward()
    easy = [i for i in range(4) if i not in hardest.tolist()]
    assert logits.grad[easy].abs().sum() == 0 and logits.grad[hardest].abs().sum() > 0
    assert torch.allclose(OHEMCrossEntropy(keep=1.0)(LOGITS, LABELS), F.cross_entropy(LOGITS, LABELS))
    assert torch.allclose(OHEMCrossEntropy(keep=0.01)(LOGITS, LABELS), per_sample.max())  # at least one
    with pytest.raises(UserError, match=r"loss.keep must be a number in \(0, 1\]"):
        OHEMCrossEntropy(keep=0)


# ----------------------------------------------------------------------------------------------- class-balanced
def test_effective_number_weights_by_hand():
    beta, counts = 0.99, [100, 10, 1]
    effective = [(1 - beta ** n) / (1 - beta) for n in counts]  # 63.40, 9.56, 1
    raw = [1 / e for e in effective]
    expected = torch.tensor([w / sum(raw) * 3 for w in raw])
    assert torch.allclose(effective_number_weights(counts, 3, beta), expected)
    assert abs(effective[0] - 63.397) < 1e-3 and abs(effective[2] - 1) < 1e-12
    assert torch.allclose(effective_number_weights(counts, 3, 0.0), torch.ones(3))  # β = 0: no weighting
    # β -> 1: inverse class frequency.
    inverse = torch.tensor([1 / 100, 1 / 10, 1.0])
    assert torch.allclose(effective_number_weights(counts, 3, 1 - 1e-9), inverse / inverse.sum() * 3, rtol=1e-4)


def test_class_balanced_loss_by_hand():
    weights = effective_number_weights(COUNTS, 3, 0.9999)
    p = _probabilities_of_truth()
    ce = ClassBalancedLoss(3, COUNTS, beta=0.9999)
    assert torch.allclose(ce(LOGITS, LABELS), (-weights[LABELS] * torch.log(p)).mean())  # averaged over the batch
    focal = ClassBalancedLoss(3, COUNTS, beta=0.9999, gamma=2.0)
    assert torch.allclose(focal(LOGITS, LABELS), (-weights[LABELS] * (1 - p) ** 2 * torch.log(p)).mean())
    with pytest.raises(UserError, match=r"loss.beta must be a number in \[0, 1\)"):
        ClassBalancedLoss(3, COUNTS, beta=1.0)


# ----------------------------------------------------------------------------------------------- logit adjustment
def test_logit_adjustment_shifts_logits_by_tau_log_prior():
    prior = torch.tensor(COUNTS, dtype=torch.float32) / 10
    for tau in (1.0, 2.0):
        loss = LogitAdjustedLoss(3, COUNTS, tau=tau)
        assert torch.allclose(loss.adjustment, tau * torch.log(prior))
        assert torch.allclose(loss(LOGITS, LABELS), F.cross_entropy(LOGITS + tau * torch.log(prior), LABELS))
    assert torch.allclose(LogitAdjustedLoss(3, COUNTS, tau=0.0)(LOGITS, LABELS), F.cross_entropy(LOGITS, LABELS))
    # The rare class's logit is pushed down in the loss: a tie costs the rare class more than the common one.
    tie = torch.zeros(1, 3)
    loss = LogitAdjustedLoss(3, COUNTS)
    assert loss(tie, torch.tensor([2])) - loss(tie, torch.tensor([0])) == pytest.approx(math.log(6), rel=1e-5)


# ----------------------------------------------------------------------------------------------- plug-ins
@pytest.mark.parametrize("name, cls, settings", [
    ("weighted_ce", WeightedCrossEntropy, {}),
    ("focal", FocalLoss, {"gamma": 2.0}),
    ("ohem", OHEMCrossEntropy, {"keep": 0.7}),
    ("class_balanced", ClassBalancedLoss, {"beta": 0.9999, "gamma": 0.0}),
    ("logit_adjusted", LogitAdjustedLoss, {"tau": 1.0}),
])
def test_loss_options_are_plugins_fed_by_the_data(name, cls, settings):
    loss = _loss_option(name, num_classes=3, class_counts=COUNTS)
    assert type(loss) is cls and all(getattr(loss, key) == value for key, value in settings.items())
    value = loss(LOGITS, LABELS)
    assert torch.isfinite(value) and value > 0
    if name == "weighted_ce":
        assert torch.allclose(loss.weight, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    if name in ("class_balanced", "logit_adjusted"):  # the counts reached the loss
        other = _loss_option(name, num_classes=3, class_counts=[1, 3, 6])
        assert not torch.allclose(other(LOGITS, LABELS), value)


def test_the_task_gives_the_loss_the_long_tail_counts(train_cfg):
    from cvlab.engine.builders import build_datamodule, build_task

    cfg = train_cfg("data=digits_lt", "loss=logit_adjusted")
    task = build_task(cfg, build_datamodule(cfg))
    counts = torch.tensor([122, 78, 51, 33, 21, 13, 8, 5, 3, 2], dtype=torch.float32)
    assert torch.allclose(task.criterion.adjustment, torch.log(counts / counts.sum()))
