"""Classification data: the embedded sets (scikit-learn's digits, procedural shapes, synthetic tensors), a folder
of class sub-folders, and torchvision's CIFAR/MNIST loaders, behind one LightningDataModule.

Every source gives a train, a validation and a test split. Files that ship splits keep theirs (``train/``,
``val/``, ``test/`` folders; torchvision's official test split); the missing ones are cut from the training
images, seeded and stratified by class (``data.val_fraction`` / ``data.test_fraction``, 15 % each by default),
and the run's log says so. The generated sets draw their three splits from the seed.

Transforms are torchvision.transforms.v2. Training order comes from the ``sampler`` plug-in (epoch-seeded, see
``cvlab.data.samplers``) and the loaders carry their own generators, saved with the checkpoint, so a resumed run
sees exactly the batches an uninterrupted one would.

Class imbalance (:mod:`cvlab.data.imbalance`): ``data.imbalance_ratio`` thins the training split to a long tail
(the validation and test splits stay the source's), and the imbalanced-learn samplers (``sampler=smote``...)
replace the training set by its resampled view when the data is read; ``data.normal_classes`` keeps only those
classes' training images (task=anomaly). Two-image augmentation (mixup, CutMix, SamplePairing:
:mod:`cvlab.data.mixing`) wraps the training set.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from cvlab.data.base import IMAGE_EXTENSIONS, DataInfo, SplitDataModule, cut_note, cut_splits
from cvlab.data.imbalance import (
    Resampler,
    check_imbalance,
    check_normal_classes,
    check_resampling,
    is_resampler,
    long_tail_indices,
    normal_labels,
    vector_budget,
)
from cvlab.data.mixing import CutMixImages, MixupImages, SamplePairingImages
from cvlab.data.shapes import SHAPE_CLASSES, ShapesClassification
from cvlab.utils.errors import UserError
from cvlab.utils.images import check_images, open_image
from cvlab.utils.plugins import instantiate_plugin, plain_config
from cvlab.utils.validate import check_image_size, check_loader, check_number, check_probability

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Per-channel normalisation; generic (0.5, 0.25) where a dataset has no published statistics.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3053,), (0.3761,)),  # measured on the 1,797 images scaled to [0, 1]
}


@dataclass
class Split:
    """What a source reads: the three splits (images not yet transformed), the training labels, the class names,
    how the splits were made (for the log), the files it skipped and, for image files, each split's files relative
    to the root."""

    train: Dataset
    val: Dataset
    test: Dataset
    train_labels: list[int]
    class_names: list[str]
    note: str
    problems: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each (image, label) pair of ``base``."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


class TensorImages(Dataset):
    """Images already in memory as Tensor[N, C, H, W] (float in [0, 1]) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


class SyntheticImages(Dataset):
    """Random images and labels generated per index from a seed: any size, no memory held (for throughput runs)."""

    def __init__(self, size: int, image_size: int, in_chans: int, num_classes: int, seed: int):
        self.size, self.shape, self.num_classes, self.seed = size, (in_chans, image_size, image_size), num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.rand(self.shape, generator=g), int(torch.randint(self.num_classes, (), generator=g))


def _digits(dm: "ClassificationDataModule") -> Split:
    from sklearn.datasets import load_digits

    hp = dm.hparams
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    fractions = {"val": hp.val_fraction, "test": hp.test_fraction}
    train_idx, val_idx, test_idx = cut_splits(len(labels), list(fractions.values()), hp.seed, digits.target,
                                              what="digits")
    data = TensorImages(images, labels)
    return Split(Subset(data, train_idx), Subset(data, val_idx), Subset(data, test_idx), labels[train_idx].tolist(),
                 [str(d) for d in range(10)], "ships no splits: " + cut_note(fractions, "the 1,797 images", hp.seed,
                                                                            stratified=True))


def _shapes(dm: "ClassificationDataModule") -> Split:
    hp = dm.hparams
    sizes = {"train": hp.train_size, "val": hp.val_size, "test": hp.test_size or hp.val_size}
    train, val, test = (ShapesClassification(split, sizes[split], size=hp.image_size, seed=hp.seed) for split in SPLITS)
    return Split(train, val, test, list(train.targets), list(SHAPE_CLASSES), f"three splits drawn from seed {hp.seed}")


