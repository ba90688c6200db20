"""Proposals attached to detection data: they follow the letterbox, the flip and the affine jitter exactly like the
boxes, every data format carries them, they are computed once before training and then read from the cache, collate
keeps them per image, and DetectionTask.resolve attaches them only when the model config asks."""
import logging

import numpy as np
import pytest
import torch

import cvlab.ops.proposals as proposals_module
from cvlab.data.base import DetectionDataset, letterbox_geometry
from cvlab.data.detection import DetectionDataModule, detection_collate, detection_transforms
from cvlab.data.proposals import WithProposals, attach_proposals, precompute_proposals
from cvlab.data.shapes import SHAPE_CLASSES
from cvlab.ops.proposals import ProposalCache
from cvlab.tasks.detection import DetectionTask
from cvlab.utils.errors import UserError
from detection_files import shape_scenes, write_coco, write_voc, write_yolo


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's proposals in its own folder, so that every count starts from a cold cache."""
    monkeypatch.setenv("CVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "proposals"


@pytest.fixture
def counted(monkeypatch):
    """Counts the selective-search runs of the cache in this process."""
    calls = []
    compute = proposals_module.compute_proposals

    def counting(image, settings):
        calls.append(tuple(image.shape))
        return compute(image, settings)

    monkeypatch.setattr(proposals_module, "compute_proposals", counting)
    return calls


class _OneImage(DetectionDataset):
    """One 80 x 64 image with two boxes, read as the file readers hand it over."""

    boxes = torch.tensor([[4.0, 6, 30, 40], [50, 20, 78, 60]])

    def __init__(self, transforms):
        super().__init__(SHAPE_CLASSES, transforms)
        self.pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 64, 80), dtype=np.uint8))

    def __len__(self) -> int:
        return 1

    def load(self, index: int):
        return self.pixels, self.boxes.clone(), torch.tensor([1, 3]), 7


class _FixedProposals:
    """A cache whose proposals are the ground-truth boxes, then two others."""

    extra = torch.tensor([[0.0, 0, 80, 64], [60, 2, 70, 12]])

    def get(self, image, settings):
        return torch.cat([_OneImage.boxes, self.extra])


def test_proposals_follow_the_letterbox_and_the_flip_exactly_like_the_boxes():
    flip = detection_transforms(128, train=True, hflip=1.0, scale=(1.0, 1.0), translate=0.0, color_jitter=0.0)
    dataset = WithProposals(_OneImage(flip), {}, cache=_FixedProposals())
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 3] and target["image_id"] == 7
    assert torch.equal(target["proposals"][:2], target["boxes"])  # a proposal equal to a box stays equal to it
    # Letterbox 80 x 64 -> 128 x 102 (padded 13 rows at the top), then the horizontal flip.
    _, new_height, _, _, top = letterbox_geometry(64, 80, 128)
    sx, sy = 128 / 80, new_height / 64
    x1, y1, x2, y2 = _FixedProposals.extra[1].tolist()
    expected = torch.tensor([[0, top, 128, top + 64 * sy],
                             [128 - x2 * sx, top + y1 * sy, 128 - x1 * sx, top + y2 * sy]])
    torch.testing.assert_close(target["proposals"][2:], expected)
    torch.testing.assert_close(dataset.proposals(0), torch.cat([_OneImage.boxes, _FixedProposals.extra]))


def test_proposals_follow_the_random_affine_jitter_like_the_boxes():
    jitter = detection_transforms(96, train=True, hflip=0.5, scale=(0.3, 1.7), translate=0.4, color_jitter=0.0)
    dataset = WithProposals(_OneImage(jitter), {}, cache=_FixedProposals())
    kept = set()
    for seed in range(12):
        torch.manual_seed(seed)
        _, target = dataset[0]
        boxes, proposals = target["boxes"], target["proposals"]
        # Sanitized by the same rule: a box and its equal proposal are dropped together or moved together.
        assert torch.equal(proposals[: len(boxes)], boxes)
        assert ((proposals[:, :2] >= 0) & (proposals[:, 2:] <= 96)).all()
        assert ((proposals[:, 2:] - proposals[:, :2]) >= 1).all()
        kept.add(len(proposals))
    assert len(kept) > 1  # the jitter moved some proposals off the image, and they were dropped


def test_collate_keeps_the_proposals_of_each_image():
    items = [(torch.zeros(3, 8, 8), {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.int64),
                                     "image_id": i, "proposals": torch.full((k, 4), float(i))})
             for i, k in enumerate((3, 5))]
    images, targets = detection_collate(items)
    assert images.shape == (2, 3, 8, 8)
    assert [t["proposals"].shape for t in targets] == [(3, 4), (5, 4)]
    assert torch.equal(targets[1]["proposals"], items[1][1]["proposals"])


