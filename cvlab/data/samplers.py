"""Training samplers whose order depends only on (seed, epoch).

Lightning calls ``set_epoch`` on a sampler that has one, so a run resumed at epoch k replays exactly the
order an uninterrupted run would have used. torch's RandomSampler and WeightedRandomSampler draw from a
generator that advances across epochs, which a resume cannot reproduce; these two small samplers fix that.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from cvlab.utils.errors import UserError


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


def build_sampler(name: str, labels: Sequence[int], seed: int) -> Sampler[int]:
    """The ``sampler`` config group: ``none`` (epoch-seeded shuffle) or ``class_balanced``."""
    if name == "none":
        return EpochShuffleSampler(len(labels), seed)
    if name == "class_balanced":
        return ClassBalancedSampler(labels, seed)
    raise UserError(f"unknown sampler {name!r}; choose none or class_balanced (`cvlab list sampler`).")
