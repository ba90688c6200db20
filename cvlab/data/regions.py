"""R-CNN's regions: proposals warped to the CNN's fixed input, and the fine-tuning data made of them.

Paper: Girshick, Donahue, Darrell & Malik 2014, "Rich feature hierarchies for accurate object detection and semantic
segmentation" (R-CNN), §2.1 and Appendix A (warping), §2.3 (fine-tuning).

- **Warping** (:func:`warp_regions`): each region is dilated so that, once warped to ``S x S``, exactly ``p`` pixels
  of image context surround the original box (the paper's p = 16 at S = 227; cvlab scales p by S / 227, so the
  context is the same fraction of the warp at any size), then resampled anisotropically to ``S x S`` with
  ``torchvision.ops.roi_align`` (bilinear, adaptive sampling, so a box larger than the warp is averaged rather than
  aliased). Where the dilated box leaves the image the paper fills in the image mean, which is 0 after the mean is
  subtracted: here the regions are ``(pixel - grey) / 0.25`` with cvlab's letterbox grey (114/255) as the mean, and
  ``roi_align`` of the mean-subtracted image reads 0 outside it.
- **Labels** (:class:`RegionDataset`): the ground-truth boxes and the proposals of every image; a region whose best
  IoU with an object is >= ``fg_iou`` (0.5) is a positive of that object's class (labels 1..K), the rest background
  (label 0): :class:`~cvlab.ops.matching.IoUMatcher` with R-CNN's thresholds.
- **Batches** (:class:`RegionBatchSampler`): the paper's mini-batch of 128 holds 32 positive windows (over all
  classes) and 96 background windows, each drawn uniformly from all the windows of the split.

:class:`SplitBoxes` stores the proposals and ground truth of every image of a split as ``.npy`` files (the proposals
stage of ``cvlab train model=rcnn``); :class:`RegionDataModule` serves the warped windows of the three splits to a
classification task (the fine-tuning stage). Hand-written: no library has R-CNN's region sampling.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.ops import roi_align

from cvlab.data.base import LETTERBOX_GREY, DataInfo, DetectionDataset, SplitDataModule
from cvlab.ops.matching import FOREGROUND, IoUMatcher
from cvlab.utils.errors import UserError

__all__ = ["BACKGROUND_CLASS", "PAPER_CONTEXT", "PAPER_WARP", "REGION_MEAN", "REGION_STD", "RegionBatchSampler",
           "RegionDataModule", "RegionDataset", "SplitBoxes", "context_padding", "dilate_boxes", "warp_regions"]

PAPER_WARP = 227  # the paper's CNN input (AlexNet)
PAPER_CONTEXT = 16  # p: pixels of context around the box at that size
REGION_MEAN = LETTERBOX_GREY / 255  # what lies outside the image, subtracted (the paper subtracts the image mean)
REGION_STD = 0.25  # cvlab's default input scale (data/classification.py's fallback statistics)
BACKGROUND_CLASS = "background"
IMAGE_CACHE_BYTES = 256 * 2**20  # the decoded images a RegionDataset keeps (per loader worker)


# ------------------------------------------------------------------------------------------------- warping
def context_padding(warp_size: int, context: float = PAPER_CONTEXT) -> float:
    """The padding ``p`` in warped pixels at ``warp_size``: ``context`` is given at the paper's 227 px warp."""
    return context * warp_size / PAPER_WARP


def dilate_boxes(boxes: Tensor, warp_size: int, padding: float) -> Tensor:
    """``Tensor[K, 4]`` xyxy boxes grown about their centres so that, warped to ``warp_size``, the original box fills
    the central ``warp_size - 2 * padding`` pixels: each side grows by ``size * padding / (warp_size - 2 padding)``."""
    inner = warp_size - 2 * padding
    if inner <= 0:
        raise ValueError(f"padding {padding} leaves nothing of a {warp_size} px warp")
    grow = (boxes[:, 2:] - boxes[:, :2]) * (padding / inner)
    return torch.cat([boxes[:, :2] - grow, boxes[:, 2:] + grow], dim=1)


