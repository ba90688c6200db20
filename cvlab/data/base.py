"""The data contract: :class:`DataInfo`, the detection and segmentation dataset bases, the seeded split cutter and
the datamodule base every datamodule shares.

- :class:`DataInfo` is what a model and a task learn about the data (classes, channels, size, class counts), and
  what a checkpoint stores of it.
- :class:`DetectionDataset` is the base of every detection dataset: the readers in ``data/detection.py``, the shape
  scenes in ``data/shapes.py`` and the multi-image wrappers in ``data/wrappers.py``.
- :class:`SegmentationDataset` is the base of every segmentation dataset: the mask files of
  ``data/segmentation.py`` and the shape scenes in ``data/shapes.py``.
- :func:`cut_splits` cuts validation and test sets, seeded (and stratified by class when labels are given), for
  data whose files ship no such split.
- :class:`SplitDataModule` holds the three splits and builds their loaders: each loader draws from its own
  generator (the training one is saved with the checkpoint), and the training order comes from the ``sampler``
  plug-in, epoch-seeded, so a resumed run sees exactly the batches an uninterrupted one would. Data read from files
  lists the files of each split (:meth:`~SplitDataModule.split_files`), for the run directory.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cvlab.data.samplers import EpochKeyedSampler, EpochShuffleSampler
from cvlab.utils.errors import UserError
from cvlab.utils.images import IMAGE_EXTENSIONS
from cvlab.utils.plugins import instantiate_plugin, missing_arguments, plain_config

__all__ = ["IGNORE_INDEX", "IMAGE_EXTENSIONS", "LETTERBOX_GREY", "Annotation", "DataInfo", "DetectionDataset",
           "DetectionSubset", "SegmentationDataset", "SplitDataModule", "UNLABELED", "check_fractions", "cut_note",
           "cut_splits", "letterbox_geometry"]

log = logging.getLogger(__name__)

LETTERBOX_GREY = 114  # YOLO's padding value, on the 0..255 scale
UNLABELED = -1  # the label of a training image whose label is withheld (semi-supervised distillation)
IGNORE_INDEX = 255  # the mask value segmentation's losses and metrics skip, and the fill of padded mask pixels


# ------------------------------------------------------------------------------------------------- DataInfo
@dataclass(frozen=True)
class DataInfo:
    """What a model and a task need to know about the data; every datamodule's ``info`` (after ``setup``).

    ============== ====================================================================================
    num_classes    foreground classes (labels ``0..num_classes - 1``)
    class_names    one name per class
    in_chans       image channels
    image_size     the square side the images reach the model at
    class_counts   training-set count per class: images for classification, boxes for detection;
                   ``()`` when unknown (a checkpoint written before the counts were stored)
    ignore_index   the label a loss and a metric skip (segmentation's 255), or None
    palette        one (r, g, b) colour per class for drawn masks, or None
    ============== ====================================================================================

    :meth:`as_dict` gives plain python (lists, ints, strings) for checkpoints, which are loaded with
    ``torch.load(weights_only=True)``; :meth:`from_dict` reads it back.
    """

    num_classes: int
    class_names: tuple[str, ...]
    in_chans: int
    image_size: int
    class_counts: tuple[int, ...]
    ignore_index: int | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        # Sequences in, tuples stored: the info is hashable and compares equal however it was built.
        object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))
        object.__setattr__(self, "class_counts", tuple(int(count) for count in self.class_counts))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(tuple(int(v) for v in colour) for colour in self.palette))
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"DataInfo: {self.num_classes} classes but {len(self.class_names)} class names")
        if self.class_counts and len(self.class_counts) != self.num_classes:
            raise ValueError(f"DataInfo: {self.num_classes} classes but {len(self.class_counts)} class counts")
        if self.palette is not None and len(self.palette) != self.num_classes:
            raise ValueError(f"DataInfo: {self.num_classes} classes but {len(self.palette)} palette colours")

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            "in_chans": int(self.in_chans),
            "image_size": int(self.image_size),
            "class_counts": list(self.class_counts),
            "ignore_index": self.ignore_index,
            "palette": None if self.palette is None else [list(colour) for colour in self.palette],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataInfo":
        """The inverse of :meth:`as_dict`; also reads the dicts of older checkpoints, which lack ``class_counts``,
        ``ignore_index`` and ``palette``."""
        return cls(num_classes=int(values["num_classes"]), class_names=tuple(values["class_names"]),
                   in_chans=int(values["in_chans"]), image_size=int(values["image_size"]),
                   class_counts=tuple(values.get("class_counts") or ()), ignore_index=values.get("ignore_index"),
                   palette=values.get("palette"))


# ------------------------------------------------------------------------------------------------- splits
def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """``data.val_fraction`` and ``data.test_fraction`` must each be in (0, 1) and leave images to train on."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction}: each must be "
                        "above 0, and together below 1 (the rest is the training set).")


