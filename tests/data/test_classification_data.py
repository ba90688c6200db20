"""Classification data: embedded sets (digits, shapes, synthetic), image folders, torchvision's CIFAR/MNIST read
from files written here in their real on-disk formats, the epoch-seeded samplers and the loader's saved RNG."""
import inspect
import logging
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from cvlab.data.classification import _STATS, ClassificationDataModule, SyntheticImages
from cvlab.data.samplers import ClassBalancedSampler, EpochShuffleSampler, build_sampler
from cvlab.utils.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "cvlab" / "conf" / "data"


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
    return _setup(source="digits", image_size=8, in_chans=1, val_fraction=0.2, seed=42)


def test_digits_split_sizes_and_info(digits_dm):
    assert len(digits_dm.split.train) == 1437 and len(digits_dm.split.val) == 360
    train_idx, val_idx = digits_dm.split.train.base.indices, digits_dm.split.val.base.indices
    assert len(set(train_idx) | set(val_idx)) == 1797 and not set(train_idx) & set(val_idx)
    assert len(digits_dm.split.train_labels) == 1437
    info = digits_dm.info
    assert (info["num_classes"], info["in_chans"], info["image_size"]) == (10, 1, 8)
    assert info["class_names"] == [str(d) for d in range(10)]


def test_digits_split_is_stratified(digits_dm):
    val_counts = Counter(label for _, label in digits_dm.split.val)
    assert sorted(val_counts) == list(range(10))
    assert all(abs(count - 36) <= 1 for count in val_counts.values()), val_counts
    # The classes hold 174..183 images each; every one keeps its 20 % share (within one image) in validation.
    totals = Counter(load_digits().target.tolist())
    train_counts = Counter(digits_dm.split.train_labels)
    assert all(train_counts[c] + val_counts[c] == totals[c] for c in range(10))
    assert all(abs(val_counts[c] - 0.2 * totals[c]) <= 1 for c in range(10)), val_counts


def test_digits_split_depends_only_on_seed(digits_dm):
    again = _setup(source="digits", image_size=8, in_chans=1, seed=42)
    other = _setup(source="digits", image_size=8, in_chans=1, seed=7)
    assert list(again.split.val.base.indices) == list(digits_dm.split.val.base.indices)
    assert set(other.split.val.base.indices) != set(digits_dm.split.val.base.indices)
    assert len(other.split.val) == 360


def test_digits_normalised_with_stated_stats(digits_dm):
    images = torch.stack([digits_dm.split.train[i][0] for i in range(len(digits_dm.split.train))])
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.05
    assert abs(images.std().item() - 1.0) < 0.05
    # One image undone exactly: pixel / 16 in sklearn's 0..16 scale, then (x - 0.3047) / 0.3788.
    index = int(digits_dm.split.train.base.indices[0])
    expected = torch.tensor(load_digits().images[index], dtype=torch.float32) / 16.0
    image, label = digits_dm.split.train[0]
    torch.testing.assert_close(image[0] * 0.3761 + 0.3053, expected, atol=1e-5, rtol=0)
    assert label == int(load_digits().target[index])


# ----------------------------------------------------------------------------------------------- shapes
def test_shapes_sizes_classes_and_determinism():
    from cvlab.data.shapes import SHAPE_CLASSES

    dm = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=3)
    assert len(dm.split.train) == 10 and len(dm.split.val) == 5
    assert dm.info["num_classes"] == 5 and dm.info["class_names"] == list(SHAPE_CLASSES)
    assert dm.split.train_labels == [i % 5 for i in range(10)]
    image, label = dm.split.train[7]
    assert image.shape == (3, 32, 32) and label == 2
    # Normalised with the generic (0.5, 0.25): [0, 1] maps to [-2, 2].
    assert image.min() >= -2.0 and image.max() <= 2.0
    same = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=3)
    other = _setup(source="shapes", image_size=32, train_size=10, val_size=5, seed=4)
    assert torch.equal(same.split.train[7][0], image)
    assert not torch.equal(other.split.train[7][0], image)
    assert not torch.equal(dm.split.val[2][0], dm.split.train[2][0])  # splits draw different images


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
    assert len(dm.split.train) == 6 and len(dm.split.val) == 3
    assert dm.info == {"num_classes": 7, "in_chans": 1, "image_size": 16, "class_names": [str(c) for c in range(7)]}
    assert dm.split.train[2][0].shape == (1, 16, 16)
    assert dm.split.train_labels == [SyntheticImages(6, 16, 1, 7, seed=5)[i][1] for i in range(6)]
    assert not torch.equal(dm.split.val[0][0], dm.split.train[0][0])


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


def test_imagefolder_skips_corrupt_file_and_splits(tmp_path, caplog):
    cats = _write_pngs(tmp_path / "cat", 6, seed=0)
    _write_pngs(tmp_path / "dog", 6, seed=1)
    corrupt = tmp_path / "cat" / "broken.png"
    corrupt.write_bytes(np.random.default_rng(2).integers(0, 256, 200, dtype=np.uint8).tobytes())
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dm = _setup(source="imagefolder", root=str(tmp_path), image_size=8, in_chans=3, val_fraction=0.2, seed=0)
    assert str(corrupt) in caplog.text
    assert len(dm.split.problems) == 1 and dm.split.problems[0].startswith(str(corrupt))
    # 12 readable images; stratified 20 %: ceil(2.4) = 3 for validation.
    assert len(dm.split.train) == 9 and len(dm.split.val) == 3
    assert dm.info["class_names"] == ["cat", "dog"] and dm.info["num_classes"] == 2
    loaded = [dm.split.train[i] for i in range(9)] + [dm.split.val[i] for i in range(3)]
    assert sorted(label for _, label in loaded) == [0] * 6 + [1] * 6
    assert all(image.shape == (3, 8, 8) for image, _ in loaded)
    # Pixels come back exactly: find cat/img_3.png among the loaded images.
    samples = dm.split.train.base.samples + dm.split.val.base.samples
    position = [path for path, _ in samples].index(str(tmp_path / "cat" / "img_3.png"))
    image = loaded[position][0]
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    restored = (image * std + mean).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(restored, cats[3])