def _synthetic(dm: "ClassificationDataModule") -> Split:
    hp = dm.hparams
    train, val, test = (SyntheticImages(size, hp.image_size, hp.in_chans, hp.num_classes, hp.seed + offset)
                        for offset, size in enumerate((hp.train_size, hp.val_size, hp.test_size or hp.val_size)))
    return Split(train, val, test, [train[i][1] for i in range(len(train))],
                 [str(c) for c in range(hp.num_classes)], f"three splits drawn from seeds {hp.seed}..{hp.seed + 2}")


def _cut_from_training(samples: dict[str, list], labels: list[int], missing: list[str], dm: "ClassificationDataModule",
                       class_names: list[str], what: str) -> str:
    """Moves the ``missing`` splits (val, test) out of ``samples["train"]`` (stratified by ``labels``, in place);
    returns how, for the log."""
    fractions = {split: getattr(dm.hparams, f"{split}_fraction") for split in missing}
    pool = samples["train"]
    rest, *parts = cut_splits(len(pool), list(fractions.values()), dm.hparams.seed, labels, class_names, what)
    samples["train"] = [pool[i] for i in rest]
    for split, part in zip(missing, parts):
        samples[split] = [pool[i] for i in part]
    return cut_note(fractions, f"the {len(pool)} training images", dm.hparams.seed, stratified=True)