def cut_splits(num_items: int, fractions: Sequence[float], seed: int, labels: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None, what: str = "the data") -> list[np.ndarray]:
    """Cuts ``range(num_items)`` into parts of ``ceil(f * num_items)`` items, one per fraction ``f``, and the rest.

    Seeded by ``seed``; with ``labels`` each part keeps every class's share (stratified, scikit-learn's
    ``train_test_split``). Returns ``[rest, *parts]``, each sorted. ``class_names`` and ``what`` name the classes
    and the data in errors.
    """
    from sklearn.model_selection import train_test_split

    rest = np.arange(num_items)
    labels = None if labels is None else np.asarray(labels)
    if labels is not None:
        counts = np.bincount(labels)
        smallest = int(np.argmin(np.where(counts > 0, counts, num_items + 1)))
        if counts[smallest] < len(fractions) + 1:
            name = repr(class_names[smallest]) if class_names is not None else smallest
            raise UserError(f"class {name} of {what} has {counts[smallest]} image(s); cutting "
                            f"{len(fractions)} stratified split(s) off needs at least {len(fractions) + 1} per class.")
    parts = []
    for fraction in fractions:
        size = math.ceil(round(fraction * num_items, 6))  # 0.7 * 10 is 7.000000000000001 in floats: 7, not 8
        try:
            rest, part = train_test_split(rest, test_size=size, random_state=seed,
                                          stratify=None if labels is None else labels[rest])
        except ValueError as error:  # too few items for the split, or fewer split items than classes
            raise UserError(f"cannot cut {size} of the {num_items} images of {what} off as a split: {error}; "
                            "change data.val_fraction / data.test_fraction.") from None
        parts.append(np.sort(part))
    return [np.sort(rest), *parts]


def cut_note(cuts: dict[str, float], source: str, seed: int, stratified: bool) -> str:
    """How :func:`cut_splits` made the missing splits, for the run's log: ``"cut val (15 %) and test (15 %) from
    the images, stratified by class, seed 42"``."""
    parts = " and ".join(f"{split} ({100 * fraction:g} %)" for split, fraction in cuts.items())
    return f"cut {parts} from {source}{', stratified by class' if stratified else ''}, seed {seed}"


# ------------------------------------------------------------------------------------------------- detection
def letterbox_geometry(height: int, width: int, size: int) -> tuple[float, int, int, int, int]:
    """``(scale, new_height, new_width, pad_left, pad_top)`` that fit an image into a ``size`` square."""
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, new_height, new_width, (size - new_width) // 2, (size - new_height) // 2


class Annotation(NamedTuple):
    """The annotation of one detection image, without its pixels: ``boxes`` Tensor[N, 4] xyxy, ``labels``
    Tensor[N], and the image's ``height`` and ``width``."""

    boxes: Tensor
    labels: Tensor
    height: int
    width: int


