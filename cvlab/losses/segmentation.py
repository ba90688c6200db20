"""Losses of per-pixel class logits ``Tensor[N, C, H, W]`` against class-index masks ``Tensor[N, H, W]`` whose
``ignore_index`` pixels (255) take no part: the ``loss=dice``, ``loss=ce_dice``, ``loss=weighted_pixel_ce`` and
``loss=ohem_pixel`` options of the segmentation task (its default, ``loss=default``, is
``torch.nn.CrossEntropyLoss(ignore_index=...)``: the mean over the counted pixels).

**weighted_pixel_ce** is that cross-entropy with class weights (torch's weighted mean ``Σ w_y ℓ / Σ w_y``):
``balanced``, ``n / (k · n_c)`` from the training pixels per class (``DataInfo.class_counts``), or a list.

**ohem_pixel** is online hard example mining (Shrivastava et al. 2016) over pixels, by MMSegmentation's
``OHEMPixelSampler`` rule: of a batch's counted pixels, those whose predicted probability of their true class is
below ``max(thresh, p_(k))`` are kept, ``p_(k)`` the ``k``-th smallest of those probabilities with
``k = min_kept · N`` (the ``min(k, count − 1)``-th, 0-based; ``thresh`` 0.7, ``min_kept`` 100,000 per image), so
about ``k`` pixels at least are kept even when the network is confident; the rest are ignored. The loss is the
(weighted) cross-entropy's mean over the kept pixels. MMSegmentation's default reduction divides by every pixel
of the batch instead (``avg_non_ignore=False``), which scales the loss down with the share kept.

Written here because neither torch, torchvision nor torchmetrics has pixel OHEM or a dice loss (torchmetrics'
DiceScore is a metric of hard masks, with no gradient). The dice loss's form is V-Net's (Milletari et al. 2016), as
MMSegmentation's ``DiceLoss`` computes it: softmax probabilities ``p`` and one-hot truth ``t`` per image and class,
``dice = (2 Σ p t + smooth) / (Σ p^e + Σ t^e + smooth)`` with ``e = exponent`` (2, V-Net's squares), and the loss
is ``1 - dice`` averaged over the images and the classes. Ignored pixels are zeroed in both ``p`` and ``t``, so they add
nothing to either sum. ``smooth`` keeps a class absent from an image and not predicted there at dice 1 (no loss),
not 0/0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.data.base import IGNORE_INDEX
from cvlab.losses.classification import BALANCED, class_weights
from cvlab.utils.validate import check_number


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


class WeightedPixelCrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy of the counted pixels with class weights ``weights``: ``balanced`` (``n / (k · n_c)``
    from ``class_counts``, the training pixels per class), a list of ``num_classes`` numbers, or None."""

    def __init__(self, num_classes: int, class_counts: Sequence[int] | None = None,
                 ignore_index: int | None = IGNORE_INDEX, weights: str | list[float] | None = BALANCED):
        super().__init__(weight=class_weights(weights, num_classes, class_counts, "loss.weights"),
                         ignore_index=-100 if ignore_index is None else ignore_index)


class OHEMPixelCrossEntropy(WeightedPixelCrossEntropy):
    """The cross-entropy of the hard pixels only (module docstring): :meth:`kept` picks them, without gradient;
    ``weights`` as :class:`WeightedPixelCrossEntropy`'s (None by default)."""

    def __init__(self, num_classes: int, class_counts: Sequence[int] | None = None,
                 ignore_index: int | None = IGNORE_INDEX, thresh: float = 0.7, min_kept: int = 100_000,
                 weights: str | list[float] | None = None):
        check_number("loss.thresh", thresh, 0, 1, low_open=True,
                     hint=" (pixels whose true class is predicted below it are hard; MMSegmentation's 0.7)")
        check_number("loss.min_kept", min_kept, 1, integer=True, hint=" (pixels kept per image at least, 100000)")
        super().__init__(num_classes, class_counts, ignore_index, weights)
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    @torch.no_grad()
    def kept(self, logits: Tensor, target: Tensor) -> Tensor:
        """The hard pixels, ``Tensor[N, H, W]`` bool: counted, and their true class's probability below
        ``max(thresh, the (min_kept · N)-th smallest such probability)``."""
        counted = target != self.ignore_index
        probability = logits.float().softmax(1).gather(1, target.where(counted, 0)[:, None])[:, 0]
        ranked = probability[counted].sort().values
        bar = self.thresh
        if ranked.numel():
            bar = max(bar, float(ranked[min(self.min_kept * len(target), ranked.numel() - 1)]))
        return counted & (probability < bar)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return super().forward(logits, target.where(self.kept(logits, target), self.ignore_index))
