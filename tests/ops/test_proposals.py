"""Selective-search proposals: boxes inside the image, at most max_proposals, each setting honoured, reproducible,
elongated images padded for OpenCV; the disk cache computes once, and recomputes a file it cannot trust."""
import logging

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import cvlab.ops.proposals as proposals_module
from cvlab.data.shapes import draw_scene
from cvlab.ops.proposals import MAX_ASPECT, ProposalCache, proposal_settings, selective_search
from cvlab.utils.errors import UserError


@pytest.fixture(scope="module")
def scene():
    """A 128 px shape scene: uint8 Tensor[3, 128, 128] and its boxes."""
    drawn = draw_scene(np.random.default_rng(3), 128, labels=[0, 2, 4])
    return torch.from_numpy(np.array(drawn.image)).permute(2, 0, 1).contiguous(), torch.from_numpy(drawn.boxes)


@pytest.fixture
def counted(monkeypatch):
    """Counts the selective-search runs of the cache (calls of compute_proposals)."""
    calls = []
    compute = proposals_module.compute_proposals

    def counting(image, settings):
        calls.append(tuple(image.shape))
        return compute(image, settings)

    monkeypatch.setattr(proposals_module, "compute_proposals", counting)
    return calls


def _inside(boxes: torch.Tensor, height: int, width: int) -> bool:
    return bool(((boxes[:, :2] >= 0).all() & (boxes[:, 2] <= width).all() & (boxes[:, 3] <= height).all()
                 & (boxes[:, 2:] > boxes[:, :2]).all()))


def test_proposals_are_boxes_inside_the_image_that_find_the_objects(scene):
    image, truth = scene
    boxes = selective_search(image)
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 20 <= len(boxes) <= 2000
    assert _inside(boxes, 128, 128)
    assert (boxes[:, 2:] - boxes[:, :2] >= proposals_module.DEFAULT_MIN_SIZE).all()
    assert len(torch.unique(boxes, dim=0)) == len(boxes)
    # Every drawn shape has a proposal overlapping it at R-CNN's positive threshold.
    assert (box_iou(truth, boxes).max(dim=1).values >= 0.5).all()
    # Integer OpenCV rects, as continuous xyxy.
    assert torch.equal(boxes, boxes.round())


def test_proposals_are_reproducible_and_float_images_give_the_same(scene):
    image, _ = scene
    first = selective_search(image)
    assert torch.equal(first, selective_search(image))  # OpenCV's random rank is seeded
    assert torch.equal(first, selective_search(image.float() / 255))


def test_each_setting_changes_the_proposals(scene):
    image, _ = scene
    every = selective_search(image)
    # max_proposals keeps the first ones, in rank order.
    assert torch.equal(selective_search(image, max_proposals=10), every[:10])
    # min_size drops the boxes with a shorter side.
    large = selective_search(image, min_size=30)
    assert 0 < len(large) < len(every) and (large[:, 2:] - large[:, :2] >= 30).all()
    assert (every[:, 2:] - every[:, :2] < 30).any(dim=1).any()
    # quality runs more segmentations than fast: more distinct boxes.
    quality = selective_search(image, mode="quality")
    assert len(quality) > len(every) and _inside(quality, 128, 128)


