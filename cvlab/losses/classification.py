"""Classification losses for imbalanced data: the ``loss=`` options weighted_ce, focal, ohem, class_balanced and
logit_adjusted of the classification task.

Each takes logits ``Tensor[N, C]`` against integer labels ``Tensor[N]`` or soft labels ``Tensor[N, C]`` (mixup and
CutMix, :mod:`cvlab.data.mixing`), and receives what it needs of the data, ``num_classes`` and ``class_counts``
(training images per class), through its signature (:mod:`cvlab.utils.plugins`), never from the model.

- **weighted_ce**: torch's cross-entropy with class weights, ``balanced`` ``n / (k · n_c)`` (scikit-learn's
  ``compute_class_weight("balanced")``: n images, k classes) or a list; torch's weighted mean
  ``Σ w_y ℓ / Σ w_y``.
- **focal** (Lin et al. 2017, "Focal Loss for Dense Object Detection"), softmax form:
  ``−α_y (1 − p_y)^γ log p_y``, averaged over the batch; α per class (none, ``balanced`` or a list), γ = 2 as in
  the paper. γ = 0 without α is the cross-entropy.
- **ohem** (online hard example mining, Shrivastava et al. 2016, on whole images): the mean cross-entropy of the
  ``keep`` share of the batch with the highest loss; the others get no gradient.
- **class_balanced** (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples"): class weights
  ``(1 − β) / (1 − β^n_c)``, the inverse of the effective number ``(1 − β^n_c) / (1 − β)``, scaled to sum to C, on
  the softmax focal loss (γ = 0: the class-balanced cross-entropy), averaged over the batch as in the paper.
- **logit_adjusted** (Menon et al. 2021, "Long-tail learning via logit adjustment", the logit-adjusted loss):
  the cross-entropy of ``logits + τ log π``, π the training class priors ``n_c / n``; predictions keep the raw
  logits, which the adjusted loss has trained to be balanced.

Written here: torch has the (weighted) cross-entropy only, and torchvision's sigmoid_focal_loss is the binary,
one-vs-all form (detection's).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.utils.errors import UserError
from cvlab.utils.validate import check_number

BALANCED = "balanced"


def _counts(class_counts: Sequence[int] | None, num_classes: int, what: str) -> Tensor:
    """The training images per class as a float64 tensor; every class must have some."""
    counts = list(class_counts or ())
    if len(counts) != num_classes:
        raise UserError(f"{what} needs the training images per class, which this data does not give "
                        f"({len(counts)} counts for {num_classes} classes).")
    empty = [label for label, count in enumerate(counts) if count <= 0]
    if empty:
        raise UserError(f"{what}: class {empty[0]} has no training image, so its weight is undefined; "
                        "give the weights as a list instead, or data in which every class appears.")
    return torch.tensor(counts, dtype=torch.float64)


def balanced_weights(class_counts: Sequence[int], num_classes: int, what: str = "loss.weights=balanced") -> Tensor:
    """``n / (k · n_c)``: scikit-learn's ``balanced`` class weights (n images, k classes), float32."""
    counts = _counts(class_counts, num_classes, what)
    return (counts.sum() / (num_classes * counts)).float()


def class_weights(spec: str | Sequence[float] | None, num_classes: int, class_counts: Sequence[int] | None,
                  key: str) -> Tensor | None:
    """The class weights a loss option ``key`` spells: None, ``balanced`` or a list of ``num_classes``
    non-negative numbers (not all zero)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != BALANCED:
            raise UserError(f"{key} is 'balanced' (n / (k · count)) or a list of {num_classes} numbers, got {spec!r}.")
        return balanced_weights(class_counts, num_classes, f"{key}=balanced")
    weights = list(spec)
    if len(weights) != num_classes:
        raise UserError(f"{key} has {len(weights)} weights but the data has {num_classes} classes; give one per "
                        "class, or 'balanced'.")
    for weight in weights:
        check_number(key, weight, 0)
    if not any(weights):
        raise UserError(f"{key} are all 0: no class would count.")
    return torch.tensor(weights, dtype=torch.float32)


def _one_hot(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Integer labels as one-hot rows; soft labels as they are."""
    return target.to(dtype) if target.is_floating_point() else F.one_hot(target, num_classes).to(dtype)


