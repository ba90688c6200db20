"""Detection data: COCO/VOC/YOLO readers agree on the same files, bad annotations are reported, the v2 pipeline
keeps boxes on their objects, collate and the datamodule follow the detection contract: three splits (the files'
own, or cut from the training split), DataInfo with box counts, the sampler plug-in."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cvlab.data.base import DataInfo, DetectionDataset, DetectionSubset
from cvlab.data.detection import (
    CocoDataset,
    DetectionDataModule,
    Letterbox,
    VOCDataset,
    YOLODataset,
    detection_collate,
    detection_transforms,
    unletterbox_boxes,
    voc_class_names,
)
from cvlab.data.shapes import SHAPE_CLASSES, ShapesDetection, draw_scene
from cvlab.utils.errors import UserError
from detection_files import shape_scenes as _scenes
from detection_files import write_coco as _write_coco
from detection_files import write_voc as _write_voc
from detection_files import write_yolo as _write_yolo


@pytest.fixture(scope="module")
def datasets_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    scenes = _scenes()
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        _write_coco(root / "coco", coco_split, scenes)
        _write_voc(root / "voc" / "VOC2012", split, scenes)
        _write_yolo(root / "yolo", split, scenes)
    return root, scenes


def test_three_formats_read_back_the_same_boxes_and_labels(datasets_on_disk):
    root, scenes = datasets_on_disk
    coco = CocoDataset(root / "coco" / "train2017", root / "coco" / "annotations" / "instances_train2017.json")
    voc = VOCDataset(root / "voc" / "VOC2012", "train", class_names=SHAPE_CLASSES)
    assert voc_class_names(root / "voc" / "VOC2012") == tuple(sorted(SHAPE_CLASSES))  # discovered: sorted
    yolo = YOLODataset.from_yaml(root / "yolo" / "data.yaml", "train")
    for dataset in (coco, voc, yolo):
        assert dataset.class_names == SHAPE_CLASSES and dataset.num_classes == 5
        assert len(dataset) == 3 and dataset.problems == []
        for (_, _, boxes, labels), (tensor, target) in zip(scenes, (dataset[i] for i in range(3))):
            assert tensor.shape == (3, 64, 80) and tensor.dtype == torch.float32
            assert torch.allclose(target["boxes"], torch.from_numpy(boxes), atol=1e-3)
            assert target["labels"].tolist() == labels.tolist()
    assert [coco[i][1]["image_id"] for i in range(3)] == [1, 2, 3]
    # PNG is lossless: the COCO image is the drawn one, pixel for pixel.
    assert torch.equal((coco[0][0] * 255).round().byte(), torch.from_numpy(np.array(scenes[0][1])).permute(2, 0, 1))


def test_bad_coco_annotations_are_reported_and_skipped(tmp_path, caplog):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0},   # good
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [40, 30, 20, 20], "iscrowd": 0},   # partly out: clipped
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [60, 5, 10, 10], "iscrowd": 0},    # fully out
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},      # zero width
        {"id": 5, "image_id": 1, "category_id": 99, "bbox": [5, 5, 10, 10], "iscrowd": 0},    # unknown class
        {"id": 6, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 1},     # crowd: ignored
        {"id": 7, "image_id": 2, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 0},     # image missing
    ]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40},
                   {"id": 2, "file_name": "missing.png", "width": 50, "height": 40}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}))
    with caplog.at_level(logging.WARNING, logger="cvlab.data.detection"):
        dataset = CocoDataset(tmp_path, tmp_path / "ann.json")
    assert dataset.class_names == ("a", "b") and len(dataset) == 1
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [40, 30, 50, 40]]
    assert target["labels"].tolist() == [0, 0]
    assert len(dataset.problems) == 5
    for needle in ("clipped", "outside the 50x40 image, skipped", "zero or negative size", "unknown category id 99",
                   "missing.png not found"):
        assert sum(needle in p for p in dataset.problems) == 1, needle
    # One line per kind of problem, with its count and its first instance.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "4 annotation problem(s) fixed or skipped" in warnings[0] and "unknown category id 99" in warnings[0]
    assert "1 image(s) missing, undecodable or too large skipped" in warnings[1] and "missing.png" in warnings[1]


def test_bad_voc_and_yolo_annotations_are_reported(tmp_path):
    voc = tmp_path / "voc"
    _write_voc(voc, "train", [("x", Image.new("RGB", (40, 30)), np.float32([[2, 2, 12, 12]]), np.int64([1]))])
    xml = voc / "Annotations" / "x.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>dog</name><bndbox><xmin>1</xmin>"
                                           "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"))
    dataset = VOCDataset(voc, "train", class_names=SHAPE_CLASSES)
    assert dataset[0][1]["boxes"].tolist() == [[2, 2, 12, 12]]
    assert dataset.problems == [f"{xml}: object 1 has unknown class 'dog', skipped"]
    assert voc_class_names(voc) == ("dog", "square")

    yolo = tmp_path / "yolo"
    _write_yolo(yolo, "train", [("y", Image.new("RGB", (40, 20)), np.float32([[4, 2, 12, 10]]), np.int64([2]))])
    label_file = yolo / "labels" / "train" / "y.txt"
    label_file.write_text(label_file.read_text() + "7 0.5 0.5 0.1 0.1\n0 0.5 0.5\n1 0.9 0.5 0.4 0.2\n"
                          "3 0.1 0.1 0.3 0.1 0.2 0.4\n")
    dataset = YOLODataset.from_yaml(yolo / "data.yaml", "train")
    _, target = dataset[0]
    # The last two lines: a box reaching past the right edge (clipped) and a triangle polygon (its bounding box).
    assert torch.allclose(target["boxes"], torch.tensor([[4, 2, 12, 10], [28, 8, 40, 12], [4, 2, 12, 8.]]))
    assert target["labels"].tolist() == [2, 1, 3]
    assert len(dataset.problems) == 3
    assert dataset.problems[0] == f"{label_file}:2: unknown class 7 (the data names 5), skipped"
    assert dataset.problems[1].startswith(f"{label_file}:3: expected 'cls cx cy w h'")
    assert "clipped" in dataset.problems[2]


def test_unreadable_annotation_files_raise_user_errors_naming_them(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        CocoDataset(tmp_path, tmp_path / "broken.json")
    voc = tmp_path / "voc"
    _write_voc(voc, "train", [("z", Image.new("RGB", (8, 8)), np.float32([[1, 1, 4, 4]]), np.int64([0]))])
    (voc / "Annotations" / "z.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match="z.xml"):
        VOCDataset(voc, "train", class_names=SHAPE_CLASSES)
    (tmp_path / "data.yaml").write_text("names: [a, b\n")
    with pytest.raises(UserError, match="data.yaml"):
        YOLODataset.from_yaml(tmp_path / "data.yaml")
    with pytest.raises(UserError, match="ImageSets"):
        VOCDataset(tmp_path, "train")


def _pixel_box(image: torch.Tensor) -> list[float] | None:
    """Tight xyxy box of the bright (object) pixels of a white-on-black image; grey padding is 0.45."""
    ys, xs = torch.nonzero(image.mean(0) > 0.6, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_train_pipeline_keeps_boxes_tight_on_the_shape_pixels():
    scene = draw_scene(np.random.default_rng(5), 64, labels=[3], clutter=False)
    white_on_black = np.zeros((64, 80, 3), np.uint8)  # not square: the letterbox pads top and bottom
    white_on_black[:, 8:72][scene.mask > 0] = 255
    image = tv_tensors.Image(torch.from_numpy(white_on_black).permute(2, 0, 1))
    box = torch.from_numpy(scene.boxes + np.float32([8, 0, 8, 0]))
    pipeline = detection_transforms(image_size=96, train=True, color_jitter=0.0)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(64, 80)),
                  "labels": torch.tensor([3])}
        out, out_target = pipeline(image, target)
        assert out.shape == (3, 96, 96)
        expected = _pixel_box(out.float() / 255)
        if expected is None:  # pushed out of the frame: the box must be gone too
            assert len(out_target["boxes"]) == 0
            continue
        assert out_target["labels"].tolist() == [3]
        assert np.allclose(out_target["boxes"][0].tolist(), expected, atol=2.0), (seed, expected)
        seen.add(tuple(round(v) for v in out_target["boxes"][0].tolist()))
    assert len(seen) >= 6  # the jitter really moved the box


def test_train_pipeline_with_colour_jitter_moves_boxes_with_masks():
    scene = draw_scene(np.random.default_rng(9), 64, labels=[0])
    pipeline = detection_transforms(80, train=True, color_jitter=0.4)
    torch.manual_seed(1)
    image = tv_tensors.Image(torch.from_numpy(np.array(scene.image)).permute(2, 0, 1))
    target = {"boxes": tv_tensors.BoundingBoxes(scene.boxes, format="XYXY", canvas_size=(64, 64)),
              "labels": torch.tensor([0]), "masks": tv_tensors.Mask(torch.from_numpy(scene.mask > 0)[None])}
    out, out_target = pipeline(image, target)
    ys, xs = torch.nonzero(out_target["masks"][0], as_tuple=True)
    mask_box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert np.allclose(out_target["boxes"][0].tolist(), mask_box, atol=2.0)
    letterboxed = Letterbox(80)(image)
    assert not torch.equal(out, letterboxed)


def test_letterbox_geometry_and_its_inverse():
    image = tv_tensors.Image(torch.zeros(3, 40, 80, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[0, 0, 10, 10], [60, 20, 80, 40]], format="XYXY", canvas_size=(40, 80))
    out, out_boxes = Letterbox(64)(image, boxes)
    # Scale 64/80 = 0.8: 40 x 80 -> 32 x 64, padded by 16 rows above and below with grey 114.
    assert out.shape == (3, 64, 64) and out[0, 0, 0].item() == 114 and out[0, 16, 0].item() == 0
    assert out_boxes.tolist() == [[0, 16, 8, 24], [48, 32, 64, 48]]
    assert unletterbox_boxes(out_boxes.as_subclass(torch.Tensor), 40, 80, 64).tolist() == boxes.tolist()


def test_collate_stacks_or_pads_to_the_largest_image():
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 0}
    images, targets = detection_collate([(torch.ones(3, 4, 6), target), (torch.ones(3, 5, 3), target)])
    assert images.shape == (2, 3, 5, 6) and len(targets) == 2 and targets[1] is target
    assert images[0, 0, 4, 0].item() == pytest.approx(114 / 255) and images[1, 0, 4, 2].item() == 1.0
    assert images[1, 0, 0, 3].item() == pytest.approx(114 / 255)


def test_datamodule_on_embedded_shapes():
    datamodule = DetectionDataModule("shapes_det", image_size=48, batch_size=2, train_size=4, val_size=3, seed=5)
    assert datamodule.num_classes == 5 and datamodule.class_names == SHAPE_CLASSES
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (4, 3, 3)
    # Train and validation scenes are the ones drawn before the test split existed (benchmarks were run on them).
    for split, dataset in (("train", datamodule.train_set), ("val", datamodule.val_set)):
        drawn = ShapesDetection(split, len(dataset), 48, seed=5)
        assert torch.equal(dataset.images, drawn.images) and all(map(torch.equal, dataset.boxes, drawn.boxes))
    assert not torch.equal(datamodule.test_set.images, datamodule.val_set.images)
    labels = torch.cat(datamodule.train_set.labels)
    assert datamodule.info == DataInfo(num_classes=5, class_names=SHAPE_CLASSES, in_chans=3, image_size=48,
                                       class_counts=torch.bincount(labels, minlength=5).tolist())
    images, targets = next(iter(datamodule.train_dataloader()))
    assert images.shape == (2, 3, 48, 48) and len(targets) == 2
    for target in targets:
        assert target["boxes"].shape[1] == 4 and bool((target["boxes"] >= 0).all() & (target["boxes"] <= 48).all())
    assert len(datamodule.train_dataloader()) == 2 and len(datamodule.val_dataloader()) == 2
    test_ids = [t["image_id"] for _, batch in datamodule.test_dataloader() for t in batch]
    assert test_ids == [0, 1, 2]
    assert len(DetectionDataModule("shapes_det", train_size=2, val_size=2, test_size=5).info.class_counts) == 5


@pytest.mark.parametrize("source, subdir", [("coco", "coco"), ("voc", "voc/VOC2012"), ("yolo", "yolo")])
def test_datamodule_reads_each_file_format(datasets_on_disk, source, subdir):
    root, scenes = datasets_on_disk
    class_names = list(SHAPE_CLASSES) if source == "voc" else None  # VOC alone would sort discovered names
    datamodule = DetectionDataModule(source, root=str(root / subdir), image_size=40, batch_size=3, augment=False,
                                     class_names=class_names)
    datamodule.setup("fit")
    assert datamodule.class_names == SHAPE_CLASSES and datamodule.num_classes == 5
    images, targets = next(iter(datamodule.val_dataloader()))
    assert images.shape == (3, 3, 40, 40)
    # Letterbox 80 x 64 -> 40 x 32 (scale 0.5), padded by 4 rows at the top.
    expected = torch.from_numpy(scenes[1][2]) * 0.5 + torch.tensor([0, 4, 0, 4])
    assert torch.allclose(targets[1]["boxes"], expected, atol=1e-3)


def _renamed(prefix: str, scenes):
    return [(f"{prefix}{i}", image, boxes, labels) for i, (_, image, boxes, labels) in enumerate(scenes)]


@pytest.fixture(scope="module")
def three_splits_on_disk(tmp_path_factory):
    """Each format with train (3 scenes), val (2) and test (2 other scenes) splits of its own."""
    root = tmp_path_factory.mktemp("three_splits")
    splits = {"train": _scenes(), "val": _renamed("val", _scenes(((1, 2), (0, 3)), seed=200)),
              "test": _renamed("test", _scenes(((4,), (2, 0, 1)), seed=310))}
    for split, scenes in splits.items():
        _write_coco(root / "coco", f"{split}2017", scenes)
        _write_voc(root / "voc", split, scenes)
        _write_yolo(root / "yolo", split, scenes)
    return root, splits


@pytest.mark.parametrize("source", ["coco", "voc", "yolo"])
def test_datamodule_keeps_the_splits_the_files_ship(three_splits_on_disk, source, caplog):
    root, splits = three_splits_on_disk
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = DetectionDataModule(source, root=str(root / source), image_size=40, augment=False,
                                         class_names=list(SHAPE_CLASSES) if source == "voc" else None)
        datamodule.setup()
    assert "the files ship the splits" in caplog.text and "3 / 2 / 2 train / val / test images" in caplog.text
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_set")
        assert not isinstance(dataset, DetectionSubset) and len(dataset) == len(splits[split])
        for i, (_, image, boxes, labels) in enumerate(splits[split]):
            annotation = dataset.annotation(i)
            assert (annotation.height, annotation.width) == (image.height, image.width)
            assert torch.allclose(annotation.boxes, torch.from_numpy(boxes), atol=1e-3)
            assert annotation.labels.tolist() == labels.tolist()
    counts = np.bincount(np.concatenate([labels for *_, labels in splits["train"]]), minlength=5).tolist()
    assert datamodule.info.class_counts == tuple(counts)


@pytest.mark.parametrize("source, subdir, absent", [("coco", "coco", "test2017"), ("voc", "voc/VOC2012", "test"),
                                                    ("yolo", "yolo", "test")])
def test_a_missing_test_split_is_cut_from_train(datasets_on_disk, source, subdir, absent, caplog):
    root, scenes = datasets_on_disk
    kwargs = dict(root=str(root / subdir), image_size=40, seed=3,
                  class_names=list(SHAPE_CLASSES) if source == "voc" else None)
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = DetectionDataModule(source, **kwargs)
        datamodule.setup()
    train_name = "train2017" if source == "coco" else "train"
    assert (f"no {absent} split in the files: cut test (15 %) from the 3 {train_name} images, seed 3; "
            "2 / 3 / 1 train / val / test images") in caplog.text
    train, test = datamodule.train_set, datamodule.test_set
    assert isinstance(train, DetectionSubset) and isinstance(test, DetectionSubset) and train.dataset is test.dataset
    assert sorted(train.indices + test.indices) == [0, 1, 2]
    # The test view has the evaluation pipeline, its source's training view the augmenting one.
    assert test.transforms is datamodule.val_set.transforms and train.transforms is not test.transforms
    assert len(datamodule.val_set) == 3 and not isinstance(datamodule.val_set, DetectionSubset)
    # The cut images are read as written: the test image is the scene it was cut from.
    index = test.indices[0]
    assert torch.allclose(test.annotation(0).boxes, torch.from_numpy(scenes[index][2]), atol=1e-3)
    again = DetectionDataModule(source, **kwargs)
    again.setup()
    assert again.test_set.indices == test.indices  # seeded


def test_only_a_training_split_gets_val_and_test_cut(tmp_path):
    scenes = _scenes([(k % 5,) for k in range(7)])
    _write_yolo(tmp_path, "train", scenes)
    datamodule = DetectionDataModule("yolo", root=str(tmp_path), image_size=40, val_fraction=0.2, test_fraction=0.3)
    datamodule.setup()
    # ceil(0.2 x 7) = 2 for validation, ceil(0.3 x 7) = 3 for test.
    parts = [datamodule.train_set.indices, datamodule.val_set.indices, datamodule.test_set.indices]
    assert [len(part) for part in parts] == [2, 2, 3] and sorted(sum(parts, [])) == list(range(7))
    assert datamodule.info.class_counts == tuple(np.bincount([scenes[i][3][0] for i in parts[0]],
                                                             minlength=5).tolist())


def test_datamodule_rejects_unknown_source_missing_root_and_bad_settings():
    with pytest.raises(UserError, match="shapes_det, coco, voc, yolo"):
        DetectionDataModule("kitti")
    with pytest.raises(UserError, match="data.root"):
        DetectionDataModule("coco")
    with pytest.raises(UserError, match="data.num_classes=3 but the data has 5 classes"):
        DetectionDataModule("shapes_det", num_classes=3, train_size=2, val_size=2).setup("fit")
    with pytest.raises(UserError, match="data.val_fraction=0.6 and data.test_fraction=0.4"):
        DetectionDataModule("shapes_det", val_fraction=0.6, test_fraction=0.4)
    with pytest.raises(UserError, match="data.mosaic is a probability"):
        DetectionDataModule("shapes_det", mosaic=1.5)


def test_detection_refuses_a_sampler_that_needs_class_labels():
    balanced = {"_target_": "cvlab.data.samplers.ClassBalancedSampler", "name": "class_balanced"}
    with pytest.raises(UserError, match=r"^sampler=class_balanced needs labels, which detection data does not "
                                        r"provide; leave sampler=none"):
        DetectionDataModule("shapes_det", sampler=balanced)
    uniform = {"_target_": "cvlab.data.samplers.EpochShuffleSampler", "name": "none"}
    datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=5, val_size=2, sampler=uniform, seed=4)
    datamodule.setup()
    sampler = datamodule.train_dataloader().sampler
    assert (type(sampler).__name__, sampler.num_samples, sampler.seed) == ("EpochShuffleSampler", 5, 4)


def test_the_base_reads_an_item_by_index_or_by_epoch_key():
    class Two(DetectionDataset):
        def __len__(self):
            return 2

        def load(self, index):
            return (torch.full((3, 4, 6), 255 * index, dtype=torch.uint8), torch.tensor([[0.0, 0, 2, 2]]),
                    torch.tensor([index]), 10 + index)

    dataset = Two(["a", "b"])
    image, target = dataset[1]
    keyed_image, keyed_target = dataset[(7, 1)]  # a plain dataset is the same in every epoch
    assert torch.equal(image, keyed_image) and image.max() == 1.0 and target["image_id"] == 11
    assert target["labels"].tolist() == keyed_target["labels"].tolist() == [1]
    annotation = dataset.annotation(0)
    assert (annotation.height, annotation.width) == (4, 6) and annotation.labels.tolist() == [0]