class DetectionDataset(Dataset):
    """Base of every detection dataset: subclasses implement ``__len__`` and :meth:`load`.

    Item (the detection contract): ``(Tensor[3, H, W] float in [0, 1],
    dict(boxes=Tensor[N, 4] float32 xyxy, labels=Tensor[N] int64 in [0, num_classes), image_id=int))``.
    ``transforms`` is a v2 transform called as ``transforms(image, target)`` on a uint8 ``tv_tensors.Image`` and
    a target whose boxes are ``tv_tensors.BoundingBoxes``; the item is converted to float afterwards.

    An item is asked for by its index, or by ``(epoch, index)``: the key the training loader hands datasets whose
    items change from epoch to epoch (the multi-image wrappers, which override :meth:`load_at`).
    """

    def __init__(self, class_names: Sequence[str], transforms: Callable | None = None):
        self.class_names = tuple(class_names)
        self.transforms = transforms
        self.problems: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(uint8 Tensor[3, H, W], float32 boxes Tensor[N, 4] xyxy, int64 labels Tensor[N], image_id)``."""
        raise NotImplementedError

    def load_at(self, index: int, epoch: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """:meth:`load` as seen in ``epoch``; the same in every epoch except for the multi-image wrappers."""
        return self.load(index)

    def annotation(self, index: int) -> Annotation:
        """The boxes, labels and image size of item ``index``; datasets that hold their annotations answer without
        decoding the image."""
        image, boxes, labels, _ = self.load(index)
        return Annotation(boxes, labels, int(image.shape[-2]), int(image.shape[-1]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, boxes, labels, image_id = self.load_at(index, epoch)
        image = tv_tensors.Image(image)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
            "labels": labels,
            "image_id": image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = F.to_dtype(image, torch.float32, scale=True).as_subclass(Tensor)
        return image, {
            "boxes": target["boxes"].as_subclass(Tensor).to(torch.float32),
            "labels": target["labels"].to(torch.int64),
            "image_id": int(image_id),
        }


class DetectionSubset(DetectionDataset):
    """The items ``indices`` of ``dataset`` with transforms of their own: a split cut from a file split, which
    needs the evaluation pipeline where its source has the training one. ``problems`` are the source's (the
    annotation problems of the whole file split)."""

    def __init__(self, dataset: DetectionDataset, indices: Sequence[int], transforms: Callable | None = None):
        super().__init__(dataset.class_names, transforms)
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.problems = dataset.problems

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        return self.dataset.load(self.indices[index])

    def annotation(self, index: int) -> Annotation:
        return self.dataset.annotation(self.indices[index])


# ------------------------------------------------------------------------------------------------- segmentation
class SegmentationDataset(Dataset):
    """Base of every segmentation dataset: subclasses implement ``__len__`` and :meth:`load`.

    Item (the segmentation contract): ``(Tensor[3, H, W] float in [0, 1], Tensor[H, W] int64)``, the mask holding
    class indices ``0..num_classes - 1`` (0: background, a class like the others) and :data:`IGNORE_INDEX` where
    the truth is unknown. ``transforms`` is a v2 transform called as ``transforms(image, mask)`` on a uint8
    ``tv_tensors.Image`` and a uint8 ``tv_tensors.Mask``; the item is converted afterwards.
    """

    def __init__(self, class_names: Sequence[str], transforms: Callable | None = None):
        self.class_names = tuple(class_names)
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """``(uint8 Tensor[3, H, W], uint8 Tensor[H, W] class indices)``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(index)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return (F.to_dtype(image, torch.float32, scale=True).as_subclass(Tensor),
                mask.as_subclass(Tensor).to(torch.int64))