def warp_regions(image: Tensor, boxes: Tensor, warp_size: int, padding: float) -> Tensor:
    """The CNN inputs of ``boxes: Tensor[K, 4]`` (xyxy pixels) of ``image: Tensor[3, H, W]`` (float in [0, 1]):
    ``Tensor[K, 3, warp_size, warp_size]``, each box dilated by ``padding`` warped pixels of context
    (:func:`dilate_boxes`), ``(pixel - REGION_MEAN) / REGION_STD``, 0 outside the image."""
    centred = (image - REGION_MEAN).unsqueeze(0)
    rois = dilate_boxes(boxes.to(centred), warp_size, padding)
    # aligned=True: pixel j covers [j, j + 1), cvlab's continuous coordinates; sampling_ratio=0: as many samples
    # per output pixel as the box has input pixels there (one bilinear sample when enlarging).
    warped = roi_align(centred, [rois], output_size=(warp_size, warp_size), spatial_scale=1.0, sampling_ratio=0,
                       aligned=True)
    return warped / REGION_STD


# ------------------------------------------------------------------------------------------------- boxes on disk
_FIELDS = {"proposals": (np.float32, 2), "proposal_counts": (np.int64, 1), "gt_boxes": (np.float32, 2),
           "gt_labels": (np.int64, 1), "gt_counts": (np.int64, 1)}


