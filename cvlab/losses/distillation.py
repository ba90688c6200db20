"""Knowledge-distillation losses.

- Soft targets (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"): the student matches
  the teacher's softmax at temperature T; the KL term is scaled by T^2 so that its gradients keep their size as T
  changes.
- Hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): a 1x1 regressor maps a middle ("guided") layer
  of the student onto the teacher's ("hint") layer, trained with a squared error.

Written by hand: torch provides the KL divergence and the squared error, not their combination into these
objectives.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch.nn.functional as F
from torch import Tensor

from cvlab.data.base import UNLABELED  # the label of a training image whose label is withheld (semi-supervised)


class DistillationTerms(NamedTuple):
    total: Tensor
    soft: Tensor  # T^2 * KL(teacher || student) at temperature T
    hard: Tensor | None  # the hard-label loss on the labeled images; None when no labels were given


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes and averaged over the batch.

    Args:
        student_logits: Tensor[N, C].
        teacher_logits: Tensor[N, C] (no gradient flows into it).
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    hard_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> DistillationTerms:
    """alpha * soft_target_loss + (1 - alpha) * hard_loss(student_logits, labels).

    Args:
        student_logits, teacher_logits: Tensor[N, C].
        labels: Tensor[N] class indices; entries equal to ``UNLABELED`` take no part in the hard-label loss (they
            learn from the soft targets alone). ``None``: no labels at all, the loss is the soft term alone.
        hard_loss: the hard-label loss (the run's ``loss`` group; cross-entropy by default), applied to the
            labeled rows only. A batch without labeled rows contributes a hard loss of 0.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    if labels is None:
        return DistillationTerms(soft, soft, None)
    labeled = labels != UNLABELED
    if labeled.any():
        hard = hard_loss(student_logits[labeled], labels[labeled])
    else:
        hard = student_logits.sum() * 0.0  # keeps the graph (and the device) of a normal loss
    return DistillationTerms(alpha * soft + (1 - alpha) * hard, soft, hard)


def hint_loss(guided: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error between the regressed student features and the teacher's hint features.

    Args:
        guided: Tensor[N, C, h, w], the student's middle layer after the 1x1 regressor (C = the teacher's channels).
        hint: Tensor[N, C, H, W], the teacher's middle layer. When the two maps differ in size, the larger one is
            average-pooled to the smaller one (FitNets chose layers of equal size; this lets any pair be used).
    """
    size = min(guided.shape[-2], hint.shape[-2]), min(guided.shape[-1], hint.shape[-1])
    if guided.shape[-2:] != size:
        guided = F.adaptive_avg_pool2d(guided, size)
    if hint.shape[-2:] != size:
        hint = F.adaptive_avg_pool2d(hint, size)
    return F.mse_loss(guided, hint.detach())

