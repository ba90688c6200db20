"""Region proposals attached to detection data, for the detectors that take them (R-CNN, Fast R-CNN).

:class:`WithProposals` wraps a split: each target then also carries ``"proposals"``, ``Tensor[K, 4]`` xyxy in the
same pixels as ``"boxes"``. The proposals are those of :class:`~cvlab.ops.proposals.ProposalCache`, computed once
per image on the image as the dataset reads it (before the letterbox and any augmentation) and cached on disk.
:func:`precompute_proposals` fills the cache before training, with a progress bar, so that no loader worker stalls
an epoch on selective search. ``DetectionDataModule.attach_proposals`` wraps the three splits; ``DetectionTask``
calls it when the model config has ``proposals:`` settings.

How the proposals follow the image: they ride through the split's v2 pipeline in the same
``tv_tensors.BoundingBoxes`` as the ground truth, with the label -1, and are split off after it. The letterbox, the
flip and the affine jitter therefore move them with the very parameters they draw for the image, and
``ClampBoundingBoxes`` + ``SanitizeBoundingBoxes`` clamp them to the image and drop those the augmentation left
under 1 px, exactly as for the boxes. A second ``BoundingBoxes`` in the sample would not work:
``SanitizeBoundingBoxes`` computes its mask on the first one it finds and applies it to every other, so proposals of
another count would pass unsanitized, and of the same count lose the wrong rows.

Multi-image augmentation (mosaic, mixup) is refused with proposals: the combined image would need the proposals of
its own pixels, not its parts'.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cvlab.data.base import Annotation, DetectionDataset
from cvlab.ops.proposals import ProposalCache, proposal_settings
from cvlab.utils.console import console

__all__ = ["WithProposals", "attach_proposals", "precompute_proposals"]

log = logging.getLogger(__name__)

_PROPOSAL_LABEL = -1  # marks the proposals among the boxes while they pass through the transforms
_IN_PROCESS = 64  # images below which starting worker processes costs more than it saves


class WithProposals(DetectionDataset):
    """``dataset`` whose targets also carry ``"proposals"``: ``Tensor[K, 4]`` float32 xyxy, transformed with the
    image by ``dataset``'s own transforms (see the module docstring), K varying per image. :meth:`proposals` gives
    them in the pixels of the image as read, untransformed. ``settings``: a model's ``proposals:`` settings."""

    def __init__(self, dataset: DetectionDataset, settings: Mapping[str, Any], cache: ProposalCache | None = None):
        super().__init__(dataset.class_names, dataset.transforms)
        self.dataset, self.settings = dataset, proposal_settings(settings)
        self.cache = cache or ProposalCache()
        self.problems = dataset.problems

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> Tensor:
        """The uint8 image ``Tensor[3, H, W]`` of item ``index``, as read (the one its proposals are computed on)."""
        return self.dataset.load(index)[0]

    def proposals(self, index: int) -> Tensor:
        """The proposals of item ``index`` on the image as read: ``Tensor[K, 4]`` (cached)."""
        return self.cache.get(self.image(index), self.settings)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        image, boxes, labels, image_id = self.dataset.load(index)
        proposals = self.cache.get(image, self.settings)
        marks = torch.full((len(proposals),), _PROPOSAL_LABEL, dtype=labels.dtype)
        return image, torch.cat([boxes.to(torch.float32), proposals]), torch.cat([labels, marks]), image_id

    def annotation(self, index: int) -> Annotation:
        return self.dataset.annotation(index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        image, target = super().__getitem__(key)
        is_proposal = target["labels"] == _PROPOSAL_LABEL
        return image, {**target, "boxes": target["boxes"][~is_proposal], "labels": target["labels"][~is_proposal],
                       "proposals": target["boxes"][is_proposal]}


class _CacheFiller(Dataset):
    """Item ``i``: whether image ``i`` of the wrapped splits has cached proposals (``compute=False``), or its proposals
    computed and stored (``compute=True``, then True). Loader workers run it in parallel."""

    def __init__(self, datasets: Sequence[WithProposals], items: Sequence[tuple[int, int]], compute: bool):
        self.datasets, self.items, self.compute = datasets, list(items), compute

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> bool:
        dataset = self.datasets[self.items[position][0]]
        image = dataset.image(self.items[position][1])
        if self.compute:
            dataset.cache.get(image, dataset.settings)
            return True
        return dataset.cache.cached(image, dataset.settings) is not None


def _run(filler: _CacheFiller, num_workers: int | None, description: str) -> list[bool]:
    if num_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = cores if len(filler) >= _IN_PROCESS else 0
    loader = DataLoader(filler, batch_size=None, num_workers=num_workers)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=len(filler))
        results = []
        for result in loader:
            results.append(bool(result))
            progress.advance(task)
    return results


def precompute_proposals(datasets: Sequence[WithProposals], num_workers: int | None = None) -> int:
    """Computes the proposals of every image of ``datasets`` that has none cached, with a progress bar; returns how
    many it computed. Every image is read once to find its cache entry. ``num_workers`` loader processes do the work
    (0: this process; None: one per CPU core, each running OpenCV on one thread, or this process for a few
    images): a one-off job that the machine's otherwise idle cores share, whatever ``data.num_workers`` says."""
    items = [(d, i) for d, dataset in enumerate(datasets) for i in range(len(dataset))]
    cached = _run(_CacheFiller(datasets, items, compute=False), num_workers, "proposal cache")
    missing = [item for item, hit in zip(items, cached) if not hit]
    if missing:
        settings = datasets[0].settings
        log.info("selective search (%s): computing the proposals of %d of %d images once, into %s (roughly 1-2 min "
                 "per 2000 images of 128 px on 2 cores, longer for larger ones; later runs read them)",
                 settings["mode"], len(missing), len(items), datasets[0].cache.root)
        _run(_CacheFiller(datasets, missing, compute=True), num_workers, "selective search")
    return len(missing)


def attach_proposals(datasets: Sequence[DetectionDataset], settings: Mapping[str, Any] | None,
                     num_workers: int | None = None, cache: ProposalCache | None = None) -> list[WithProposals]:
    """``datasets`` wrapped in :class:`WithProposals` (a wrapped one re-wrapped with the new settings) after
    :func:`precompute_proposals` filled the cache."""
    settings = proposal_settings(settings)
    cache = cache or ProposalCache()
    wrapped = [WithProposals(dataset.dataset if isinstance(dataset, WithProposals) else dataset, settings, cache)
               for dataset in datasets]
    precompute_proposals(wrapped, num_workers)
    return wrapped