@pytest.mark.parametrize("shape", [(3, 256, 64), (3, 64, 256)])
def test_an_elongated_image_is_padded_for_opencv_and_its_boxes_stay_inside(monkeypatch, scene, shape):
    """A 1:4 image (tall and wide): OpenCV sees it padded to MAX_ASPECT, the proposals lie in the image itself."""
    cv2 = proposals_module._opencv()
    create = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation
    seen = []

    class Recording:
        def __init__(self):
            self.search = create()

        def setBaseImage(self, image):  # noqa: N802 (OpenCV's name)
            seen.append(image.shape)
            self.search.setBaseImage(image)

        def __getattr__(self, name):
            return getattr(self.search, name)

    monkeypatch.setattr(cv2.ximgproc.segmentation, "createSelectiveSearchSegmentation", Recording)
    tile = scene[0][:, :64, :64]
    image = torch.cat([tile] * 4, dim=1 if shape[1] > shape[2] else 2)
    assert image.shape == shape
    boxes = selective_search(image)
    height, width = shape[1:]
    assert seen == [(max(height, width // 2), max(width, height // 2), 3)]  # padded at the bottom or right
    assert max(seen[0][:2]) / min(seen[0][:2]) == MAX_ASPECT
    assert len(boxes) > 10 and _inside(boxes, height, width)
    # The proposals cover the whole long side, not only the part near the padding.
    assert boxes[:, 3 if height > width else 2].max() == max(height, width)
    assert boxes[:, 1 if height > width else 0].min() == 0


def test_settings_are_checked_and_completed():
    assert proposal_settings({"mode": "quality"}) == {"method": "selective_search", "mode": "quality",
                                                      "max_proposals": 2000, "min_size": 8}
    with pytest.raises(UserError, match="max_proposal.*Did you mean max_proposals"):
        proposal_settings({"max_proposal": 100})
    with pytest.raises(UserError, match="model.proposals.mode is one of fast, quality"):
        proposal_settings({"mode": "slow"})
    with pytest.raises(UserError, match="model.proposals.method"):
        proposal_settings({"method": "edge_boxes"})
    with pytest.raises(UserError, match="model.proposals.max_proposals"):
        proposal_settings({"max_proposals": 0})


# ------------------------------------------------------------------------------------------------- the cache
def test_the_cache_computes_once_per_image_and_settings(tmp_path, scene, counted):
    image, _ = scene
    cache = ProposalCache(tmp_path)
    first = cache.get(image, {"mode": "fast"})
    assert len(counted) == 1 and cache.path(image, {}).is_file()
    assert cache.path(image, {}).is_relative_to(tmp_path)
    again = ProposalCache(tmp_path).get(image, {"mode": "fast", "max_proposals": 2000})  # same settings, completed
    assert len(counted) == 1 and torch.equal(first, again)
    assert torch.equal(first, selective_search(image))
    assert np.load(cache.path(image, {}), allow_pickle=False).dtype == np.float32
    # Other settings, or other pixels, are other entries.
    assert len(cache.get(image, {"max_proposals": 5})) == 5 and len(counted) == 2
    cache.get(image.flip(-1), {})
    assert len(counted) == 3 and len(list(tmp_path.rglob("*.npy"))) == 3
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically: no temporary file left behind


def test_the_default_cache_root_follows_cvlab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVLAB_CACHE", str(tmp_path))
    assert ProposalCache().root == tmp_path / "proposals"


def _fake_header(path, shape, descr="<f4"):
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})


@pytest.mark.parametrize("damage", ["truncated", "empty", "huge shape", "pickled", "wrong dtype", "outside"])
def test_a_cache_file_that_cannot_be_trusted_is_recomputed(tmp_path, scene, counted, damage):
    image, _ = scene
    cache = ProposalCache(tmp_path)
    good = cache.get(image, {})
    path = cache.path(image, {})
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "huge shape":  # a header promising 16 TB must be refused before anything is allocated
        _fake_header(path, (10**12, 4))
    elif damage == "pickled":
        np.save(path, np.array([{"boxes": 1}], dtype=object), allow_pickle=True)
    elif damage == "wrong dtype":
        np.save(path, good.double().numpy())
    else:
        np.save(path, (good + 1000).numpy())
    assert cache.cached(image, {}) is None
    again = cache.get(image, {})
    assert len(counted) == 2 and torch.equal(again, good)
    assert torch.equal(cache.cached(image, {}), good)  # and rewritten whole


def test_an_unwritable_cache_still_gives_proposals_and_says_so(tmp_path, scene, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="cvlab.ops.proposals"):
        boxes = ProposalCache(blocker).get(scene[0], {})
    assert torch.equal(boxes, selective_search(scene[0]))
    assert "not cached" in caplog.text and "CVLAB_CACHE" in caplog.text
