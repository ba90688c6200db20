"""Balanced draws of a classification training split: the data view of each member of EasyEnsemble and
BalanceCascade (``strategy=easy_ensemble|balance_cascade``, :mod:`cvlab.engine.ensembles`).

A member trains on every image of the smallest class and a random draw of as many images of every other class
(Liu, Wu & Zhou 2009: all of the minority P and a subset N_i of the majority with |N_i| = |P|).
imbalanced-learn's ``RandomUnderSampler`` makes the draw, on image indices (:func:`balanced_draw`), from a
``pool`` of the training images: the whole split (EasyEnsemble; BalanceCascade's first member), or what
BalanceCascade's earlier members left of it (a ``.npy`` file of indices, :func:`read_pool`). The draw is seeded by
the member's own seed (the run's ``seed`` of its config), so every member draws anew, and a rerun draws the same.

Multi-class, the "majority" is every class with more training images than the smallest
(:func:`majority_classes`). The validation and test splits are untouched, and the training counts a loss or the
frequency groups see (``info.class_counts``) stay those of the split before the draw, as with the samplers of
:mod:`cvlab.data.imbalance`; ``resampled_labels`` holds the draw's labels.

An epoch is one pass over the draw, or with ``split_length`` (``strategy.budget=steps``) as many draws as the whole
training split has images (:class:`RepeatedDrawSampler`), so that the loader has as many batches as a plain run's and
a member trains the optimiser steps, learning-rate schedule and validation points of a plain run of the same epochs.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from cvlab.data.classification import ClassificationDataModule, TransformedDataset
from cvlab.data.samplers import EpochShuffleSampler
from cvlab.utils.errors import UserError

# A pool file holds at most this many indices (a training split is far smaller; the file is read whole).
MAX_POOL = 2**26


def majority_classes(class_counts: Sequence[int]) -> list[int]:
    """The classes with more images than the smallest class (none for balanced counts)."""
    counts = np.asarray(class_counts)
    return np.flatnonzero(counts > counts.min()).tolist() if len(counts) else []


def balanced_draw(labels: Sequence[int], pool: Sequence[int] | None, seed: int) -> np.ndarray:
    """The sorted indices (into ``labels``) of a balanced draw from ``pool`` (indices; None: every item): every
    item of the pool's smallest class, and a random as many of each other class, without replacement
    (imbalanced-learn's ``RandomUnderSampler``, ``random_state=seed``)."""
    from imblearn.under_sampling import RandomUnderSampler

    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool, dtype=np.int64)
    if len(np.unique(labels[pool])) < 2:
        raise UserError(f"a balanced draw needs images of at least 2 classes; the pool of {len(pool)} training images "
                        "holds one.")
    sampler = RandomUnderSampler(sampling_strategy="not minority", random_state=int(seed))
    sampler.fit_resample(pool[:, None], labels[pool])
    return np.sort(pool[sampler.sample_indices_])


def read_pool(path: str | Path, size: int) -> np.ndarray:
    """The training-image indices of a pool file (a ``.npy`` integer vector, no pickle), checked against a training
    split of ``size`` images: unique, each in ``0..size - 1``."""
    path = Path(path)
    try:
        pool = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the pool of training images {str(path)!r} ({error}); it is written by the "
                        "previous member of strategy=balance_cascade (evaluate on other data with data=NAME)") from None
    if pool.ndim != 1 or pool.dtype.kind not in "iu" or len(pool) > MAX_POOL:
        raise UserError(f"{path} is not a pool of training images: a vector of integer indices is expected, got "
                        f"{pool.dtype} {tuple(pool.shape)}.")
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) and (pool.min() < 0 or pool.max() >= size or len(np.unique(pool)) != len(pool)):
        raise UserError(f"{path}: its indices must be unique training images 0..{size - 1}; the data differs from "
                        "the one the pool was drawn from.")
    return pool


class RepeatedDrawSampler(EpochShuffleSampler):
    """An epoch of ``num_samples`` indices of ``draw_size`` items: fresh permutations of them one after another, the
    last one cut short, so that each item comes ``⌊n / m⌋`` or ``⌈n / m⌉`` times an epoch (which ones once more
    changes with the epoch). Positions ``draw_size`` and beyond are never drawn."""

    def __init__(self, num_samples: int, draw_size: int, seed: int = 0):
        super().__init__(num_samples, seed)
        self.draw_size = int(draw_size)

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        rounds = -(-self.num_samples // self.draw_size)
        order = torch.cat([torch.randperm(self.draw_size, generator=generator) for _ in range(rounds)])
        return iter(order[: self.num_samples].tolist())


class BalancedDrawDataModule(ClassificationDataModule):
    """The classification data with its training split replaced by a balanced draw (module docstring) from
    ``pool``: a ``.npy`` file of training-image indices, or None for the whole split. ``split_length``: each epoch
    is as many draws from it as the split has images (:class:`RepeatedDrawSampler`), not one pass. After
    :meth:`setup`, ``drawn`` holds the drawn indices (into the split) and ``resampled_labels`` their labels."""

    def __init__(self, *args, pool: str | None = None, split_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        chosen = (self.resampling or self.sampler_config or {}).get("name", "none")
        if self.resampling or (split_length and chosen != "none"):  # split_length replaces the training order
            raise UserError(f"sampler={chosen} resamples the training split, which an ensemble member's balanced draw "
                            "replaces; leave sampler=none.")
        self.drawn: np.ndarray | None = None

    def read(self) -> None:
        super().read()
        labels = np.asarray(self.train_labels, dtype=np.int64)
        pool = None if self.hparams.pool is None else read_pool(self.hparams.pool, len(labels))
        self.drawn = balanced_draw(labels, pool, self.order_seed)
        items = self.drawn
        if self.hparams.split_length:
            # As long as the split, so the loader counts (and drops a short last batch) as a plain run's does; the
            # sampler draws the first len(drawn) positions only.
            items = np.resize(self.drawn, len(labels))
            self.sampler_config = {"_target_": f"{__name__}.RepeatedDrawSampler", "draw_size": len(self.drawn)}
        self.train_set = TransformedDataset(Subset(self.train_set.base, items.tolist()), self.train_set.transform)
        self.resampled_labels = labels[self.drawn].tolist()
        counts = np.bincount(self.resampled_labels, minlength=len(self.class_names))
        epochs = f"; epochs of {len(labels)} draws from them" if self.hparams.split_length else ""
        self.note(f"balanced draw (imbalanced-learn RandomUnderSampler, seed {self.order_seed}) from "
                  f"{len(labels) if pool is None else len(pool)} training images: {len(self.drawn)}, "
                  f"{counts.min()} per class{epochs}")