# ------------------------------------------------------------------------------------------------- datamodule
class SplitDataModule(pl.LightningDataModule):
    """What every datamodule shares: ``train_set``, ``val_set`` and ``test_set`` (set by :meth:`setup`), their
    loaders, the ``sampler`` plug-in, ``info`` and the saved state of the training loader's generator.

    Subclasses implement :meth:`read` (build the three splits, and for data read from files set :attr:`files`) and
    :meth:`describe` (the :class:`DataInfo`), and state what their training set can tell a sampler
    (:attr:`sampler_inputs`, offered by :meth:`sampler_values`).

    ``sampler``: a ``_target_`` config (the ``sampler`` group, a plain dict); built by
    :func:`~cvlab.utils.plugins.instantiate_plugin` with those of the sampler inputs its signature names.
    None, or a config without ``_target_``, is the uniform epoch-seeded shuffle.
    """

    collate_fn: Callable | None = None
    # What the training set offers a sampler (the keys of sampler_values()).
    sampler_inputs: tuple[str, ...] = ("num_samples", "num_classes", "class_counts", "seed")
    kind = "this"  # the kind of data, for messages ("detection data does not provide labels")

    def __init__(self, *, batch_size: int, num_workers: int, seed: int, sampler: dict | None,
                 val_fraction: float, test_fraction: float):
        super().__init__()
        check_fractions(val_fraction, test_fraction)
        self.sampler_config = plain_config(sampler)
        missing = missing_arguments(self.sampler_config, self.sampler_inputs)
        if missing:
            raise UserError(f"sampler={self.sampler_config.get('name', self.sampler_config['_target_'])} needs "
                            f"{', '.join(missing)}, which {self.kind} data does not provide; leave sampler=none "
                            "(`cvlab list sampler`).")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.order_seed = seed
        self.loader_generator = torch.Generator().manual_seed(seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # split -> the image files it holds, relative to data.root (set by read() for data read from files)
        self.files: dict[str, list[str]] = {}

    def seed_order(self, seed: int) -> None:
        """Draws the training order (the sampler, the training loader's generator) from ``seed``; the splits stay
        those of ``self.seed`` (``data.seed``), so a run's seed can vary the order on a fixed split."""
        self.order_seed = seed
        self.loader_generator.manual_seed(seed)

    # ------------------------------------------------------------------------------------------ subclasses
    def read(self) -> None:
        """Sets ``train_set``, ``val_set`` and ``test_set``."""
        raise NotImplementedError

    def describe(self) -> DataInfo:
        raise NotImplementedError

    def sampler_values(self) -> dict[str, Any]:
        """The values of :attr:`sampler_inputs` for the training set."""
        info = self.describe()
        return {"num_samples": len(self.train_set), "num_classes": info.num_classes,
                "class_counts": list(info.class_counts), "seed": self.order_seed}

    def training_view(self) -> tuple[Dataset, bool]:
        """The dataset the training loader iterates, and whether its items change per epoch (it is then asked for
        ``(epoch, index)`` keys)."""
        return self.train_set, False

    # ------------------------------------------------------------------------------------------ shared
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.read()

    @property
    def info(self) -> DataInfo:
        """What a model needs to know about the data (reads it on first use)."""
        self.setup()
        return self.describe()

    def split_files(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``: the image files of each split, relative to
        ``data.root`` and in the split's order (``"cat/img_3.png"``), whether the files ship the split or it was cut
        here. ``{}`` for generated and embedded data: their splits follow from the seed and the fractions, which
        ``.hydra/config.yaml`` records. Reads the data on first use."""
        self.setup()
        return {split: list(names) for split, names in self.files.items()}

    def write_split_files(self, directory: str | Path) -> list[Path]:
        """Writes :meth:`split_files` as ``directory/<split>.txt``, one file name a line (the run directory's
        ``splits/``); returns the files written, none for data without files."""
        directory = Path(directory)
        written = []
        for split, names in self.split_files().items():
            directory.mkdir(parents=True, exist_ok=True)
            written.append(directory / f"{split}.txt")
            written[-1].write_text("".join(f"{name}\n" for name in names))
        return written

    @staticmethod
    def note(message: str) -> None:
        """A one-line note for the run's log (how the splits were made)."""
        log.info(message)

    @staticmethod
    def check_num_classes(name: str, expected: int | None, class_names: Sequence[str]) -> None:
        if expected is not None and expected != len(class_names):
            raise UserError(f"{name}: data.num_classes={expected} but the data has {len(class_names)} classes "
                            f"{tuple(class_names)}; set data.num_classes=null or fix it")

    def train_dataloader(self) -> DataLoader:
        dataset, keyed_by_epoch = self.training_view()
        sampler = instantiate_plugin(self.sampler_config, **self.sampler_values())
        if sampler is None:
            sampler = EpochShuffleSampler(len(self.train_set), self.order_seed)
        if keyed_by_epoch:
            sampler = EpochKeyedSampler(sampler)
        # A last batch of one sample would break BatchNorm; tiny sets keep every sample.
        return self._loader(dataset, sampler=sampler, generator=self.loader_generator,
                            drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.test_set)

    def _evaluation_loader(self, dataset: Dataset) -> DataLoader:
        # Its own generator so that iterating it never draws from the global RNG.
        return self._loader(dataset, generator=torch.Generator().manual_seed(self.seed))

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=self.collate_fn,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def state_dict(self) -> dict:
        return {"loader_generator": self.loader_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loader_generator.set_state(state["loader_generator"])
