"""Procedural shape scenes: determinism, disjoint splits, tight boxes, class balance and generation speed."""
import time

import numpy as np
import pytest
import torch

from cvlab.data.shapes import (
    SHAPE_CLASSES,
    ShapesClassification,
    ShapesDetection,
    _occludes_too_much,
    draw_scene,
    draw_shape,
)


def test_class_names():
    assert SHAPE_CLASSES == ("circle", "square", "triangle", "diamond", "cross")
    assert ShapesClassification.class_names == SHAPE_CLASSES
    assert ShapesDetection("train", n=1).class_names == SHAPE_CLASSES


def test_draw_shape_areas_and_extent():
    circle = draw_shape("circle", 64, (32, 32), 21)
    assert abs(circle.sum() - np.pi * 10.5**2) / (np.pi * 10.5**2) < 0.1
    ys, xs = np.nonzero(circle)
    assert xs.max() - xs.min() + 1 in (21, 22) and ys.max() - ys.min() + 1 in (21, 22)
    square = draw_shape("square", 64, (32, 32), 20)
    assert abs(int(square.sum()) - 400) <= 45  # the polygon fill includes its outline: 21 x 21 = 441
    cross = draw_shape("cross", 64, (32, 32), 30)
    # Two 30 x 10 arms overlapping in a 10 x 10 centre: 500 px, plus the outline.
    assert 480 <= cross.sum() <= 600
    with pytest.raises(ValueError, match="unknown shape"):
        draw_shape("hexagon", 64, (32, 32), 10)


def test_scene_is_deterministic_and_seed_dependent():
    a = draw_scene(np.random.default_rng(7))
    b = draw_scene(np.random.default_rng(7))
    c = draw_scene(np.random.default_rng(8))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("label", range(5))
def test_single_object_box_is_the_extent_of_its_pixels(label):
    scene = draw_scene(np.random.default_rng(label), 48, labels=[label])
    ys, xs = np.nonzero(scene.mask)
    assert scene.labels.tolist() == [label]
    assert set(np.unique(scene.mask).tolist()) == {0, label + 1}
    assert scene.boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    assert scene.boxes.dtype == np.float32 and scene.labels.dtype == np.int64


def test_multi_object_boxes_touch_their_own_pixels_on_every_side():
    for seed in range(30):
        scene = draw_scene(np.random.default_rng(seed), 64, n_objects=(2, 4))
        assert 1 <= len(scene.labels) <= 4
        assert scene.image.size == (64, 64) and scene.mask.shape == (64, 64)
        for (x1, y1, x2, y2), label in zip(scene.boxes.astype(int), scene.labels):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            inside = scene.mask[y1:y2, x1:x2] == label + 1
            # The object's extreme visible pixels lie on the box's four edges.
            assert inside[:, 0].any() and inside[:, -1].any() and inside[0].any() and inside[-1].any()


def test_occlusion_rule_keeps_sixty_percent_of_each_object():
    areas, visible = np.array([10, 20]), np.array([10, 15])  # object 1 already lost 5 of its 20 pixels
    assert not _occludes_too_much(np.array([1, 1, 1, 1, 0, 0]), visible, areas)  # object 0 keeps 6 of 10
    assert _occludes_too_much(np.array([1, 1, 1, 1, 1]), visible, areas)  # object 0 would keep only 5
    assert _occludes_too_much(np.array([2, 2, 2, 2]), visible, areas)  # object 1 would keep 11 < 12
    assert not _occludes_too_much(np.array([0, 0, 0]), np.zeros(0, int), np.zeros(0, int))  # empty canvas


def test_crowded_scenes_drop_rather_than_bury_objects():
    counts = [len(draw_scene(np.random.default_rng(seed), 48, n_objects=(4, 4), min_size=20, max_size=24).labels)
              for seed in range(20)]
    assert min(counts) >= 1 and max(counts) == 4 and sum(counts) < 80


def test_classification_items_balance_and_disjoint_splits():
    train = ShapesClassification("train", n=25, size=32, seed=0)
    val = ShapesClassification("val", n=25, size=32, seed=0)
    image, label = train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label == 3 and np.bincount(train.targets).tolist() == [5, 5, 5, 5, 5]
    same = (train.images[:, None] == val.images[None]).flatten(2).all(2)
    assert not bool(same.any())
    # Item i depends only on (seed, split, i), not on n.
    assert torch.equal(ShapesClassification("train", n=5, size=32, seed=0).images, train.images[:5])
    assert not torch.equal(ShapesClassification("train", n=5, size=32, seed=1).images, train.images[:5])


def test_detection_item_follows_the_contract():
    dataset = ShapesDetection("val", n=6, size=64, seed=3)
    image, target = dataset[2]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    assert set(target) == {"boxes", "labels", "image_id"} and target["image_id"] == 2
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].shape == (len(target["labels"]), 4)
    assert dataset.masks.shape == (6, 64, 64)
    train_images = ShapesDetection("train", n=6, size=64, seed=3).images
    assert not torch.equal(train_images, dataset.images)


def test_thousand_scenes_in_under_two_seconds():
    torch.set_num_threads(1)
    start = time.process_time()  # CPU time: other jobs sharing the machine must not fail this test
    dataset = ShapesDetection("train", n=1000, size=64)
    elapsed = time.process_time() - start
    assert len(dataset) == 1000
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