def _find_images(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` of every image below ``folder``'s class sub-folders, and the class names (sorted)."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return samples, classes


def _readable(samples: list[tuple[str, int]], max_pixels: int | None) -> tuple[list[tuple[str, int]], list[str]]:
    """Keeps the images that decode to the end within ``max_pixels`` pixels (checked once, cached: see
    :func:`~cvlab.utils.images.check_images`); the others are returned as problems, by path."""
    checks = check_images([path for path, _ in samples], max_pixels)
    good = [(path, label) for path, label in samples if checks[Path(path)].problem is None]
    problems = [f"{path}: image {checks[Path(path)].problem}" for path, _ in samples if checks[Path(path)].problem]
    return good, problems


class FolderImages(Dataset):
    """``(PIL image in mode, label)`` of image files (16-bit greyscale scaled to 8 bits, see
    :func:`~cvlab.utils.images.open_image`)."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, max_pixels: int | None = None):
        self.samples, self.mode, self.max_pixels = samples, mode, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return open_image(path, self.mode, self.max_pixels), label


# Folder names a validation split ships under: ImageFolder's val/, Roboflow's valid/, Keras' validation/.
_VAL_FOLDERS = ("val", "valid", "validation")


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders beside ``root/train`` (none without it): ``{"train": ..., "val": ..., "test": ...}``."""
    if not (root / "train").is_dir():
        return {}
    candidates = {"train": ("train",), "val": _VAL_FOLDERS, "test": ("test",)}
    folders = {split: next((root / name for name in names if (root / name).is_dir()), None)
               for split, names in candidates.items()}
    return {split: folder for split, folder in folders.items() if folder is not None}


def _imagefolder(dm: "ClassificationDataModule") -> Split:
    hp = dm.hparams
    root = Path(str(hp.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {str(root)!r} is not a folder; point data.root= at a folder of class sub-folders.")
    mode = "L" if hp.in_chans == 1 else "RGB"
    max_pixels = hp.max_image_pixels
    shipped = _split_folders(root)
    if len(shipped) > 1:  # train/ beside val/ or test/: split folders of class folders
        samples, classes = _find_images(shipped["train"])
        samples = {"train": samples}
        for split, folder in list(shipped.items())[1:]:
            samples[split], split_classes = _find_images(folder)
            if split_classes != classes:
                raise UserError(f"{shipped['train']} and {folder} hold different class folders: "
                                f"{classes} vs {split_classes}.")
    else:
        samples, classes = _find_images(root)
        samples = {"train": samples}
    if not classes or not samples["train"]:
        raise UserError(f"no images found under {root}: expected one sub-folder per class holding "
                        f"{', '.join(IMAGE_EXTENSIONS[:4])}... files.")
    problems: list[str] = []
    for split in list(samples):
        samples[split], unreadable = _readable(samples[split], max_pixels)
        problems += unreadable
        if not samples[split] and split != "train":
            del samples[split]  # an empty split folder ships nothing: the split is cut instead
    if not samples["train"]:
        raise UserError(f"none of the images under {root} could be read: {problems[0]}")
    given = " and ".join(f"{shipped[split].name}/" for split in samples) if len(shipped) > 1 else "no split folders"
    missing = [split for split in ("val", "test") if split not in samples]
    note = f"{given}: " + (_cut_from_training(samples, [label for _, label in samples["train"]], missing, dm, classes,
                                              str(root)) if missing else "the folders are the splits")
    files = {split: [Path(path).relative_to(root).as_posix() for path, _ in samples[split]] for split in SPLITS}
    return Split(*(FolderImages(samples[split], mode, max_pixels) for split in SPLITS),
                 [label for _, label in samples["train"]], classes, note, problems, files)


def _torchvision(dm: "ClassificationDataModule") -> Split:
    from torchvision import datasets

    hp = dm.hparams
    dataset_class = {
        "cifar10": _present_only(datasets.CIFAR10), "cifar100": _present_only(datasets.CIFAR100),
        "mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
    }[hp.source]
    root = str(Path(str(hp.root)).expanduser())
    try:
        train = dataset_class(root, train=True, download=hp.download)
        test = dataset_class(root, train=False, download=hp.download)
    except (RuntimeError, OSError) as error:
        raise UserError(f"{hp.source} is not in {root} and could not be fetched ({str(error).splitlines()[0]}); "
                        f"go online once, or copy the files there and pass data.root=.") from None
    native_chans = 3 if hp.source.startswith("cifar") else 1
    if hp.in_chans != native_chans:
        raise UserError(f"{hp.source} images have {native_chans} channel(s); leave data.in_chans={native_chans}.")
    labels = [int(t) for t in train.targets]
    train_idx, val_idx = cut_splits(len(labels), [hp.val_fraction], hp.seed, labels, list(train.classes), hp.source)
    note = "the official test split is the test set; " + cut_note(
        {"val": hp.val_fraction}, "the official training split", hp.seed, stratified=True)
    return Split(Subset(train, train_idx), Subset(train, val_idx), test, [labels[i] for i in train_idx],
                 list(train.classes), note)


def _present_only(dataset_class):
    """CIFAR loaders that accept files present on disk without their md5 check (which only guards downloads)."""

    class Present(dataset_class):
        meta = {**dataset_class.meta, "md5": None}  # check_integrity(path, None) only tests that the file exists

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / name).is_file()
                       for name, _ in self.train_list + self.test_list)

    Present.__name__ = dataset_class.__name__
    return Present


_SOURCES: dict[str, Callable[["ClassificationDataModule"], Split]] = {
    "digits": _digits,
    "shapes": _shapes,
    "synthetic": _synthetic,
    "imagefolder": _imagefolder,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "mnist": _torchvision,
    "fashion_mnist": _torchvision,
}

# Sources whose images are mirror-symmetric in meaning; flipping a digit would change it.
_FLIPPABLE = {"shapes", "imagefolder", "cifar10", "cifar100"}


# What a source fixes: its images' channels and its number of classes (None: counted, or set by data.num_classes).
_CHANNELS = {"digits": (1,), "mnist": (1,), "fashion_mnist": (1,), "shapes": (3,), "cifar10": (3,), "cifar100": (3,),
             "imagefolder": (3, 1)}
_CLASSES = {"digits": 10, "shapes": len(SHAPE_CLASSES), "mnist": 10, "fashion_mnist": 10, "cifar10": 10,
            "cifar100": 100}
_DRAWN = ("shapes", "synthetic")  # generated from the seed, sized by train_size / val_size / test_size
_MAX_CHANNELS = 64


def _check_arguments(source: str, name: str, root, image_size, in_chans, num_classes, batch_size, num_workers,
                     sizes, max_image_pixels) -> None:
    """The datamodule's arguments, checked before anything is read (one line each, naming the data.* key)."""
    if source not in _SOURCES:
        raise UserError(f"unknown data source {source!r}; choose one of {', '.join(_SOURCES)}.")
    check_loader(batch_size, num_workers)
    check_image_size("data.image_size", image_size)
    check_number("data.in_chans", in_chans, 1, _MAX_CHANNELS, integer=True)
    if source in _CHANNELS and in_chans not in _CHANNELS[source]:
        allowed = " or ".join(map(str, _CHANNELS[source]))
        raise UserError(f"data.in_chans={in_chans} but {name} images have {allowed} "
                        f"channel{'' if allowed == '1' else 's'}; leave data.in_chans={_CHANNELS[source][0]}.")
    check_number("data.num_classes", num_classes, 1, integer=True, optional=source != "synthetic")
    if source in _CLASSES and num_classes is not None and num_classes != _CLASSES[source]:
        raise UserError(f"{name}: data.num_classes={num_classes} but the data has {_CLASSES[source]} classes; "
                        f"leave data.num_classes={_CLASSES[source]} (or null).")
    if source in _DRAWN:
        for key, size in zip(("train_size", "val_size", "test_size"), sizes):
            check_number(f"data.{key}", size, 1, integer=True, optional=key == "test_size")
    check_number("data.max_image_pixels", max_image_pixels, 1, integer=True, optional=True)
    if max_image_pixels is not None and source != "imagefolder":
        raise UserError(f"data.max_image_pixels limits image files; {name} reads none, leave it null.")
    if source == "imagefolder" and not (root and Path(str(root)).expanduser().is_dir()):
        raise UserError(f"data.root {str(root)!r} is not a folder; point data.root= at a folder of class "
                        "sub-folders (or of train/, val/, test/ folders of them).")


# Single-image augmentation settings beyond crop and flip; like those they act only with data.augment=true.
_AUGMENT_SETTINGS = ("rotate", "color_jitter", "noise", "erasing")
# SamplePairing's schedule (start, on, off, stop epochs) and its default, the paper's CIFAR one.
_PAIRING_KEYS = ("pairing_start", "pairing_on", "pairing_off", "pairing_stop")
_PAIRING_SCHEDULE = (100, 8, 2, None)


def _check_augmentation(augment, rotate, color_jitter, noise, erasing, mixup_alpha, cutmix_alpha, sample_pairing,
                        pairing: tuple) -> None:
    """The augmentation settings, checked with the other arguments (one line each, naming the data.* key)."""
    check_number("data.rotate", rotate, 0, 180, hint=" (degrees: a random rotation within ±rotate)")
    check_number("data.color_jitter", color_jitter, 0, 1)
    check_number("data.noise", noise, 0, hint=" (the standard deviation of Gaussian pixel noise, on [0, 1] pixels)")
    check_probability("data.erasing", erasing)
    given = {key: value for key, value in zip(_AUGMENT_SETTINGS, (rotate, color_jitter, noise, erasing)) if value}
    if given and not augment:
        raise UserError(f"data.{next(iter(given))} acts only with data.augment=true (which adds the random crop).")
    check_number("data.mixup_alpha", mixup_alpha, 0, hint=" (0: off; the paper's 0.2 on ImageNet, 1 on CIFAR)")
    check_number("data.cutmix_alpha", cutmix_alpha, 0, hint=" (0: off; the paper's 1)")
    if not isinstance(sample_pairing, bool):
        raise UserError(f"data.sample_pairing is true or false, got {sample_pairing!r}.")
    mixing = [key for key, on in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha),
                                  ("sample_pairing", sample_pairing)) if on]
    if len(mixing) > 1:
        raise UserError(f"data.{mixing[0]} and data.{mixing[1]} both mix training images; choose one.")
    if not sample_pairing and pairing != _PAIRING_SCHEDULE:
        changed = next(key for key, value, default in zip(_PAIRING_KEYS, pairing, _PAIRING_SCHEDULE)
                       if value != default)
        raise UserError(f"data.{changed} is SamplePairing's schedule: add data.sample_pairing=true.")
    start, on, off, stop = pairing
    check_number("data.pairing_start", start, 0, integer=True)
    check_number("data.pairing_on", on, 1, integer=True)
    check_number("data.pairing_off", off, 0, integer=True)
    check_number("data.pairing_stop", stop, start, integer=True, optional=True,
                 hint=" (the epoch SamplePairing stops for good, at or after data.pairing_start)")


class ClassificationDataModule(SplitDataModule):
    """One datamodule for every classification source (``source=``: digits, shapes, synthetic, imagefolder,
    cifar10, cifar100, mnist, fashion_mnist).

    After :meth:`setup`: ``train_set``, ``val_set``, ``test_set`` (items ``(Tensor[C, H, W] normalised, int)``),
    ``train_labels``, ``class_names``, ``problems`` (files skipped) and ``info`` (a :class:`DataInfo` whose
    ``class_counts`` count the training images per class). ``val_fraction`` / ``test_fraction`` are the shares
    cut when the files ship no such split (of all images, or of the training split when only it ships);
    ``train_size`` / ``val_size`` / ``test_size`` size the generated sets (``test_size`` None: ``val_size``).
    ``sampler`` is the ``sampler`` group's config; it is offered ``labels``, ``class_counts``, ``num_classes``,
    ``num_samples`` and ``seed``. ``max_image_pixels`` (imagefolder) skips larger image files as decompression
    bombs (None: PIL's limit). ``in_chans`` None is the source's own (1 for digits and MNIST, else 3). Every
    argument is checked here, before anything is read: a source's fixed channels and class count refuse other
    values.

    Class imbalance: ``imbalance_ratio`` ρ (None: off) keeps a long-tailed view of the training split,
    ``imbalance_profile`` ``exp`` or ``step`` (:mod:`cvlab.data.imbalance`), drawn from ``seed``; ``train_labels``
    and ``info.class_counts`` are the view's. A ``sampler`` that resamples (imbalanced-learn's, a
    :class:`~cvlab.data.imbalance.Resampler`) makes ``train_set`` the resampled set when the data is read, from the
    run's seed (:meth:`seed_order`), with ``resampled_labels`` its labels; the loader then shuffles it uniformly.
    The counts the losses see stay those of the data, before resampling. ``normal_classes`` (a class index or name,
    or a list of them; None: off) keeps only those classes' training images, after the long tail, for
    ``task=anomaly``; ``normal_labels`` are their labels (sorted; None when off), and the validation and test splits
    keep every class.

    Augmentation of the training split: ``augment`` (a random crop, and a flip for sources whose images may be
    mirrored) with, on top, ``rotate`` (degrees), ``color_jitter`` (brightness, contrast, saturation; hue a
    quarter of it), ``noise`` (Gaussian, standard deviation on [0, 1] pixels) and ``erasing`` (the probability of
    random erasing, Zhong et al. 2020), all torchvision.transforms.v2; and one of the two-image methods
    (:mod:`cvlab.data.mixing`): ``mixup_alpha``, ``cutmix_alpha`` (0: off) or ``sample_pairing`` on the schedule
    ``pairing_start``, ``pairing_on``, ``pairing_off``, ``pairing_stop`` (epochs).
    """

    kind = "classification"
    sampler_inputs = ("labels", *SplitDataModule.sampler_inputs)

    def __init__(
        self,
        source: str,
        name: str | None = None,
        root: str | None = None,
        image_size: int = 32,
        in_chans: int | None = None,
        num_classes: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = False,
        download: bool = False,
        train_size: int = 1000,
        val_size: int = 200,
        test_size: int | None = None,
        sampler: dict | None = None,
        seed: int = 42,
        max_image_pixels: int | None = None,
        imbalance_ratio: float | None = None,
        imbalance_profile: str = "exp",
        rotate: float = 0.0,
        color_jitter: float = 0.0,
        noise: float = 0.0,
        erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        sample_pairing: bool = False,
        pairing_start: int = 100,
        pairing_on: int = 8,
        pairing_off: int = 2,
        pairing_stop: int | None = None,
        normal_classes: int | str | Sequence[int | str] | None = None,
    ):
        if in_chans is None:  # before save_hyperparameters, which records it
            in_chans = _CHANNELS.get(source, (3,))[0]
        _check_arguments(source, name or source, root, image_size, in_chans, num_classes, batch_size, num_workers,
                         (train_size, val_size, test_size), max_image_pixels)
        check_imbalance(imbalance_ratio, imbalance_profile)
        check_normal_classes(normal_classes)
        _check_augmentation(augment, rotate, color_jitter, noise, erasing, mixup_alpha, cutmix_alpha, sample_pairing,
                            (pairing_start, pairing_on, pairing_off, pairing_stop))
        sampler = plain_config(sampler)  # before save_hyperparameters: checkpoints hold plain python only
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, sampler=sampler,
                         val_fraction=val_fraction, test_fraction=test_fraction)
        self.save_hyperparameters()
        # imbalanced-learn's samplers change the training set itself (read()); the loader then shuffles it uniformly.
        self.resampling: dict | None = None
        if is_resampler(self.sampler_config):
            check_resampling(self.sampler_config)
            self.resampling, self.sampler_config = self.sampler_config, None
        self.train_labels: list[int] = []
        self.resampled_labels: list[int] | None = None
        self.normal_labels: list[int] | None = None
        self.class_names: list[str] = []
        self.problems: list[str] = []

    def read(self) -> None:
        hp = self.hparams
        split = _SOURCES[hp.source](self)
        for problem in split.problems:
            log.warning("skipped %s", problem)
        if split.problems:
            log.warning("%d file(s) skipped in %s", len(split.problems), hp.root)
        self.check_num_classes(hp.name or hp.source, hp.num_classes, split.class_names)
        if hp.imbalance_ratio is not None:
            self._long_tail(split)
        if hp.normal_classes is not None:
            self._normal_only(split)
        mean, std = _STATS.get(hp.source, ((0.5,) * hp.in_chans, (0.25,) * hp.in_chans))
        evaluation = self._transform(train=False, mean=mean, std=std)
        self.train_labels, self.class_names, self.problems = split.train_labels, split.class_names, split.problems
        self.note(f"data {hp.name or hp.source}: {split.note}; {len(split.train)} / {len(split.val)} / "
                  f"{len(split.test)} train / val / test images")
        train = self._resampled(split.train) if self.resampling else split.train
        self.train_set = TransformedDataset(train, self._transform(train=True, mean=mean, std=std))
        self.val_set = TransformedDataset(split.val, evaluation)
        self.test_set = TransformedDataset(split.test, evaluation)
        self.files = split.files

    def _long_tail(self, split: Split) -> None:
        """Thins ``split``'s training part to its long-tailed view (in place), keeping its files in step."""
        hp = self.hparams
        kept, counts = long_tail_indices(split.train_labels, len(split.class_names), hp.imbalance_ratio,
                                         hp.imbalance_profile, hp.seed, split.class_names)
        split.train = Subset(split.train, kept.tolist())
        split.train_labels = [split.train_labels[i] for i in kept]
        if split.files.get("train"):
            split.files["train"] = [split.files["train"][i] for i in kept]
        split.note += (f"; long-tailed training view, {hp.imbalance_profile} profile, ρ = {hp.imbalance_ratio:g}: "
                       f"{', '.join(map(str, counts))} images per class, seed {hp.seed}")

    def _normal_only(self, split: Split) -> None:
        """Keeps the training images of the normal classes (in place), with their files."""
        self.normal_labels = normal_labels(self.hparams.normal_classes, split.class_names)
        kept = [i for i, label in enumerate(split.train_labels) if label in self.normal_labels]
        split.train = Subset(split.train, kept)
        split.train_labels = [split.train_labels[i] for i in kept]
        if split.files.get("train"):
            split.files["train"] = [split.files["train"][i] for i in kept]
        names = ", ".join(split.class_names[label] for label in self.normal_labels)
        split.note += (f"; normal classes {names} (data.normal_classes): the training split keeps their {len(kept)} "
                       "images, val and test keep every class")

    def _resampled(self, train: Dataset) -> Dataset:
        """The training images resampled by the imbalanced-learn sampler (:class:`Resampler`)."""
        resampler: Resampler = instantiate_plugin(self.resampling, labels=self.train_labels, seed=self.order_seed)
        if resampler.space == "features":  # `cvlab train` runs it as stages whose data has no sampler
            raise UserError(f"sampler={resampler.method} sampler.space=features re-trains a trained classifier's head "
                            "on resampled embeddings, a pipeline of `cvlab train`; here the training images are read "
                            "as they are: use sampler.space=pixels or sampler=none.")
        pixels = self._transform(train=False, normalise=False)

        def images() -> torch.Tensor:
            shape = (self.hparams.in_chans, self.hparams.image_size, self.hparams.image_size)
            vector_budget(len(train), shape, resampler.method)
            return torch.stack([pixels(image) for image, _ in train]).as_subclass(torch.Tensor)

        resampled = resampler.view(train, images)
        self.resampled_labels = resampled.labels
        counts = np.bincount(resampled.labels, minlength=len(self.class_names))
        lowered = f"; {resampler.lowered}" if resampler.lowered else ""
        self.note(f"sampler {resampler.method} (imbalanced-learn, seed {resampler.seed}{lowered}): {len(train)} -> "
                  f"{len(resampled.labels)} training images, {', '.join(map(str, counts))} per class")
        before = np.bincount(self.train_labels, minlength=len(self.class_names))
        emptied = [self.class_names[label] for label in np.flatnonzero((counts == 0) & (before > 0))]
        if emptied:  # the cleaning methods (ENN) may remove a small class entirely
            log.warning("sampler %s left no training image of class %s", resampler.method, ", ".join(emptied))
        return resampled.dataset

    def _transform(self, train: bool, mean=(), std=(), normalise: bool = True) -> v2.Compose:
        """The pipeline of the training or evaluation images; without ``normalise``, pixels in [0, 1]."""
        hp = self.hparams
        size = hp.image_size
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True)]
        if train and hp.augment:
            steps.append(v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
            if hp.source in _FLIPPABLE:
                steps.append(v2.RandomHorizontalFlip())
            if hp.rotate:
                steps.append(v2.RandomRotation(hp.rotate))
            if hp.color_jitter:
                jitter = hp.color_jitter
                steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4))
            if hp.noise:
                steps.append(v2.GaussianNoise(sigma=hp.noise))  # on [0, 1] pixels, clipped back to them
        if normalise:
            steps.append(v2.Normalize(mean, std))
        if train and hp.augment and hp.erasing:
            steps.append(v2.RandomErasing(hp.erasing))  # after Normalize: erased pixels read 0, the mean
        return v2.Compose(steps)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images through the evaluation transform (no augmentation), in order, batched as evaluation
        is: what a model fits an estimator without gradients to (task=anomaly's isolation_forest, one_class_svm)."""
        return self._evaluation_loader(TransformedDataset(self.train_set.base, self.val_set.transform))

    def training_view(self) -> tuple[Dataset, bool]:
        """The training set, wrapped by the chosen two-image augmentation (asked for ``(epoch, index)`` keys)."""
        hp = self.hparams
        if hp.mixup_alpha:
            return MixupImages(self.train_set, len(self.class_names), hp.mixup_alpha, self.order_seed), True
        if hp.cutmix_alpha:
            return CutMixImages(self.train_set, len(self.class_names), hp.cutmix_alpha, self.order_seed), True
        if hp.sample_pairing:
            begin = f"off for epochs 0-{hp.pairing_start - 1}, then " if hp.pairing_start else ""
            stop = f", off for good from epoch {hp.pairing_stop}" if hp.pairing_stop is not None else ""
            self.note(f"SamplePairing: {begin}{hp.pairing_on} epochs on and {hp.pairing_off} off in turn{stop}")
            return SamplePairingImages(self.train_set, hp.pairing_start, hp.pairing_on, hp.pairing_off,
                                       hp.pairing_stop, self.order_seed), True
        return self.train_set, False

    def describe(self) -> DataInfo:
        labels = np.asarray(self.train_labels, dtype=np.int64)
        counts = np.bincount(labels[labels >= 0], minlength=len(self.class_names))  # withheld labels are < 0
        return DataInfo(num_classes=len(self.class_names), class_names=self.class_names,
                        in_chans=self.hparams.in_chans, image_size=self.hparams.image_size,
                        class_counts=counts.tolist())

    def sampler_values(self) -> dict[str, Any]:
        return {**super().sampler_values(), "labels": list(self.train_labels)}
