"""Training samplers whose order depends only on (seed, epoch): the targets of the ``sampler`` config group.

Lightning calls ``set_epoch`` on a sampler that has one, so a run resumed at epoch k replays exactly the
order an uninterrupted run would have used. torch's RandomSampler and WeightedRandomSampler draw from a
generator that advances across epochs, which a resume cannot reproduce; these small samplers fix that.

A datamodule builds the configured sampler with :func:`cvlab.utils.plugins.instantiate_plugin`, offering what its
training set knows (``labels``, ``image_labels``, ``class_counts``, ``num_classes``, ``num_samples``, ``seed``): a
sampler's signature is the list of what it needs, and a datamodule that cannot supply it refuses the option.

Under DDP Lightning wraps any of these in its ``DistributedSamplerWrapper``, which shards the list of one epoch's
draws: every process draws the same list (the same ``seed + epoch``), so the shards are disjoint, and the epoch's
length (``__len__``) must be fixed before it is drawn, as it is here.

:class:`RepeatFactorSampler` is LVIS's repeat-factor sampling (Gupta et al. 2019, "LVIS: A Dataset for Large
Vocabulary Instance Segmentation", §4.1); detectron2's ``RepeatFactorTrainingSampler`` is an infinite stream that
rounds each image's factor on its own, so its epochs have no fixed length. Written here: neither torch nor
imbalanced-learn samples images by the rarest of their several classes.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from cvlab.utils.validate import check_number


class EpochShuffleSampler(Sampler[int]):
    """A fresh uniform permutation each epoch, drawn from ``seed + epoch``."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_samples, generator=self._generator()).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ClassBalancedSampler(EpochShuffleSampler):
    """Draws samples with replacement, each with weight 1 / count(its class): every class is seen equally often.

    An epoch has as many draws as the dataset has samples.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0):
        super().__init__(len(labels), seed)
        labels = torch.as_tensor(labels)
        counts = torch.bincount(labels).clamp(min=1).double()
        self.weights = 1.0 / counts[labels]

    def __iter__(self) -> Iterator[int]:
        draws = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self._generator())
        return iter(draws.tolist())


def repeat_factors(image_labels: Sequence[Sequence[int]], threshold: float) -> torch.Tensor:
    """LVIS's image repeat factors, ``Tensor[N]`` float64: ``r_i = max_{c in image i} r_c`` (1 for an image without
    objects), ``r_c = max(1, sqrt(threshold / f_c))`` with ``f_c`` the share of the images that contain class c."""
    present = [set(labels) for labels in image_labels]
    images_with = Counter(label for labels in present for label in labels)
    class_factor = {label: max(1.0, math.sqrt(threshold * len(present) / count))
                    for label, count in images_with.items()}
    return torch.tensor([max((class_factor[label] for label in labels), default=1.0) for labels in present],
                        dtype=torch.float64)


class RepeatFactorSampler(EpochShuffleSampler):
    """Each image drawn about ``r_i`` times an epoch (:func:`repeat_factors`; ``threshold`` t: the paper's 0.001),
    so images of rare classes come back more often, and each class at least as often as if it were in a share t of
    the images. Detection: ``image_labels`` holds each training image's object classes.

    An epoch has ``⌈Σ r_i⌉`` draws (:attr:`num_samples`). Its counts round the factors stochastically, as
    detectron2's ``RepeatFactorTrainingSampler`` does, but systematically (Madow 1949) so that they add up to the
    epoch's length: in a random order of the images and with one offset ``u ~ U[0, 1)``, image i is drawn
    ``⌊C_i + u⌋ − ⌊C_{i−1} + u⌋`` times, ``C`` the running sum of ``r_i · ⌈Σ r⌉ / Σ r``. That is ``⌊r'_i⌋`` or
    ``⌈r'_i⌉`` times (never fewer than once), ``r'_i`` on average (``r_i`` scaled up by less than one draw in
    ``Σ r``), and then the draws are shuffled.
    """

    def __init__(self, image_labels: Sequence[Sequence[int]], threshold: float = 0.001, seed: int = 0):
        check_number("sampler.threshold", threshold, 0, 1, low_open=True,
                     hint=" (the image share below which a class is repeated; LVIS's 0.001)")
        self.threshold = float(threshold)
        self.repeat_factors = repeat_factors(image_labels, self.threshold)
        total = float(self.repeat_factors.sum())
        super().__init__(math.ceil(round(total, 6)), seed)
        # Never scaled below 1, so rounding error cannot take its one draw from an image of r_i = 1.
        self.scaled_factors = self.repeat_factors * max(1.0, self.num_samples / total) if total else self.repeat_factors

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current epoch's counts per image (``Tensor[N]`` int64, summing to ``len(self)``) and its draws in
        order (``Tensor[len(self)]``)."""
        generator = self._generator()
        order = torch.randperm(len(self.scaled_factors), generator=generator)
        offset = torch.rand((), generator=generator, dtype=torch.float64)
        edges = torch.floor(torch.cumsum(self.scaled_factors[order], 0) + offset).long()
        edges[-1:] = self.num_samples  # the running sum's rounding error must not move the epoch's length
        counts = torch.zeros_like(edges)
        counts[order] = torch.diff(edges, prepend=edges.new_zeros(1))
        draws = torch.repeat_interleave(counts)
        return counts, draws[torch.randperm(len(draws), generator=generator)]

    def counts(self) -> torch.Tensor:
        """How many times each image is drawn in the current epoch, ``Tensor[N]`` int64."""
        return self._draw()[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self._draw()[1].tolist())


class EpochKeyedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for each index of ``sampler``: the key of a dataset whose items change per epoch
    (mosaic, mixup), so they are drawn from ``(seed, epoch, index)`` alone, in the main process or any worker."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
