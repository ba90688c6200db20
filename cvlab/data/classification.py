"""Classification data: the embedded sets (scikit-learn's digits, procedural shapes, synthetic tensors), a folder
of class sub-folders, and torchvision's CIFAR/MNIST loaders, behind one LightningDataModule.

Transforms are torchvision.transforms.v2. Training order comes from the epoch-seeded samplers in
``cvlab.data.samplers`` and the loaders carry their own generators, saved with the checkpoint, so a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from cvlab.data.samplers import build_sampler
from cvlab.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

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
    train: Dataset
    val: Dataset
    train_labels: list[int]
    class_names: list[str]
    problems: list[str] = field(default_factory=list)


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


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)


def _digits(dm: "ClassificationDataModule") -> Split:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = _stratified_split(digits.target, dm.hparams.val_fraction, dm.hparams.seed)
    data = TensorImages(images, labels)
    return Split(Subset(data, train_idx), Subset(data, val_idx), labels[train_idx].tolist(),
                 [str(d) for d in range(10)])


def _shapes(dm: "ClassificationDataModule") -> Split:
    from cvlab.data.shapes import SHAPE_CLASSES, ShapesClassification

    hp = dm.hparams
    train = ShapesClassification("train", hp.train_size, size=hp.image_size, seed=hp.seed)
    val = ShapesClassification("val", hp.val_size, size=hp.image_size, seed=hp.seed)
    return Split(train, val, list(train.targets), list(SHAPE_CLASSES))


def _synthetic(dm: "ClassificationDataModule") -> Split:
    hp = dm.hparams
    train = SyntheticImages(hp.train_size, hp.image_size, hp.in_chans, hp.num_classes, hp.seed)
    val = SyntheticImages(hp.val_size, hp.image_size, hp.in_chans, hp.num_classes, hp.seed + 1)
    return Split(train, val, [train[i][1] for i in range(len(train))], [str(c) for c in range(hp.num_classes)])


def _find_images(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return samples, classes


def _readable(samples: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[str]]:
    """Keeps the images PIL can decode; the others are returned as problems, by path."""
    from PIL import Image

    good, problems = [], []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append((path, label))
        except Exception as error:  # PIL raises many types for a broken file
            problems.append(f"{path}: unreadable image ({type(error).__name__})")
    return good, problems


class FolderImages(Dataset):
    def __init__(self, samples: list[tuple[str, int]], mode: str):
        self.samples, self.mode = samples, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert(self.mode), label


def _imagefolder(dm: "ClassificationDataModule") -> Split:
    hp = dm.hparams
    root = Path(str(hp.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {str(root)!r} is not a folder; point data.root= at a folder of class sub-folders.")
    mode = "L" if hp.in_chans == 1 else "RGB"
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_samples, classes = _find_images(root / "train")
        val_samples, val_classes = _find_images(root / "val")
        if val_classes != classes:
            raise UserError(f"{root}/train and {root}/val hold different class folders: {classes} vs {val_classes}.")
    else:
        samples, classes = _find_images(root)
        train_samples, val_samples = samples, []
    if not classes or not train_samples:
        raise UserError(f"no images found under {root}: expected one sub-folder per class holding "
                        f"{', '.join(IMAGE_EXTENSIONS[:4])}... files.")
    train_samples, problems = _readable(train_samples)
    val_samples, val_problems = _readable(val_samples)
    problems += val_problems
    if not val_samples:
        if not train_samples:
            raise UserError(f"none of the images under {root} could be read: {problems[0]}")
        labels = np.array([label for _, label in train_samples])
        counts = np.bincount(labels, minlength=len(classes))
        if counts.min() < 2:
            raise UserError(f"class {classes[int(counts.argmin())]!r} under {root} has fewer than 2 readable images; "
                            "each class needs at least 2 to split off a validation set.")
        train_idx, val_idx = _stratified_split(labels, hp.val_fraction or 0.2, hp.seed)
        train_samples, val_samples = [train_samples[i] for i in train_idx], [train_samples[i] for i in val_idx]
    return Split(FolderImages(train_samples, mode), FolderImages(val_samples, mode),
                 [label for _, label in train_samples], classes, problems)


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
        val = dataset_class(root, train=False, download=hp.download)
    except (RuntimeError, OSError) as error:
        raise UserError(f"{hp.source} is not in {root} and could not be fetched ({str(error).splitlines()[0]}); "
                        f"go online once, or copy the files there and pass data.root=.") from None
    native_chans = 3 if hp.source.startswith("cifar") else 1
    if hp.in_chans != native_chans:
        raise UserError(f"{hp.source} images have {native_chans} channel(s); leave data.in_chans={native_chans}.")
    return Split(train, val, [int(t) for t in train.targets], list(train.classes))


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


class ClassificationDataModule(pl.LightningDataModule):
    """One datamodule for every classification source (``source=``: digits, shapes, synthetic, imagefolder,
    cifar10, cifar100, mnist, fashion_mnist). ``info`` gives num_classes, in_chans, image_size, class_names."""

    def __init__(
        self,
        source: str,
        name: str | None = None,
        root: str | None = None,
        image_size: int = 32,
        in_chans: int = 3,
        num_classes: int | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = False,
        download: bool = False,
        train_size: int = 1000,
        val_size: int = 200,
        sampler: str = "none",
        seed: int = 42,
    ):
        super().__init__()
        if source not in _SOURCES:
            raise UserError(f"unknown data source {source!r}; choose one of {', '.join(_SOURCES)}.")
        self.save_hyperparameters()
        self.split: Split | None = None
        self.loader_generator = torch.Generator().manual_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        split = _SOURCES[self.hparams.source](self)
        for problem in split.problems:
            log.warning("skipped %s", problem)
        if split.problems:
            log.warning("%d file(s) skipped in %s", len(split.problems), self.hparams.root)
        mean, std = _STATS.get(self.hparams.source, ((0.5,) * self.hparams.in_chans, (0.25,) * self.hparams.in_chans))
        self.split = Split(
            TransformedDataset(split.train, self._transform(train=True, mean=mean, std=std)),
            TransformedDataset(split.val, self._transform(train=False, mean=mean, std=std)),
            split.train_labels, split.class_names, split.problems,
        )

    def _transform(self, train: bool, mean, std) -> v2.Compose:
        size = self.hparams.image_size
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True)]
        if train and self.hparams.augment:
            steps.append(v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
            if self.hparams.source in _FLIPPABLE:
                steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.Normalize(mean, std))
        return v2.Compose(steps)

    @property
    def info(self) -> dict:
        """What a model needs to know about the data: classes, channels, input size."""
        self.setup()
        return {
            "num_classes": len(self.split.class_names),
            "in_chans": self.hparams.in_chans,
            "image_size": self.hparams.image_size,
            "class_names": self.split.class_names,
        }

    def train_dataloader(self) -> DataLoader:
        sampler = build_sampler(self.hparams.sampler, self.split.train_labels, self.hparams.seed)
        return self._loader(self.split.train, sampler=sampler, generator=self.loader_generator,
                            # a last batch of one sample would break BatchNorm; tiny sets keep every sample
                            drop_last=len(self.split.train) > self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        # Its own generator so that iterating it never draws from the global RNG.
        return self._loader(self.split.val, generator=torch.Generator().manual_seed(self.hparams.seed))

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def state_dict(self) -> dict:
        return {"loader_generator": self.loader_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loader_generator.set_state(state["loader_generator"])
