"""Two-image augmentation of classification training sets, as dataset wrappers: mixup, CutMix and SamplePairing
(``data.mixup_alpha``, ``data.cutmix_alpha``, ``data.sample_pairing``).

Each wraps the transformed training set (items ``(Tensor[C, H, W], label)``) and is as long. The training loader
asks it for ``(epoch, index)`` keys (:class:`~cvlab.data.samplers.EpochKeyedSampler`), and every random choice (the
partner image, the ratio, the box) comes from ``(seed, epoch, index)`` alone, so a resumed run and any number of
loader workers see the same pairs. The partner is any other training image, uniformly. Both images have had their
own training transform (crop, flip...), as in the papers; mixing the normalised images equals mixing before the
normalisation, which is affine per channel.

- **mixup** (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"): ``λ x_i + (1 − λ) x_j`` with the soft
  label ``λ y_i + (1 − λ) y_j``, ``λ ~ Beta(α, α)`` drawn per image (the paper's code draws one per batch; the pairs
  and ratios have the same distribution). The paper used α = 0.2 on ImageNet and α = 1 on CIFAR.
- **CutMix** (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features"): a box of the partner pasted into the image, ``λ ~ Beta(α, α)`` (the paper's α = 1: uniform), the box
  ``W √(1 − λ) x H √(1 − λ)`` around a uniform centre, clipped to the image; the soft label weighs each image by
  the area it shows.
- **SamplePairing** (Inoue 2018, "Data Augmentation by Pairing Samples for Images Classification"): the average
  ``(x_i + x_j) / 2`` with the label of the first, ``y_i``, on an on/off schedule: off for the first ``start``
  epochs, then on for ``on`` epochs and off for ``off``, repeating, and off again from epoch ``stop`` (the paper's
  final fine-tuning). The paper's CIFAR schedule is start 100, 8 on, 2 off.

mixup and CutMix give soft labels ``Tensor[num_classes]`` (float), which the classification losses take as they take
integer labels; SamplePairing keeps integer labels.

Hand-written: torchvision's v2.MixUp and v2.CutMix mix whole collated batches with the global RNG, which neither a
resumed run nor the loader workers can replay, and no library has SamplePairing.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class _Paired(Dataset):
    """What the wrappers share: the wrapped dataset, its length, the item's generator and the partner draw."""

    def __init__(self, dataset: Dataset, seed: int):
        if len(dataset) < 2:
            raise ValueError("pairing images needs a training set of at least two images")
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.pair(int(index), int(epoch))

    def pair(self, index: int, epoch: int):
        raise NotImplementedError

    def _generator(self, epoch: int, index: int) -> np.random.Generator:
        # The class name keeps the draws of two wrappers for one item independent.
        return np.random.default_rng([self.seed, zlib.crc32(type(self).__name__.encode()), epoch, index])

    def _partner(self, rng: np.random.Generator, index: int) -> int:
        other = int(rng.integers(len(self.dataset) - 1))
        return other + (other >= index)  # any image but this one


class _SoftLabels(_Paired):
    """mixup and CutMix: both images' labels, weighted, as a soft label ``Tensor[num_classes]``."""

    def __init__(self, dataset: Dataset, num_classes: int, alpha: float, seed: int = 0):
        super().__init__(dataset, seed)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.num_classes, self.alpha = int(num_classes), float(alpha)

    def _soft_label(self, label, other_label, share: float) -> Tensor:
        """``share`` of the first label plus ``1 - share`` of the second."""
        first, second = (F.one_hot(torch.as_tensor(int(value)), self.num_classes).float()
                         for value in (label, other_label))
        return share * first + (1 - share) * second

    def pair(self, index: int, epoch: int) -> tuple[Tensor, Tensor]:
        rng = self._generator(epoch, index)
        other = self._partner(rng, index)
        ratio = float(rng.beta(self.alpha, self.alpha))
        (image, label), (other_image, other_label) = self.dataset[index], self.dataset[other]
        mixed, share = self.mix(image, other_image, ratio, rng)
        return mixed, self._soft_label(label, other_label, share)

    def mix(self, image: Tensor, other: Tensor, ratio: float, rng: np.random.Generator) -> tuple[Tensor, float]:
        """The mixed image and the share of ``image`` in it."""
        raise NotImplementedError


class MixupImages(_SoftLabels):
    """mixup of each training image with a random other one (module docstring). Items: ``(Tensor[C, H, W],
    soft label Tensor[num_classes])``."""

    def mix(self, image, other, ratio, rng):
        return ratio * image + (1 - ratio) * other, ratio


class CutMixImages(_SoftLabels):
    """CutMix of each training image with a random other one (module docstring). Items: ``(Tensor[C, H, W],
    soft label Tensor[num_classes])``, the label weighed by the area each image shows."""

    def mix(self, image, other, ratio, rng):
        height, width = image.shape[-2:]
        side = math.sqrt(1 - ratio)
        centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
        half_h, half_w = int(height * side) // 2, int(width * side) // 2
        top, bottom = max(centre_y - half_h, 0), min(centre_y + half_h, height)
        left, right = max(centre_x - half_w, 0), min(centre_x + half_w, width)
        mixed = image.clone()
        mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        return mixed, 1 - (bottom - top) * (right - left) / (height * width)


class SamplePairingImages(_Paired):
    """SamplePairing of each training image with a random other one on the paper's on/off schedule (module
    docstring). Items: ``(Tensor[C, H, W], the first image's label)``."""

    def __init__(self, dataset: Dataset, start: int = 100, on: int = 8, off: int = 2, stop: int | None = None,
                 seed: int = 0):
        super().__init__(dataset, seed)
        if start < 0 or on < 1 or off < 0 or (stop is not None and stop < start):
            raise ValueError(f"schedule start={start}, on={on}, off={off}, stop={stop}: start >= 0, on >= 1, "
                             "off >= 0, stop >= start or None")
        self.start, self.on, self.off, self.stop = start, on, off, stop

    def active(self, epoch: int) -> bool:
        """Whether images are paired in ``epoch`` (0-based)."""
        if epoch < self.start or (self.stop is not None and epoch >= self.stop):
            return False
        return (epoch - self.start) % (self.on + self.off) < self.on

    def pair(self, index: int, epoch: int):
        if not self.active(epoch):
            return self.dataset[index]
        other = self._partner(self._generator(epoch, index), index)
        (image, label), (other_image, _) = self.dataset[index], self.dataset[other]
        return (image + other_image) / 2, label