@pytest.fixture(scope="module")
def files_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("proposal_formats")
    scenes = shape_scenes()
    for split in ("train", "val"):
        write_coco(root / "coco", f"{split}2017", scenes)
        write_voc(root / "voc", split, scenes)
        write_yolo(root / "yolo", split, scenes)
    return root


@pytest.mark.parametrize("source", ["shapes_det", "coco", "voc", "yolo"])
def test_every_data_format_carries_its_cached_proposals_letterboxed(files_on_disk, source, own_cache):
    kwargs = {"train_size": 3, "val_size": 2} if source == "shapes_det" else {"root": str(files_on_disk / source)}
    datamodule = DetectionDataModule(source, image_size=40, batch_size=2, **kwargs)
    settings = datamodule.attach_proposals({"max_proposals": 30})
    assert settings == {"method": "selective_search", "mode": "fast", "max_proposals": 30, "min_size": 8}
    for split in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        assert isinstance(split, WithProposals) and len(split)
    cache = ProposalCache(own_cache)
    _, targets = next(iter(datamodule.val_dataloader()))
    for index, target in enumerate(targets):
        original = datamodule.val_set.image(index)
        height, width = original.shape[-2:]
        raw = cache.cached(original, settings)
        assert raw is not None and 0 < len(raw) <= 30  # computed on the image as read, and cached
        # Evaluation: the letterbox only (shapes_det is drawn at 40 px; the files' 80 x 64 become 40 x 32, 4 rows
        # of padding at the top).
        scale, new_height, new_width, left, top = letterbox_geometry(height, width, 40)
        factor = torch.tensor([new_width / width, new_height / height] * 2)
        torch.testing.assert_close(target["proposals"], raw * factor + torch.tensor([left, top, left, top]))
        assert target["labels"].min() >= 0  # the proposals' marks never leak into the labels
    _, targets = next(iter(datamodule.train_dataloader()))
    for target in targets:
        proposals = target["proposals"]
        assert proposals.shape[1] == 4 and ((proposals >= 0) & (proposals <= 40)).all()


def test_proposals_are_computed_once_before_training_then_read(counted, caplog):
    def datamodule():
        return DetectionDataModule("shapes_det", image_size=48, batch_size=4, train_size=3, val_size=2)

    with caplog.at_level(logging.INFO, logger="cvlab.data.proposals"):
        cold = datamodule()
        cold.attach_proposals({})
    assert len(counted) == 7  # 3 train, 2 val, 2 test images, before any loader runs
    assert "computing the proposals of 7 of 7 images once" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cvlab.data.proposals"):
        warm = datamodule()
        warm.attach_proposals({})
    assert "computing" not in caplog.text
    _, targets = next(iter(warm.train_dataloader()))
    _, cold_targets = next(iter(cold.val_dataloader()))
    _, warm_targets = next(iter(warm.val_dataloader()))
    assert len(counted) == 7 and len(targets) == 3
    assert all(torch.equal(a["proposals"], b["proposals"]) for a, b in zip(cold_targets, warm_targets))
    # Attaching again with other settings re-wraps the splits, not wraps them twice.
    warm.attach_proposals({"max_proposals": 3})
    assert not isinstance(warm.train_set.dataset, WithProposals)
    assert all(len(t["proposals"]) <= 3 for t in next(iter(warm.val_dataloader()))[1])


def test_loader_workers_fill_the_cache(own_cache):
    datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=2, val_size=1)
    datamodule.setup()
    splits = attach_proposals((datamodule.train_set, datamodule.val_set, datamodule.test_set), {}, num_workers=1)
    assert len(list(own_cache.rglob("*.npy"))) == 4
    assert precompute_proposals(splits, num_workers=1) == 0  # and the workers' files are found


@pytest.mark.parametrize("option", ["mosaic", "mixup"])
def test_multi_image_augmentation_with_proposals_is_refused(option):
    datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=2, val_size=1, **{option: 0.5})
    with pytest.raises(UserError, match=f"data.{option}=0.5.*set data.mosaic=0 data.mixup=0"):
        datamodule.attach_proposals({})


def test_resolve_attaches_proposals_only_when_the_model_asks(counted):
    datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=2, val_size=1)
    plain = {"model": {"name": "yolov1"}}
    assert DetectionTask.resolve(plain, datamodule, 0) == {"model": {"name": "yolov1"}}
    assert not isinstance(datamodule.train_set, WithProposals) and not counted
    asking = {"model": {"name": "fast_rcnn", "proposals": {"max_proposals": 100}}}
    resolved = DetectionTask.resolve(asking, datamodule, 0)
    assert resolved["model"]["proposals"] == {"method": "selective_search", "mode": "fast", "max_proposals": 100,
                                              "min_size": 8}
    assert all(isinstance(s, WithProposals) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set))
    assert len(counted) == 4 and "proposals" in datamodule.val_set[0][1]
