"""Classification data: embedded sets (digits, shapes, synthetic), image folders, torchvision's CIFAR/MNIST read
from files written here in their real on-disk formats; the three splits (shipped or cut, seeded and stratified),
the DataInfo contract, the sampler plug-in and the loader's saved RNG."""
import inspect
import logging
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from cvlab.data.base import DataInfo
from cvlab.data.classification import _STATS, ClassificationDataModule, SyntheticImages
from cvlab.data.samplers import ClassBalancedSampler, EpochShuffleSampler
from cvlab.utils.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "cvlab" / "conf"


def _option(group: str, name: str) -> dict:
    """The option's config as the run composes it (base configs merged), less Hydra's own keys."""
    from cvlab.utils.config import compose

    node = OmegaConf.to_container(compose("train", [f"{group}={name}"])[group], resolve=False)
    return {key: value for key, value in node.items() if not key.startswith("_") or key == "_target_"}


def _setup(**kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule(**kwargs)
    dm.setup()
    return dm


def _to_uint8(image: torch.Tensor, source: str) -> np.ndarray:
    """Undoes Normalize and ToDtype: Tensor[C, H, W] normalised -> uint8 [C, H, W]."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in _STATS[source])
    return (image * std + mean).mul(255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_dm():
    return _setup(source="digits", image_size=8, in_chans=1, seed=42)


def _indices(dataset) -> list[int]:
    return list(dataset.base.indices)  # TransformedDataset(Subset(...))


def test_digits_three_disjoint_splits_and_info(digits_dm, caplog):
    # 70 / 15 / 15: ceil(0.15 x 1797) = 270 each for validation and test.
    assert (len(digits_dm.train_set), len(digits_dm.val_set), len(digits_dm.test_set)) == (1257, 270, 270)
    train, val, test = (set(_indices(d)) for d in (digits_dm.train_set, digits_dm.val_set, digits_dm.test_set))
    assert len(train | val | test) == 1797 and not (train & val or train & test or val & test)
    assert len(digits_dm.train_labels) == 1257
    info = digits_dm.info
    assert isinstance(info, DataInfo)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 8)
    assert info.class_names == tuple(str(d) for d in range(10))
    assert info.class_counts == tuple(np.bincount(digits_dm.train_labels).tolist()) and sum(info.class_counts) == 1257
    assert (info.ignore_index, info.palette) == (None, None)
    with caplog.at_level(logging.INFO):
        _setup(source="digits", image_size=8, in_chans=1, seed=42)
    notes = [r.getMessage() for r in caplog.records if "digits" in r.getMessage()]
    assert notes == ["data digits: ships no splits: cut val (15 %) and test (15 %) from the 1,797 images, stratified "
                     "by class, seed 42; 1257 / 270 / 270 train / val / test images"]


def test_digits_splits_are_stratified(digits_dm):
    totals = Counter(load_digits().target.tolist())
    counts = {split: Counter(label for _, label in getattr(digits_dm, f"{split}_set")) for split in ("val", "test")}
    train_counts = Counter(digits_dm.train_labels)
    for c in range(10):  # every class keeps its 15 % share (within one image) in validation and in test
        assert train_counts[c] + counts["val"][c] + counts["test"][c] == totals[c]
        assert abs(counts["val"][c] - 0.15 * totals[c]) <= 1 and abs(counts["test"][c] - 0.15 * totals[c]) <= 1


def test_digits_fractions_and_seed_set_the_split(digits_dm):
    again = _setup(source="digits", image_size=8, in_chans=1, seed=42)
    other = _setup(source="digits", image_size=8, in_chans=1, seed=7)
    wider = _setup(source="digits", image_size=8, in_chans=1, seed=42, val_fraction=0.1, test_fraction=0.3)
    assert _indices(again.test_set) == _indices(digits_dm.test_set)
    assert set(_indices(other.test_set)) != set(_indices(digits_dm.test_set)) and len(other.test_set) == 270
    # ceil(0.1 x 1797) = 180, ceil(0.3 x 1797) = 540.
    assert (len(wider.train_set), len(wider.val_set), len(wider.test_set)) == (1077, 180, 540)


@pytest.mark.parametrize("val_fraction, test_fraction", [(0.0, 0.15), (0.15, 0.0), (0.5, 0.5), (-0.1, 0.2),
                                                         (0.15, 1.0)])
def test_fractions_are_validated(val_fraction, test_fraction):
    with pytest.raises(UserError, match=rf"^data.val_fraction={val_fraction} and data.test_fraction={test_fraction}: "
                                        "each must be above 0, and together below 1"):
        ClassificationDataModule(source="digits", val_fraction=val_fraction, test_fraction=test_fraction)


def test_digits_normalised_with_stated_stats(digits_dm):
    images = torch.stack([digits_dm.train_set[i][0] for i in range(len(digits_dm.train_set))])
    assert images.shape == (1257, 1, 8, 8) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.05
    assert abs(images.std().item() - 1.0) < 0.05
    # One image undone exactly: pixel / 16 in sklearn's 0..16 scale, then (x - 0.3047) / 0.3788.
    index = _indices(digits_dm.train_set)[0]
    expected = torch.tensor(load_digits().images[index], dtype=torch.float32) / 16.0
    image, label = digits_dm.train_set[0]
    torch.testing.assert_close(image[0] * 0.3761 + 0.3053, expected, atol=1e-5, rtol=0)
    assert label == int(load_digits().target[index])


# ----------------------------------------------------------------------------------------------- shapes
def test_shapes_three_splits_classes_and_determinism():
    from cvlab.data.shapes import SHAPE_CLASSES

    dm = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=3)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 5, 5)  # test_size defaults to val_size
    assert len(_setup(source="shapes", image_size=32, train_size=10, val_size=5, test_size=7).test_set) == 7
    assert dm.info.num_classes == 5 and dm.info.class_names == SHAPE_CLASSES and dm.info.class_counts == (2,) * 5
    assert dm.train_labels == [i % 5 for i in range(10)]
    image, label = dm.train_set[7]
    assert image.shape == (3, 32, 32) and label == 2
    # Normalised with the generic (0.5, 0.25): [0, 1] maps to [-2, 2].
    assert image.min() >= -2.0 and image.max() <= 2.0
    same = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=3)
    other = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=4)
    assert torch.equal(same.train_set[7][0], image) and torch.equal(same.test_set[4][0], dm.test_set[4][0])
    assert not torch.equal(other.train_set[7][0], image)
    for i in range(5):  # the three splits draw different images
        assert not torch.equal(dm.val_set[i][0], dm.train_set[i][0])
        assert not torch.equal(dm.test_set[i][0], dm.val_set[i][0])


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_per_index():
    data = SyntheticImages(size=6, image_size=16, in_chans=3, num_classes=7, seed=5)
    image, label = data[4]
    assert len(data) == 6 and image.shape == (3, 16, 16) and 0 <= label < 7
    assert 0.0 <= image.min() and image.max() < 1.0
    again = data[4]
    assert torch.equal(again[0], image) and again[1] == label
    assert not torch.equal(data[3][0], image)
    assert not torch.equal(SyntheticImages(6, 16, 3, 7, seed=6)[4][0], image)
    # Same index, independent of the dataset's length.
    assert torch.equal(SyntheticImages(100, 16, 3, 7, seed=5)[4][0], image)


def test_synthetic_datamodule():
    dm = _setup(source="synthetic", image_size=16, in_chans=1, num_classes=7, train_size=6, val_size=3, seed=5)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 3)
    labels = [SyntheticImages(6, 16, 1, 7, seed=5)[i][1] for i in range(6)]
    assert dm.info == DataInfo(num_classes=7, class_names=[str(c) for c in range(7)], in_chans=1, image_size=16,
                               class_counts=np.bincount(labels, minlength=7).tolist())
    assert dm.train_set[2][0].shape == (1, 16, 16)
    assert dm.train_labels == labels
    assert not torch.equal(dm.val_set[0][0], dm.train_set[0][0])
    assert not torch.equal(dm.test_set[0][0], dm.val_set[0][0])
    assert torch.equal(dm.test_set.base[0][0], SyntheticImages(3, 16, 1, 7, seed=7)[0][0])  # seeds 5, 6, 7


# ----------------------------------------------------------------------------------------------- image folder
def _write_pngs(folder: Path, count: int, seed: int, size: int = 8) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img_{i}.png")
        arrays.append(array)
    return arrays


def _samples(dataset) -> list[tuple[str, int]]:
    return dataset.base.samples  # TransformedDataset(FolderImages)


def test_imagefolder_skips_corrupt_file_and_cuts_three_splits(tmp_path, caplog):
    cats = _write_pngs(tmp_path / "cat", 6, seed=0)
    _write_pngs(tmp_path / "dog", 6, seed=1)
    corrupt = tmp_path / "cat" / "broken.png"
    corrupt.write_bytes(np.random.default_rng(2).integers(0, 256, 200, dtype=np.uint8).tobytes())
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO):
        dm = _setup(source="imagefolder", root=str(tmp_path), image_size=8, in_chans=3, seed=0)
    assert str(corrupt) in caplog.text
    assert "no split folders: cut val (15 %) and test (15 %) from the 12 training images" in caplog.text
    assert len(dm.problems) == 1 and dm.problems[0].startswith(str(corrupt))
    # 12 readable images; ceil(0.15 x 12) = 2 each for validation and test, one per class (stratified).
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 2)
    for dataset in (dm.val_set, dm.test_set):
        assert sorted(label for _, label in _samples(dataset)) == [0, 1]
    paths = [path for dataset in (dm.train_set, dm.val_set, dm.test_set) for path, _ in _samples(dataset)]
    assert len(set(paths)) == 12
    assert dm.info.class_names == ("cat", "dog") and dm.info.class_counts == (4, 4)
    loaded = [dataset[i] for dataset in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(dataset))]
    assert all(image.shape == (3, 8, 8) for image, _ in loaded)
    # Pixels come back exactly: find cat/img_3.png among the loaded images.
    image = loaded[paths.index(str(tmp_path / "cat" / "img_3.png"))][0]
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    restored = (image * std + mean).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(restored, cats[3])


def test_imagefolder_train_val_test_folders_are_kept(tmp_path, caplog):
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        for name in ("cat", "dog"):
            _write_pngs(tmp_path / split / name, count, seed=count)
    with caplog.at_level(logging.INFO):
        dm = _setup(source="imagefolder", root=str(tmp_path), image_size=4, in_chans=1, seed=0)
    assert "train/ and val/ and test/: the folders are the splits" in caplog.text
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 4, 2)
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        assert {Path(path).parts[-3] for path, _ in _samples(dataset)} == {split}
    assert dm.train_labels == [0, 0, 0, 1, 1, 1]
    assert dm.info.class_names == ("cat", "dog") and dm.problems == []
    image, label = dm.val_set[3]
    assert image.shape == (1, 4, 4) and label == 1  # resized to image_size, converted to grey for in_chans=1


def test_imagefolder_cuts_only_the_missing_test_split(tmp_path):
    for split, count in (("train", 10), ("val", 2)):
        for name in ("cat", "dog"):
            _write_pngs(tmp_path / split / name, count, seed=count)
    dm = _setup(source="imagefolder", root=str(tmp_path), image_size=4, seed=0)
    # The val/ folder is kept; ceil(0.15 x 20) = 3 test images are cut from train/.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (17, 4, 3)
    assert {Path(path).parts[-3] for path, _ in _samples(dm.val_set)} == {"val"}
    assert {Path(path).parts[-3] for path, _ in _samples(dm.test_set)} == {"train"}
    assert not {p for p, _ in _samples(dm.test_set)} & {p for p, _ in _samples(dm.train_set)}


def test_imagefolder_split_folders_with_different_classes(tmp_path):
    _write_pngs(tmp_path / "train" / "cat", 2, seed=0)
    _write_pngs(tmp_path / "val" / "dog", 2, seed=0)
    with pytest.raises(UserError, match="different class folders"):
        _setup(source="imagefolder", root=str(tmp_path))


def test_imagefolder_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        _setup(source="imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no images found under .*one sub-folder per class"):
        _setup(source="imagefolder", root=str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found"):
        _setup(source="imagefolder", root=str(tmp_path))


def test_imagefolder_class_too_small_to_split(tmp_path):
    _write_pngs(tmp_path / "cat", 4, seed=0)
    _write_pngs(tmp_path / "dog", 2, seed=1)
    with pytest.raises(UserError, match="class 'dog' of .* has 2 image.*at least 3 per class"):
        _setup(source="imagefolder", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------- torchvision files
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-pickle layout: data uint8 [N, 3072] (1024 R, then G, then B, each row-major), labels a list.
    Labels alternate 0, 1 so that a stratified validation split can be cut from the 20 training images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + len(written)) % 2 for i in range(per_batch)]
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{name}_{i}.png" for i in
                                                                                    range(per_batch)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, file, protocol=2)
    return written


def test_cifar10_keeps_the_official_test_split_and_cuts_validation(tmp_path):
    written = _write_cifar10(tmp_path)
    dm = _setup(source="cifar10", root=str(tmp_path), download=False, image_size=32, augment=False)
    # The official test batch is the test set; ceil(0.15 x 20) = 3 of the training images are cut for validation.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (17, 3, 4)
    assert dm.info.class_names == tuple(CIFAR_NAMES) and dm.info.num_classes == 10
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    train_idx, val_idx = _indices(dm.train_set), _indices(dm.val_set)
    assert sorted(train_idx + val_idx) == list(range(20))
    assert dm.train_labels == [train_labels[i] for i in train_idx]
    assert dm.info.class_counts == (train_labels.count(0) - [train_labels[i] for i in val_idx].count(0),
                                    train_labels.count(1) - [train_labels[i] for i in val_idx].count(1), *[0] * 8)
    # Training items come from the batches in order, 4 rows each: original index k is row k % 4 of batch k // 4 + 1.
    for dataset, position in ((dm.train_set, 5), (dm.val_set, 1)):
        k = _indices(dataset)[position]
        data, labels = written[f"data_batch_{k // 4 + 1}"]
        image, label = dataset[position]
        assert image.shape == (3, 32, 32) and label == labels[k % 4]
        np.testing.assert_array_equal(_to_uint8(image, "cifar10"), data[k % 4].reshape(3, 32, 32))
    data, labels = written["test_batch"]
    image, label = dm.test_set[2]
    assert label == labels[2]
    np.testing.assert_array_equal(_to_uint8(image, "cifar10"), data[2].reshape(3, 32, 32))


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files_exactly(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (2, 28, 28))}
    labels = {"train": np.array([7, 0, 9] * 4), "t10k": np.array([3, 5])}
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images[prefix])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels[prefix])
    dm = ClassificationDataModule(source="mnist", root=str(tmp_path), download=False, image_size=28, in_chans=1)
    # ceil(0.15 x 12) = 2 < 3 classes: no stratified cut fits; 0.25 gives 3, one image of each digit.
    with pytest.raises(UserError, match="cannot cut 2 of the 12 images of mnist off as a split"):
        dm.setup()
    dm = _setup(source="mnist", root=str(tmp_path), download=False, image_size=28, in_chans=1, val_fraction=0.25)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 2)
    assert sorted(label for _, label in dm.val_set) == [0, 7, 9] and dm.info.class_counts[7] == 3
    for dataset, prefix in ((dm.train_set, "train"), (dm.val_set, "train"), (dm.test_set, "t10k")):
        for i in range(len(dataset)):
            index = _indices(dataset)[i] if prefix == "train" else i
            image, label = dataset[i]
            assert image.shape == (1, 28, 28) and label == labels[prefix][index]
            np.testing.assert_array_equal(_to_uint8(image, "mnist")[0], images[prefix][index])


@pytest.mark.parametrize("source", ["cifar10", "mnist", "fashion_mnist"])
def test_missing_torchvision_dataset_without_download(tmp_path, source):
    with pytest.raises(UserError, match=f"{source} is not in .*{re.escape(tmp_path.name)}.*data.root="):
        _setup(source=source, root=str(tmp_path), download=False)


# ----------------------------------------------------------------------------------------------- samplers
def test_epoch_shuffle_sampler():
    sampler = EpochShuffleSampler(50, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and len(sampler) == 50
    twin = EpochShuffleSampler(50, seed=3)
    twin.set_epoch(2)
    assert list(twin) == order
    sampler.set_epoch(3)
    assert list(sampler) != order and sorted(sampler) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=4)) != list(EpochShuffleSampler(50, seed=3))


def test_class_balanced_sampler_draws_minority_half_the_time():
    labels = [0] * 90 + [1] * 10
    sampler = ClassBalancedSampler(labels, seed=0)
    draws = []
    for epoch in range(20):  # 20 epochs x 100 draws
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(draws) == 2000 and len(sampler) == 100
    minority = sum(labels[i] for i in draws) / len(draws)
    assert 0.4 < minority < 0.6, minority
    sampler.set_epoch(5)
    assert list(sampler) == draws[500:600]  # same (seed, epoch), same draws


def test_sampler_configs_are_plugins_the_datamodule_builds():
    none, balanced = _option("sampler", "none"), _option("sampler", "class_balanced")
    assert none == {"_target_": "cvlab.data.samplers.EpochShuffleSampler", "name": "none"}
    assert balanced == {"_target_": "cvlab.data.samplers.ClassBalancedSampler", "name": "class_balanced"}
    default = _setup(source="digits", image_size=8, in_chans=1, batch_size=8)
    uniform = _setup(source="digits", image_size=8, in_chans=1, batch_size=8, sampler=none)
    assert type(default.train_dataloader().sampler) is EpochShuffleSampler  # no sampler: the uniform shuffle
    assert list(default.train_dataloader().sampler) == list(uniform.train_dataloader().sampler)
    loader = _setup(source="digits", image_size=8, in_chans=1, batch_size=8, sampler=balanced).train_dataloader()
    assert type(loader.sampler) is ClassBalancedSampler and len(loader.sampler) == 1257


def test_class_balanced_sampler_takes_effect_on_imbalanced_data():
    balanced = {"_target_": "cvlab.data.samplers.ClassBalancedSampler", "name": "class_balanced"}
    dm = _setup(source="synthetic", image_size=4, in_chans=1, num_classes=2, train_size=400, val_size=4)
    # Every image of class 1 and a tenth of class 0: class 0 becomes a minority of about 10 %.
    skew = [i for i, label in enumerate(dm.train_labels) if label == 1 or i % 10 == 0]
    dm.train_labels = [dm.train_labels[i] for i in skew]
    dm.train_set = torch.utils.data.Subset(dm.train_set, skew)
    minority = 1 - sum(dm.train_labels) / len(dm.train_labels)
    drawn_share = {}
    for name, sampler in (("none", None), ("class_balanced", balanced)):
        dm.sampler_config = sampler
        drawn = [dm.train_labels[i] for i in dm.train_dataloader().sampler]
        drawn_share[name] = 1 - sum(drawn) / len(drawn)
    assert minority < 0.15 and abs(drawn_share["none"] - minority) < 1e-9  # a permutation: every image once
    assert 0.4 < drawn_share["class_balanced"] < 0.6, drawn_share


# ----------------------------------------------------------------------------------------------- loaders
def test_train_loader_order_and_generator_round_trip(digits_dm):
    loader = digits_dm.train_dataloader()
    assert len(loader) == 1257 // 64  # drop_last: the set is larger than one batch
    assert type(loader.sampler) is EpochShuffleSampler
    saved = digits_dm.state_dict()
    first_seed = iter(loader)._base_seed  # each new iterator draws its worker seed from the loader's generator
    assert not torch.equal(digits_dm.loader_generator.get_state(), saved["loader_generator"])
    digits_dm.load_state_dict(saved)
    assert torch.equal(digits_dm.loader_generator.get_state(), saved["loader_generator"])
    assert iter(loader)._base_seed == first_seed

    # A fresh module restored from the state draws the same; the order ignores the global RNG.
    fresh = _setup(source="digits", image_size=8, in_chans=1, seed=42)
    fresh.load_state_dict(saved)
    fresh_loader = fresh.train_dataloader()
    assert iter(fresh_loader)._base_seed == first_seed
    torch.manual_seed(123)
    loader.sampler.set_epoch(1)
    fresh_loader.sampler.set_epoch(1)
    assert torch.equal(next(iter(loader))[1], next(iter(fresh_loader))[1])


def test_evaluation_loaders_keep_every_image_in_order(digits_dm):
    for loader, dataset in ((digits_dm.val_dataloader(), digits_dm.val_set),
                            (digits_dm.test_dataloader(), digits_dm.test_set)):
        labels = torch.cat([batch[1] for batch in loader])
        assert labels.tolist() == [label for _, label in dataset]  # no shuffle, no drop_last


# ----------------------------------------------------------------------------------------------- DataInfo
def test_data_info_round_trip_is_plain_python(tmp_path):
    info = DataInfo(num_classes=2, class_names=["cat", "dog"], in_chans=3, image_size=32, class_counts=[5, 7],
                    ignore_index=255, palette=[(0, 0, 0), (255, 0, 0)])
    plain = info.as_dict()
    assert plain == {"num_classes": 2, "class_names": ["cat", "dog"], "in_chans": 3, "image_size": 32,
                     "class_counts": [5, 7], "ignore_index": 255, "palette": [[0, 0, 0], [255, 0, 0]]}
    torch.save({"data_info": plain}, tmp_path / "info.pt")
    loaded = torch.load(tmp_path / "info.pt", weights_only=True)["data_info"]
    assert DataInfo.from_dict(loaded) == info and info.class_names == ("cat", "dog")
    # A checkpoint written before the contract grew holds only these four keys.
    old = DataInfo.from_dict({"num_classes": 2, "class_names": ["cat", "dog"], "in_chans": 1, "image_size": 8})
    assert (old.class_counts, old.ignore_index, old.palette) == ((), None, None)
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        DataInfo(num_classes=2, class_names=["a", "b", "c"], in_chans=1, image_size=8, class_counts=[1, 1])
    with pytest.raises(ValueError, match="2 classes but 1 class counts"):
        DataInfo(num_classes=2, class_names=["a", "b"], in_chans=1, image_size=8, class_counts=[1])


def test_given_num_classes_is_checked():
    with pytest.raises(UserError, match="data.num_classes=3 but the data has 10 classes"):
        _setup(source="digits", num_classes=3)


# ----------------------------------------------------------------------------------------------- configs
DATA_OPTIONS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


@pytest.mark.parametrize("name", DATA_OPTIONS)
def test_data_config_keys_are_datamodule_arguments(name):
    from hydra.utils import get_class

    config = _option("data", name)
    datamodule_class = get_class(config.pop("_target_"))
    parameters = set(inspect.signature(datamodule_class).parameters)
    assert set(config) <= parameters, set(config) - parameters
    # A preset that extends another option (digits_lt: digits, long-tailed) reads that option's source.
    extended = [entry.removesuffix("@_here_") for entry in OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
                .get("defaults", []) if isinstance(entry, str) and not entry.startswith("base/") and entry != "_self_"]
    assert config["name"] == name and config["source"] == (extended[0] if extended else name)


def test_image_size_is_the_one_spelling():
    root = CONF_DIR.parent
    files = [*(root / "data").glob("*.py"), *(CONF_DIR / "data").rglob("*.yaml")]
    assert len(files) > 15
    assert [str(f) for f in files if "img_size" in f.read_text()] == []


@pytest.mark.parametrize("name, num_classes, in_chans, image_size", [
    ("digits", 10, 1, 8), ("shapes", 5, 3, 32), ("synthetic", 1000, 3, 224),
])
def test_embedded_configs_give_their_info(name, num_classes, in_chans, image_size):
    config = _option("data", name)
    config.pop("_target_")
    for key in [key for key, value in config.items() if str(value).startswith("${")]:
        config.pop(key)  # ${seed}, ${oc.select:task....}: the run's and task's values, filled in when composed
    if name != "digits":
        config.update(train_size=5, val_size=2, test_size=2)  # keep the generated sets tiny
    info = ClassificationDataModule(**config).info
    assert (info.num_classes, info.in_chans, info.image_size) == (num_classes, in_chans, image_size)
    assert config["num_classes"] == num_classes
