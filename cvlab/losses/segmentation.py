"""Losses of per-pixel class logits ``Tensor[N, C, H, W]`` against class-index masks ``Tensor[N, H, W]`` whose
``ignore_index`` pixels (255) take no part: the ``loss=dice`` and ``loss=ce_dice`` options of the segmentation task
(its default, ``loss=default``, is ``torch.nn.CrossEntropyLoss(ignore_index=...)``: the mean over the counted
pixels).

Written here because neither torch, torchvision nor torchmetrics has a dice loss (torchmetrics' DiceScore is a
metric of hard masks, with no gradient). The form is V-Net's (Milletari et al. 2016), as MMSegmentation's
``DiceLoss`` computes it: softmax probabilities ``p`` and one-hot truth ``t`` per image and class,
``dice = (2 Σ p t + smooth) / (Σ p^e + Σ t^e + smooth)`` with ``e = exponent`` (2, V-Net's squares), and the loss is
``1 - dice`` averaged over the images and the classes. Ignored pixels are zeroed in both ``p`` and ``t``, so they add
nothing to either sum. ``smooth`` keeps a class absent from an image and not predicted there at dice 1 (no loss),
not 0/0.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.data.base import IGNORE_INDEX


class DiceLoss(nn.Module):
    """``1 - dice`` of softmax probabilities against one-hot masks, per image and class, averaged (module
    docstring); pixels whose target is ``ignore_index`` are left out."""

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, smooth: float = 1.0, exponent: float = 2.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.exponent = float(exponent)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        probabilities = logits.float().softmax(1)
        counted = target != (-1 if self.ignore_index is None else self.ignore_index)
        one_hot = F.one_hot(target.where(counted, 0), num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
        weight = counted[:, None].to(probabilities.dtype)
        probabilities, one_hot = probabilities * weight, one_hot * weight
        overlap = (probabilities * one_hot).sum((2, 3))
        sizes = probabilities.pow(self.exponent).sum((2, 3)) + one_hot.pow(self.exponent).sum((2, 3))
        dice = (2 * overlap + self.smooth) / (sizes + self.smooth)  # [N, C]
        return 1 - dice.mean()


class CrossEntropyDiceLoss(nn.Module):
    """``ce_weight * cross-entropy + dice_weight * dice loss``, both without the ``ignore_index`` pixels; the
    cross-entropy learns every pixel's class, the dice term weighs each class's overlap alike, whatever its area."""

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0, exponent: float = 2.0):
        super().__init__()
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)
        self.dice = DiceLoss(ignore_index, smooth, exponent)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.ce_weight * self.cross_entropy(logits, target) + self.dice_weight * self.dice(logits, target)