@dataclass
class SplitBoxes:
    """The proposals and ground truth of every image of one split, in the pixels of the image as the evaluation
    pipeline gives it (letterboxed): ``proposals`` ``[P, 4]`` float32 and ``gt_boxes`` ``[G, 4]``, image after image,
    ``gt_labels`` ``[G]`` (0-based), and how many of each every image has (``proposal_counts``, ``gt_counts``:
    ``[N]``)."""

    proposals: np.ndarray
    proposal_counts: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_counts: np.ndarray

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in _FIELDS.items():
            array = np.asarray(getattr(self, name))
            if array.ndim != ndim or (ndim == 2 and array.shape[1] != 4):
                raise ValueError(f"SplitBoxes.{name} has shape {array.shape}")
            setattr(self, name, array.astype(dtype, copy=False))
        if not (len(self.proposal_counts) == len(self.gt_counts) and self.proposal_counts.sum() == len(self.proposals)
                and self.gt_counts.sum() == len(self.gt_boxes) == len(self.gt_labels)):
            raise ValueError("SplitBoxes: the counts do not add up to the boxes")
        self._proposal_starts = np.concatenate([[0], np.cumsum(self.proposal_counts)])
        self._gt_starts = np.concatenate([[0], np.cumsum(self.gt_counts)])

    @classmethod
    def collect(cls, dataset: Dataset) -> "SplitBoxes":
        """The boxes of every item of a detection dataset whose targets carry ``"proposals"``
        (:class:`~cvlab.data.proposals.WithProposals`)."""
        proposals, gt_boxes, gt_labels = [], [], []
        for index in range(len(dataset)):
            _, target = dataset[index]
            proposals.append(target["proposals"].numpy())
            gt_boxes.append(target["boxes"].numpy())
            gt_labels.append(target["labels"].numpy())
        return cls(np.concatenate(proposals or [np.zeros((0, 4))]), np.array([len(p) for p in proposals]),
                   np.concatenate(gt_boxes or [np.zeros((0, 4))]), np.concatenate(gt_labels or [np.zeros(0)]),
                   np.array([len(b) for b in gt_boxes]))

    def __len__(self) -> int:
        return len(self.gt_counts)

    @property
    def proposal_starts(self) -> np.ndarray:
        """Where each image's proposals start in ``proposals`` (``[N + 1]``, the total last)."""
        return self._proposal_starts

    def image(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(proposals Tensor[K, 4], gt boxes Tensor[M, 4], gt labels Tensor[M])`` of image ``index``."""
        p, g = self._proposal_starts, self._gt_starts
        return (torch.from_numpy(self.proposals[p[index]:p[index + 1]]),
                torch.from_numpy(self.gt_boxes[g[index]:g[index + 1]]),
                torch.from_numpy(self.gt_labels[g[index]:g[index + 1]]))

    def save(self, directory: Path, split: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in _FIELDS:
            np.save(directory / f"{split}_{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, directory: Path, split: str) -> "SplitBoxes":
        """The boxes :meth:`save` wrote (read without pickle; a missing or inconsistent file is a UserError)."""
        try:
            arrays = {name: np.load(directory / f"{split}_{name}.npy", allow_pickle=False) for name in _FIELDS}
            return cls(**arrays)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the {split} boxes in {directory} ({error}); delete that folder's stage.json "
                            "to compute them again") from None


# ------------------------------------------------------------------------------------------------- fine-tuning data
class RegionDataset(Dataset):
    """Every window of a split (its ground-truth boxes and its proposals) as ``(Tensor[3, S, S], label)``: label
    ``k + 1`` for a window whose best IoU with an object of class ``k`` is >= ``fg_iou``, 0 (background) otherwise.

    ``dataset`` gives the images (its evaluation pipeline: the pixels ``boxes`` are in); ``image_index``,
    ``windows`` (``Tensor[R, 4]``) and ``labels`` (``Tensor[R]``) list the windows."""

    def __init__(self, dataset: DetectionDataset, boxes: SplitBoxes, warp_size: int, padding: float,
                 fg_iou: float = 0.5):
        if len(dataset) != len(boxes):
            raise ValueError(f"{len(dataset)} images but boxes of {len(boxes)}")
        self.dataset, self.warp_size, self.padding = dataset, warp_size, padding
        matcher = IoUMatcher(fg_iou, (0.0, fg_iou))
        index, windows, labels = [], [], []
        for image in range(len(boxes)):
            proposals, gt_boxes, gt_labels = boxes.image(image)
            candidates = torch.cat([gt_boxes, proposals])
            match = matcher(candidates, gt_boxes)
            label = torch.zeros(len(candidates), dtype=torch.int64)
            foreground = match.kind == FOREGROUND
            label[foreground] = gt_labels[match.index[foreground]] + 1
            index.append(torch.full((len(candidates),), image, dtype=torch.int64))
            windows.append(candidates)
            labels.append(label)
        self.image_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
        self.windows = torch.cat(windows) if windows else torch.zeros(0, 4)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self._images: OrderedDict[int, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Tensor:
        """Image ``index`` as the evaluation pipeline gives it (float in [0, 1]). A batch's windows come from ~128
        images drawn at random, so the images stay cached (as uint8, exact: the pipeline's floats are k / 255) up to
        :data:`IMAGE_CACHE_BYTES`, least recently used out first."""
        cached = self._images.get(index)
        if cached is None:
            image, _ = self.dataset[index]
            cached = self._images[index] = image.mul(255).round().to(torch.uint8)
            if len(self._images) * cached.numel() > IMAGE_CACHE_BYTES:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(index)
        return cached.float().div(255)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.image(int(self.image_index[index]))
        return warp_regions(image, self.windows[index:index + 1], self.warp_size, self.padding)[0], self.labels[index]


class RegionBatchSampler(Sampler[list[int]]):
    """``batches`` mini-batches of ``positives`` windows drawn uniformly from the positive ones (label > 0) and
    ``background`` from the background ones (label 0), with replacement, positives first; epoch ``e`` draws from
    ``seed`` and ``e`` (Lightning calls :meth:`set_epoch`), so a rerun replays the same batches."""

    def __init__(self, labels: Tensor, positives: int, background: int, batches: int, seed: int = 0):
        self.positive = torch.nonzero(labels > 0).flatten()
        self.negative = torch.nonzero(labels == 0).flatten()
        if positives and not len(self.positive) or background and not len(self.negative):
            raise UserError(f"R-CNN's windows hold {len(self.positive)} positive and {len(self.negative)} background "
                            "ones; a fine-tuning batch needs both (are there objects, and proposals around them?)")
        self.positives, self.background, self.batches, self.seed = positives, background, batches, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for _ in range(self.batches):
            positive = self.positive[torch.randint(len(self.positive), (self.positives,), generator=generator)] \
                if self.positives else self.positive[:0]
            negative = self.negative[torch.randint(len(self.negative), (self.background,), generator=generator)]
            yield torch.cat([positive, negative]).tolist()

    def __len__(self) -> int:
        return self.batches


_SPLITS = ("train", "val", "test")


class RegionDataModule(SplitDataModule):
    """The warped windows of a detection dataset's three splits, as classification data of ``K + 1`` classes
    (``background`` first, then the dataset's classes): R-CNN's fine-tuning data.

    ``detection``: the detection data config (``_target_`` + kwargs), read with its evaluation pipeline on every split
    (``augment`` off: the windows are the variation). ``boxes_dir``: the folder of the :class:`SplitBoxes` of the
    three splits. Training: ``batches_per_epoch`` batches of ``positives`` + ``background`` windows
    (:class:`RegionBatchSampler`, redrawn each epoch); validation and test: ``eval_batches`` such batches, drawn once
    from ``seed``. ``sampler`` must be none: the batches are R-CNN's own.
    """

    kind = "R-CNN region"

    def __init__(self, detection: dict, boxes_dir: str, warp_size: int = 32, context: float = PAPER_CONTEXT,
                 fg_iou: float = 0.5, positives: int = 32, background: int = 96, batches_per_epoch: int = 100,
                 eval_batches: int = 8, num_workers: int = 0, seed: int = 0, sampler: dict | None = None,
                 name: str | None = None):
        self.check_sampler(sampler)
        super().__init__(batch_size=positives + background, num_workers=num_workers, seed=seed, sampler=None,
                         val_fraction=0.15, test_fraction=0.15)
        self.detection_config = {**detection, "augment": False}
        self.boxes_dir = Path(boxes_dir).expanduser()
        self.warp_size, self.padding, self.fg_iou = warp_size, context_padding(warp_size, context), fg_iou
        self.positives, self.background = positives, background
        self.batches_per_epoch, self.eval_batches = batches_per_epoch, eval_batches
        self.name = name or f"{detection.get('name', 'detection')} regions"
        self.class_names: tuple[str, ...] = ()

    @staticmethod
    def check_sampler(sampler: dict | None) -> None:
        """Refuses a ``sampler`` option other than none (the uniform shuffle): the batches are R-CNN's own."""
        if sampler and sampler.get("_target_") not in (None, "cvlab.data.samplers.EpochShuffleSampler"):
            raise UserError(f"sampler={sampler.get('name', sampler['_target_'])}: R-CNN draws its own fine-tuning "
                            "batches (model.pipeline.finetune.positives / background); leave sampler=none.")

    def read(self) -> None:
        from hydra.utils import instantiate

        detection = instantiate(self.detection_config)
        detection.setup()
        sets = (detection.train_set, detection.val_set, detection.test_set)
        self.train_set, self.val_set, self.test_set = (
            RegionDataset(dataset, SplitBoxes.load(self.boxes_dir, split), self.warp_size, self.padding, self.fg_iou)
            for split, dataset in zip(_SPLITS, sets))
        self.class_names = (BACKGROUND_CLASS, *detection.class_names)
        self.files = detection.files
        counts = torch.bincount(self.train_set.labels, minlength=len(self.class_names)).tolist()
        self.note(f"data {self.name}: {len(self.train_set)} / {len(self.val_set)} / {len(self.test_set)} train / val / "
                  f"test windows, {sum(counts[1:])} positive in training")

    def describe(self) -> DataInfo:
        counts = torch.bincount(self.train_set.labels, minlength=len(self.class_names)).tolist()
        return DataInfo(num_classes=len(self.class_names), class_names=self.class_names, in_chans=3,
                        image_size=self.warp_size, class_counts=counts)

    def _sampler(self, regions: RegionDataset, batches: int, seed: int) -> RegionBatchSampler:
        return RegionBatchSampler(regions.labels, self.positives, self.background, batches, seed)

    def _windows(self, regions: RegionDataset, batch_sampler: Sequence | Sampler) -> DataLoader:
        workers = self.num_workers
        return DataLoader(regions, batch_sampler=batch_sampler, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._windows(self.train_set, self._sampler(self.train_set, self.batches_per_epoch, self.order_seed))

    def _evaluation_loader(self, regions: RegionDataset) -> DataLoader:
        # Drawn once: every validation pass scores the same windows (a list of batches ignores set_epoch).
        return self._windows(regions, list(self._sampler(regions, self.eval_batches, self.seed)))