def test_imagefolder_train_val_layout(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            _write_pngs(tmp_path / split / name, count, seed=count)
    dm = _setup(source="imagefolder", root=str(tmp_path), image_size=4, in_chans=1, seed=0)
    assert len(dm.split.train) == 6 and len(dm.split.val) == 4
    assert dm.split.train_labels == [0, 0, 0, 1, 1, 1]
    assert dm.info["class_names"] == ["cat", "dog"] and dm.split.problems == []
    image, label = dm.split.val[3]
    assert image.shape == (1, 4, 4) and label == 1  # resized to image_size, converted to grey for in_chans=1


def test_imagefolder_train_val_with_different_classes(tmp_path):
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


def test_imagefolder_class_with_one_image(tmp_path):
    _write_pngs(tmp_path / "cat", 4, seed=0)
    _write_pngs(tmp_path / "dog", 1, seed=1)
    with pytest.raises(UserError, match="class 'dog' .* fewer than 2"):
        _setup(source="imagefolder", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------- torchvision files
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10(root: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-pickle layout: data uint8 [N, 3072] (1024 R, then G, then B, each row-major), labels a list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{name}_{i}.png" for i in
                                                                                    range(per_batch)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, file, protocol=2)
    return written


def test_cifar10_reads_exact_pixels_and_labels(tmp_path):
    written = _write_cifar10(tmp_path)
    dm = _setup(source="cifar10", root=str(tmp_path), download=False, image_size=32, augment=False)
    assert len(dm.split.train) == 10 and len(dm.split.val) == 2
    assert dm.info["class_names"] == CIFAR_NAMES and dm.info["num_classes"] == 10
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert dm.split.train_labels == train_labels
    # Train item 5 is row 1 of data_batch_3 (batches are concatenated in order, 2 rows each).
    for dataset, index, (data, labels), row in ((dm.split.train, 5, written["data_batch_3"], 1),
                                                (dm.split.val, 1, written["test_batch"], 1)):
        image, label = dataset[index]
        assert image.shape == (3, 32, 32) and label == labels[row]
        np.testing.assert_array_equal(_to_uint8(image, "cifar10"), data[row].reshape(3, 32, 32))


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files_exactly(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (3, 28, 28)), "t10k": rng.integers(0, 256, (2, 28, 28))}
    labels = {"train": np.array([7, 0, 9]), "t10k": np.array([3, 5])}
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images[prefix])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels[prefix])
    dm = _setup(source="mnist", root=str(tmp_path), download=False, image_size=28, in_chans=1)
    assert len(dm.split.train) == 3 and len(dm.split.val) == 2
    assert dm.split.train_labels == [7, 0, 9] and dm.info["num_classes"] == 10
    for dataset, prefix in ((dm.split.train, "train"), (dm.split.val, "t10k")):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.shape == (1, 28, 28) and label == labels[prefix][i]
            np.testing.assert_array_equal(_to_uint8(image, "mnist")[0], images[prefix][i])


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


def test_build_sampler():
    assert type(build_sampler("none", [0, 1, 1], seed=0)) is EpochShuffleSampler
    assert type(build_sampler("class_balanced", [0, 1, 1], seed=0)) is ClassBalancedSampler
    with pytest.raises(UserError, match="unknown sampler 'uniform'"):
        build_sampler("uniform", [0, 1], seed=0)


# ----------------------------------------------------------------------------------------------- loaders
def test_train_loader_order_and_generator_round_trip(digits_dm):
    loader = digits_dm.train_dataloader()
    assert len(loader) == 1437 // 64  # drop_last: the set is larger than one batch
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


def test_class_balanced_train_loader():
    dm = _setup(source="digits", image_size=8, in_chans=1, sampler="class_balanced", batch_size=8)
    loader = dm.train_dataloader()
    assert type(loader.sampler) is ClassBalancedSampler and len(loader.sampler) == 1437


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_config_keys_are_datamodule_arguments(path):
    from hydra.utils import get_class

    config = yaml.safe_load(path.read_text())
    datamodule_class = get_class(config.pop("_target_"))
    parameters = set(inspect.signature(datamodule_class).parameters)
    assert set(config) <= parameters, set(config) - parameters
    assert config["name"] == path.stem and config["source"] == path.stem


@pytest.mark.parametrize("name, num_classes, in_chans, image_size", [
    ("digits", 10, 1, 8), ("shapes", 5, 3, 32), ("synthetic", 1000, 3, 224),
])
def test_embedded_configs_give_their_info(name, num_classes, in_chans, image_size):
    config = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
    config.pop("_target_")
    if name != "digits":
        config.update(train_size=5, val_size=2)  # keep the generated sets tiny
    info = ClassificationDataModule(**config).info
    assert (info["num_classes"], info["in_chans"], info["image_size"]) == (num_classes, in_chans, image_size)
    assert config["num_classes"] == num_classes
