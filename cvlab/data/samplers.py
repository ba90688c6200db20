"""Training samplers whose order depends only on (seed, epoch): the targets of the ``sampler`` config group.

Lightning calls ``set_epoch`` on a sampler that has one, so a run resumed at epoch k replays exactly the
order an uninterrupted run would have used. torch's RandomSampler and WeightedRandomSampler draw from a
generator that advances across epochs, which a resume cannot reproduce; these small samplers fix that.

A datamodule builds the configured sampler with :func:`cvlab.utils.plugins.instantiate_plugin`, offering what its
training set knows (``labels``, ``class_counts``, ``num_classes``, ``num_samples``, ``seed``): a sampler's
signature is the list of what it needs, and a datamodule that cannot supply it refuses the option.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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