def softmax_focal_loss(logits: Tensor, target: Tensor, gamma: float, alpha: Tensor | None = None) -> Tensor:
    """``−Σ_c t_c α_c (1 − p_c)^γ log p_c`` per sample, ``Tensor[N]``: with integer labels
    ``−α_y (1 − p_y)^γ log p_y``."""
    log_p = logits.float().log_softmax(-1)
    terms = -_one_hot(target, logits.shape[-1], log_p.dtype) * log_p
    if gamma:
        terms = terms * (1 - log_p.exp()).clamp(min=0).pow(gamma)
    if alpha is not None:
        terms = terms * alpha.to(terms)
    return terms.sum(-1)


class WeightedCrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy with class weights ``weights``: ``balanced`` (``n / (k · n_c)`` from the training
    counts) or a list of ``num_classes`` numbers."""

    def __init__(self, num_classes: int, class_counts: Sequence[int] | None = None,
                 weights: str | list[float] = BALANCED):
        super().__init__(weight=class_weights(weights, num_classes, class_counts, "loss.weights"))


class FocalLoss(nn.Module):
    """The softmax focal loss ``−α_y (1 − p_y)^γ log p_y`` averaged over the batch (module docstring); ``alpha``
    None (no class weights), ``balanced`` or a list of ``num_classes`` numbers."""

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: str | list[float] | None = None,
                 class_counts: Sequence[int] | None = None):
        super().__init__()
        check_number("loss.gamma", gamma, 0)
        self.gamma = float(gamma)
        self.register_buffer("alpha", class_weights(alpha, num_classes, class_counts, "loss.alpha"))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return softmax_focal_loss(logits, target, self.gamma, self.alpha).mean()


class ClassBalancedLoss(FocalLoss):
    """Cui et al.'s class-balanced loss: the softmax focal loss (``gamma`` 0: cross-entropy) with class weights
    ``(1 − β) / (1 − β^n_c)`` scaled to sum to ``num_classes`` (module docstring)."""

    def __init__(self, num_classes: int, class_counts: Sequence[int] | None = None, beta: float = 0.9999,
                 gamma: float = 0.0):
        check_number("loss.beta", beta, 0, 1, high_open=True, hint=" (0: no weighting; 0.9999 on CIFAR-LT)")
        super().__init__(num_classes, gamma, effective_number_weights(class_counts, num_classes, beta).tolist())
        self.beta = float(beta)


def effective_number_weights(class_counts: Sequence[int] | None, num_classes: int, beta: float) -> Tensor:
    """``(1 − β) / (1 − β^n_c)`` (one over the effective number of samples) scaled to sum to ``num_classes``."""
    counts = _counts(class_counts, num_classes, "loss=class_balanced")
    weights = (1 - beta) / (1 - torch.pow(beta, counts))
    return (weights / weights.sum() * num_classes).float()


class OHEMCrossEntropy(nn.Module):
    """The mean cross-entropy of the ``keep`` share (``⌈keep · N⌉``, at least one) of each batch's samples with the
    highest loss (module docstring)."""

    def __init__(self, keep: float = 0.7):
        super().__init__()
        check_number("loss.keep", keep, 0, 1, low_open=True, hint=" (the share of each batch kept, hardest first)")
        self.keep = float(keep)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = softmax_focal_loss(logits, target, gamma=0.0)
        kept = max(1, math.ceil(round(self.keep * len(losses), 6)))
        return losses.topk(kept, sorted=False).values.mean()


class LogitAdjustedLoss(nn.Module):
    """The cross-entropy of ``logits + tau · log π`` (π: the training class priors from ``class_counts``), Menon et
    al.'s logit-adjusted loss (module docstring)."""

    def __init__(self, num_classes: int, class_counts: Sequence[int] | None = None, tau: float = 1.0):
        super().__init__()
        check_number("loss.tau", tau, 0, hint=" (1 in the paper)")
        counts = _counts(class_counts, num_classes, "loss=logit_adjusted")
        self.tau = float(tau)
        self.register_buffer("adjustment", (self.tau * torch.log(counts / counts.sum())).float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, target)
