"""Data as users have it, and as a hostile or careless file gives it: the layouts labelling tools export (COCO json
beside images/, LabelImg's VOC and YOLO folders, Ultralytics' and Roboflow's yamls, ImageFolder split folders), the
splits cut from them (seeded, stratified where the labels allow, listed file by file), and the files that are refused
or skipped at set-up: names that leave the data root, duplicate COCO ids, decompression bombs, truncated JPEGs;
16-bit PNGs read to [0, 1]. Every dataset is written here in its real format."""
import json
import logging
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
import yaml
from PIL import Image

from cvlab.data.base import DetectionSubset, cut_splits
from cvlab.data.classification import ClassificationDataModule
from cvlab.data.detection import CocoDataset, DetectionDataModule, VOCDataset, YOLODataset
from cvlab.data.shapes import SHAPE_CLASSES
from cvlab.utils import images
from cvlab.utils.errors import UserError
from cvlab.utils.images import ImageCheck, check_images, open_image
from detection_files import shape_scenes, write_coco, write_coco_export, write_voc, write_yolo, write_yolo_files

BOMB = ("has 20000x20000 = 400,000,000 pixels, more than the 89,478,485 allowed (a decompression bomb?); "
        "data.max_image_pixels sets the limit")


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory, monkeypatch):
    """The image-check cache of these tests (cvlab.utils.images) in a folder of their own, not the user's."""
    folder = tmp_path_factory.mktemp("cvlab-cache")
    monkeypatch.setenv("CVLAB_CACHE", str(folder))
    return folder / "image_checks"


@pytest.fixture(scope="module")
def scenes():
    """20 one-object scenes, four of each class (80 x 64 images)."""
    return shape_scenes([(k % 5,) for k in range(20)])


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width x height`` (8-bit grey) but whose pixel data stops after one row: a few dozen
    bytes that cannot be decoded, so only a check of the header refuses it by its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))
    return path


def _truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A noise JPEG less its last 100 bytes: ``Image.verify()`` passes it, decoding it fails."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-100])
    with Image.open(path) as image:
        image.verify()  # the reproduction: the old set-up check let this file through
    return path


def _write_pngs(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


def _stems(datamodule, split: str) -> list[str]:
    return [Path(name).stem for name in datamodule.split_files()[split]]


def _check_cut(datamodule, scenes, sizes: tuple[int, int, int]) -> None:
    """Split sizes, disjoint splits covering every scene, and each image's boxes and labels as written."""
    files = datamodule.split_files()
    assert tuple(len(files[split]) for split in ("train", "val", "test")) == sizes
    assert tuple(len(getattr(datamodule, f"{split}_set")) for split in ("train", "val", "test")) == sizes
    stems = [Path(name).stem for split in ("train", "val", "test") for name in files[split]]
    assert sorted(stems) == sorted(stem for stem, *_ in scenes)
    by_stem = {stem: (boxes, labels) for stem, _, boxes, labels in scenes}
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_set")
        for i, name in enumerate(files[split]):
            boxes, labels = by_stem[Path(name).stem]
            annotation = dataset.annotation(i)
            assert torch.allclose(annotation.boxes, torch.from_numpy(boxes), atol=1e-3), name
            assert annotation.labels.tolist() == labels.tolist()
    assert datamodule.class_names == SHAPE_CLASSES


# ----------------------------------------------------------------------------------------------- names and ids
def test_coco_file_names_that_leave_the_data_root_are_refused(tmp_path, scenes, caplog):
    root = tmp_path / "export"
    write_coco_export(root, scenes[:3])
    outside = tmp_path / "outside.png"
    scenes[0][1].save(outside)  # a real image beside the root: reading it would succeed
    ann = root / "annotations" / "instances_default.json"
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "../../outside.png"  # images/../../outside.png
    data["images"][1]["file_name"] = str(outside)  # absolute
    data["images"] += [{"id": 4, "file_name": "..\\..\\outside.png"}, {"id": 5, "file_name": "a/../../../outside.png"}]
    ann.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="cvlab.data.detection"):
        dataset = CocoDataset(root / "images", ann)
    assert [record.path for record in dataset.records] == [root / "images" / "img2.png"]
    refused = [problem for problem in dataset.problems if problem.endswith("leaves the data root, refused")]
    assert len(refused) == 4 and "'../../outside.png'" in refused[0]
    lines = [r.getMessage() for r in caplog.records if "leave the data root" in r.getMessage()]
    assert len(lines) == 1 and "4 image file name(s) that leave the data root refused" in lines[0]


def test_voc_and_yolo_file_names_that_leave_the_data_root_are_refused(tmp_path, scenes):
    outside = tmp_path / "outside.png"
    scenes[0][1].save(outside)
    voc = tmp_path / "voc"
    write_voc(voc, "train", scenes[:2])
    xml = voc / "Annotations" / "img0.xml"
    xml.write_text(xml.read_text().replace("<filename>img0.jpg</filename>", "<filename>../../outside.png</filename>"))
    dataset = VOCDataset(voc, "train", SHAPE_CLASSES)
    assert [record.path.name for record in dataset.records] == ["img1.jpg"]
    assert dataset.problems == [f"{xml}: file name '../../outside.png' leaves the data root, refused"]

    yolo = tmp_path / "yolo"
    write_yolo(yolo, "train", scenes[:1])
    (yolo / "train.txt").write_text(f"images/train/img0.png\n../outside.png\n{outside}\n")
    config = yaml.safe_load((yolo / "data.yaml").read_text())
    (yolo / "data.yaml").write_text(yaml.safe_dump({**config, "train": "train.txt"}))
    dataset = YOLODataset.from_yaml(yolo / "data.yaml")
    assert [record.path for record in dataset.records] == [yolo / "images" / "train" / "img0.png"]
    assert sum("leaves the data root, refused" in problem for problem in dataset.problems) == 2


def test_duplicate_coco_image_ids_are_an_error(tmp_path, scenes):
    write_coco(tmp_path, "train2017", scenes[:3])
    ann = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["images"][1]["id"] = data["images"][0]["id"]  # before: img1 silently took img0's boxes
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image id 1 is used twice in 'images' \('img0.png' and 'img1.png'\)"):
        CocoDataset(tmp_path / "train2017", ann)


# ----------------------------------------------------------------------------------------------- image files
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200
    decoded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda image: decoded.append(image))
    assert check_images([bomb]) == {bomb: ImageCheck(20000, 20000, BOMB)}
    with pytest.raises(UserError, match=rf"^refusing image {bomb}: it has 20000x20000 = 400,000,000 pixels"):
        open_image(bomb, "RGB")
    assert decoded == []  # refused from the header: not a pixel was decoded
    # Over PIL's limit, where PIL itself only warns and decodes: refused too.
    large = _png_header_only(tmp_path / "large.png", 9500, 9500)
    assert check_images([large])[large].problem.startswith("has 9500x9500 = 90,250,000 pixels, more than the "
                                                           "89,478,485 allowed")
    assert decoded == []


def test_the_pixel_limit_is_configurable(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200)).save(small)  # 60,000 pixels
    assert check_images([small], max_pixels=59_999)[small].problem.startswith("has 300x200 = 60,000 pixels")
    assert check_images([small], max_pixels=60_000)[small] == ImageCheck(300, 200, None)
    with pytest.raises(UserError, match="has 300x200 = 60,000 pixels, more than the 59,999 allowed"):
        open_image(small, "L", max_pixels=59_999)
    # cvlab's limit replaces PIL's: above PIL's own (which would warn, or refuse at twice it) when set so.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_images([small], max_pixels=60_000)[small] == ImageCheck(300, 200, None)
        assert open_image(small, "L", max_pixels=60_000).size == (300, 200)
    assert PIL.Image.MAX_IMAGE_PIXELS == 1_000  # PIL's setting is left as it was


def test_detection_datamodule_skips_images_over_data_max_image_pixels(tmp_path, scenes, caplog):
    write_yolo_files(tmp_path / "images", tmp_path / "labels", scenes[:8])
    (tmp_path / "classes.txt").write_text("\n".join(SHAPE_CLASSES))
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "big.png")  # 20,000 pixels; the scenes have 5,120
    _png_header_only(tmp_path / "images" / "bomb.png", 20000, 20000)
    with caplog.at_level(logging.WARNING, logger="cvlab.data.detection"):
        datamodule = DetectionDataModule("yolo", root=str(tmp_path), image_size=32, max_image_pixels=10_000)
        datamodule.setup()
    assert sum(len(files) for files in datamodule.split_files().values()) == 8
    pool = datamodule.train_set.dataset
    assert len(pool.problems) == 2
    assert {problem.split(" has ")[0].rsplit("/", 1)[-1] for problem in pool.problems} == {"big.png", "bomb.png"}
    assert "2 image(s) missing, undecodable or too large skipped" in caplog.text
    default = DetectionDataModule("yolo", root=str(tmp_path), image_size=32)
    default.setup()
    assert sum(len(files) for files in default.split_files().values()) == 9  # only the bomb is over PIL's limit
    for bad in ({"source": "shapes_det", "max_image_pixels": 10},
                {"source": "yolo", "root": str(tmp_path), "max_image_pixels": 0}):
        with pytest.raises(UserError, match="data.max_image_pixels"):
            DetectionDataModule(**bad)


def test_truncated_images_are_skipped_at_set_up_not_in_epoch_zero(tmp_path, scenes):
    for name in ("cat", "dog"):
        _write_pngs(tmp_path / "folder" / name, 5, seed=len(name))
    broken = _truncated_jpeg(tmp_path / "folder" / "cat" / "broken.jpg")
    datamodule = ClassificationDataModule("imagefolder", root=str(tmp_path / "folder"), image_size=8, seed=0)
    datamodule.setup()
    assert len(datamodule.problems) == 1
    assert datamodule.problems[0].startswith(f"{broken}: image cannot be decoded (OSError: image file is truncated")
    assert sum(len(dataset) for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set)) == 10
    for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        assert all(dataset[i][0].shape == (3, 8, 8) for i in range(len(dataset)))  # every item decodes

    write_coco_export(tmp_path / "coco", scenes[:10])
    cut = tmp_path / "coco" / "images" / "img3.png"
    cut.write_bytes(cut.read_bytes()[:-60])  # an interrupted copy
    detection = DetectionDataModule("coco", root=str(tmp_path / "coco"), image_size=32, seed=0)
    detection.setup()
    assert sum(len(files) for files in detection.split_files().values()) == 9
    assert "img3" not in _stems(detection, "train") + _stems(detection, "val") + _stems(detection, "test")
    problems = detection.train_set.problems
    assert len(problems) == 1 and "img3.png cannot be decoded" in problems[0] and problems[0].endswith("image skipped")
    for dataset in (detection.train_set, detection.val_set, detection.test_set):
        assert all(dataset[i][0].shape == (3, 32, 32) for i in range(len(dataset)))


def test_image_checks_are_cached_by_path_mtime_and_size(tmp_path, image_check_cache, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4 + i, 4)).save(paths[-1])
    broken = _truncated_jpeg(tmp_path / "broken.jpg")
    decoded = []
    decode = images._decode
    monkeypatch.setattr(images, "_decode", lambda path, limit: (decoded.append(path.name), decode(path, limit))[1])
    first = check_images([*paths, broken])
    assert sorted(decoded) == ["0.png", "1.png", "2.png", "broken.jpg"] and len(list(image_check_cache.iterdir())) == 1
    assert first[paths[2]] == ImageCheck(6, 4, None) and first[broken].problem.startswith("cannot be decoded")
    decoded.clear()
    assert check_images([*paths, broken]) == first and decoded == []  # a re-run decodes nothing
    Image.new("RGB", (9, 4)).save(paths[1])  # changed: new size and mtime
    again = check_images([*paths, broken])
    assert decoded == ["1.png"] and again[paths[1]] == ImageCheck(9, 4, None)


def test_16_bit_pngs_are_scaled_to_the_unit_range_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 16).round().astype(np.uint16)  # 0, 4369, ..., 65535
    gradient = np.tile(values, (16, 1))
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(gradient).save(tmp_path / "folder" / name / f"{i}.png")
    with Image.open(tmp_path / "folder" / "a" / "0.png") as image:
        assert image.mode == "I;16"
    expected = values / 65535
    grey = np.asarray(open_image(tmp_path / "folder" / "a" / "0.png", "L"))
    assert grey[0].tolist() == [17 * k for k in range(16)]  # 4369 k * 255 / 65535; before: [0, 255, 255, ...]
    datamodule = ClassificationDataModule("imagefolder", root=str(tmp_path / "folder"), in_chans=1, image_size=16,
                                          seed=0)
    datamodule.setup()
    image, _ = datamodule.val_set[0]
    restored = image[0] * 0.25 + 0.5  # undo the generic Normalize(0.5, 0.25)
    np.testing.assert_allclose(restored[0].numpy(), expected, atol=0.5 / 255 + 1e-6)

    Image.fromarray(gradient).save(tmp_path / "deep.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "deep.png"}], "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4]}]}))
    pixels, target = CocoDataset(tmp_path, tmp_path / "ann.json")[0]
    assert pixels.shape == (3, 16, 16) and target["boxes"].tolist() == [[2, 2, 6, 6]]
    np.testing.assert_allclose(pixels[1, 5].numpy(), expected, atol=0.5 / 255 + 1e-6)


# ----------------------------------------------------------------------------------------------- layouts
def test_a_cvat_coco_export_without_splits_is_found_and_cut(tmp_path, scenes, caplog):
    write_coco_export(tmp_path, scenes)  # images/ + annotations/instances_default.json
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = DetectionDataModule("coco", root=str(tmp_path), image_size=40, seed=1)
        datamodule.setup()
    # ceil(0.15 x 20) = 3 each; three images cannot hold five classes, so the cut is not stratified.
    assert ("data coco: one annotation file annotations/instances_default.json, no splits: cut val (15 %) and test "
            "(15 %) from the 20 images, seed 1; 14 / 3 / 3 train / val / test images") in caplog.text
    _check_cut(datamodule, scenes, (14, 3, 3))
    assert all(name.startswith("images/img") and name.endswith(".png") for name in datamodule.split_files()["val"])
    assert isinstance(datamodule.val_set, DetectionSubset) and datamodule.val_set.transforms is not None
    # Seeded: the same seed cuts the same files, another seed others.
    again = DetectionDataModule("coco", root=str(tmp_path), image_size=40, seed=1)
    assert again.split_files() == datamodule.split_files()
    assert DetectionDataModule("coco", root=str(tmp_path), seed=2).split_files() != datamodule.split_files()
    # The run directory's splits/<split>.txt.
    written = datamodule.write_split_files(tmp_path / "run" / "splits")
    assert [path.name for path in written] == ["train.txt", "val.txt", "test.txt"]
    assert (tmp_path / "run" / "splits" / "val.txt").read_text().splitlines() == datamodule.split_files()["val"]
    counts = np.bincount([scene[3][0] for scene in scenes if scene[0] in _stems(datamodule, "train")], minlength=5)
    assert datamodule.info.class_counts == tuple(counts.tolist())


def test_a_label_studio_export_and_data_ann(tmp_path, scenes):
    write_coco_export(tmp_path / "ls", scenes, ann_file="result.json", file_prefix="images/")
    datamodule = DetectionDataModule("coco", root=str(tmp_path / "ls"), image_size=40)
    _check_cut(datamodule, scenes, (14, 3, 3))
    # Two jsons: the user picks one with data.ann.
    root = tmp_path / "two"
    write_coco_export(root, scenes)
    shutil.copy(root / "annotations" / "instances_default.json", root / "annotations" / "person_keypoints.json")
    with pytest.raises(UserError, match=r"holds 2 COCO json files \(annotations/instances_default.json, "
                                        r"annotations/person_keypoints.json\).*data.ann=FILE"):
        DetectionDataModule("coco", root=str(root)).setup()
    datamodule = DetectionDataModule("coco", root=str(root), ann="annotations/person_keypoints.json", image_size=40)
    _check_cut(datamodule, scenes, (14, 3, 3))
    with pytest.raises(UserError, match="data.ann=nowhere.json: no such file"):
        DetectionDataModule("coco", root=str(root), ann="nowhere.json").setup()
    with pytest.raises(UserError, match="data.ann names a COCO json"):
        DetectionDataModule("voc", root=str(root), ann="x.json")


def test_a_labelimg_voc_folder_without_imagesets_splits_itself(tmp_path, scenes, caplog):
    write_voc(tmp_path, None, scenes)
    assert not (tmp_path / "ImageSets").exists()
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = DetectionDataModule("voc", root=str(tmp_path), image_size=40, class_names=list(SHAPE_CLASSES))
        datamodule.setup()
    assert "data voc: Annotations/ without ImageSets/Main/, no splits: cut val (15 %) and test (15 %)" in caplog.text
    _check_cut(datamodule, scenes, (14, 3, 3))
    assert datamodule.split_files()["test"][0].startswith("JPEGImages/")
    # A stale <filename> (the image was renamed) falls back to the xml's stem.
    xml = tmp_path / "Annotations" / "img4.xml"
    xml.write_text(xml.read_text().replace("<filename>img4.jpg", "<filename>IMG_0004.JPG"))
    assert len(VOCDataset(tmp_path, None, SHAPE_CLASSES)) == 20


def test_a_yolo_folder_without_a_yaml_names_classes_from_classes_txt_or_data_class_names(tmp_path, scenes, caplog):
    write_yolo_files(tmp_path / "images", tmp_path / "labels", scenes)
    with pytest.raises(UserError, match="no dataset yaml and no classes.txt: name the classes with data.class_names"):
        DetectionDataModule("yolo", root=str(tmp_path)).setup()
    named = DetectionDataModule("yolo", root=str(tmp_path), image_size=40, class_names=list(SHAPE_CLASSES))
    _check_cut(named, scenes, (14, 3, 3))
    (tmp_path / "labels" / "classes.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")  # LabelImg writes it here
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        listed = DetectionDataModule("yolo", root=str(tmp_path), image_size=40)
        listed.setup()
    assert "data yolo: images/ and labels/ without a dataset yaml, no splits: cut val" in caplog.text
    _check_cut(listed, scenes, (14, 3, 3))
    assert listed.split_files() == named.split_files()
    with pytest.raises(UserError, match=r"data.class_names=\['a', 'b'\] but .*classes.txt lists"):
        DetectionDataModule("yolo", root=str(tmp_path), class_names=["a", "b"]).setup()
    # LabelImg's YOLO mode: images with their .txt beside them.
    flat = tmp_path / "flat"
    write_yolo_files(flat, flat, scenes)
    (flat / "classes.txt").write_text("\n".join(SHAPE_CLASSES))
    _check_cut(DetectionDataModule("yolo", root=str(flat), image_size=40), scenes, (14, 3, 3))


def test_the_ultralytics_layout_with_its_own_data_yaml(tmp_path, scenes, caplog):
    write_yolo(tmp_path, "train", scenes[:14])
    write_yolo(tmp_path, "val", scenes[14:])
    # As Ultralytics ships it: `path` relative to its own datasets folder, an empty test entry, names as a dict.
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({
        "path": "coco8", "train": "images/train", "val": "images/val", "test": None,
        "names": dict(enumerate(SHAPE_CLASSES))}))
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = DetectionDataModule("yolo", root=str(tmp_path), image_size=40, seed=0)
        datamodule.setup()
    # ceil(0.15 x 14) = 3 test images cut from the 14 training ones; val/ is kept.
    assert ("no test split in the files: cut test (15 %) from the 14 train images, seed 0; 11 / 6 / 3 train / val / "
            "test images") in caplog.text
    _check_cut(datamodule, scenes, (11, 6, 3))
    assert sorted(_stems(datamodule, "val")) == sorted(stem for stem, *_ in scenes[14:])
    assert all(name.startswith("images/train/") for name in datamodule.split_files()["test"])
    with pytest.raises(UserError, match=r"data.class_names=\['a', 'b'\] but the files name the classes"):
        DetectionDataModule("yolo", root=str(tmp_path), class_names=["a", "b"]).setup()


def test_a_roboflow_yolo_export(tmp_path, scenes):
    for split, part in (("train", scenes[:10]), ("valid", scenes[10:15]), ("test", scenes[15:])):
        write_yolo_files(tmp_path / split / "images", tmp_path / split / "labels", part)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({
        "train": "../train/images", "val": "../valid/images", "test": "../test/images", "nc": 5,
        "names": list(SHAPE_CLASSES)}))
    datamodule = DetectionDataModule("yolo", root=str(tmp_path / "data.yaml"), image_size=40)
    _check_cut(datamodule, scenes, (10, 5, 5))
    assert _stems(datamodule, "val") == [stem for stem, *_ in scenes[10:15]]


def test_a_detection_cut_is_stratified_by_each_images_rarest_class_where_it_can_be(tmp_path):
    scenes = shape_scenes([(k % 5,) for k in range(40)])
    labels = [k % 5 for k in range(40)]
    _, val, test = cut_splits(40, [0.15, 0.15], seed=0)
    assert min(len({labels[i] for i in val}), len({labels[i] for i in test})) < 5  # unstratified, a class is missed
    write_coco_export(tmp_path, scenes)
    datamodule = DetectionDataModule("coco", root=str(tmp_path), image_size=40, seed=0)
    datamodule.setup()
    _check_cut(datamodule, scenes, (28, 6, 6))
    for split in ("val", "test"):
        dataset = getattr(datamodule, f"{split}_set")
        assert {int(dataset.annotation(i).labels[0]) for i in range(len(dataset))} == set(range(5))


def test_imagefolder_split_folders_including_roboflows_valid(tmp_path, caplog):
    for split, count in (("train", 4), ("valid", 2), ("test", 1)):
        for name in ("cat", "dog"):
            _write_pngs(tmp_path / split / name, count, seed=count)
    with caplog.at_level(logging.INFO):
        datamodule = ClassificationDataModule("imagefolder", root=str(tmp_path), image_size=4, seed=0)
        datamodule.setup()
    # Before: valid/ was not a split, so train/, valid/ and test/ became three classes.
    assert datamodule.class_names == ["cat", "dog"]
    assert "train/ and valid/ and test/: the folders are the splits" in caplog.text
    files = datamodule.split_files()
    assert {split: len(names) for split, names in files.items()} == {"train": 8, "val": 4, "test": 2}
    assert files["val"][0] == "valid/cat/img_0.png" and all(name.startswith("train/") for name in files["train"])


def test_imagefolder_cut_splits_are_listed(tmp_path):
    for name in ("cat", "dog"):
        _write_pngs(tmp_path / name, 10, seed=len(name))
    datamodule = ClassificationDataModule("imagefolder", root=str(tmp_path), image_size=4, seed=3)
    files = datamodule.split_files()
    assert [len(files[split]) for split in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(sum(files.values(), [])) == sorted(f"{c}/img_{i}.png" for c in ("cat", "dog") for i in range(10))
    assert files["val"] == [Path(path).relative_to(tmp_path).as_posix() for path, _ in datamodule.val_set.base.samples]
    assert ClassificationDataModule("imagefolder", root=str(tmp_path), image_size=4, seed=3).split_files() == files
    assert ClassificationDataModule("digits", image_size=8, in_chans=1).split_files() == {}


@pytest.mark.slow  # two short trainings, about 10 s each on two cores
@pytest.mark.parametrize("layout", ["coco_export", "yolo_folder"])
def test_train_and_test_on_an_export_without_splits(tmp_path, scenes, layout):
    from conftest import FAST
    from cvlab.engine import run_train
    from cvlab.utils.config import compose

    root = tmp_path / "data"
    if layout == "coco_export":
        write_coco_export(root, scenes)
        data = ["data=coco"]
    else:
        write_yolo_files(root / "images", root / "labels", scenes)
        data = ["data=yolo", f"data.class_names=[{','.join(SHAPE_CLASSES)}]"]
    cfg = compose("train", [*FAST, "model=yolov1", "task=detection", "model.width=0.125", "data.image_size=64",
                            "data.batch_size=4", "data.num_workers=0", *data, f"data.root={root}",
                            f"paths.output_dir={tmp_path / 'run'}"])
    metrics, objects = run_train(cfg)
    assert 0.0 <= metrics["test/map_50"] <= 1.0 and 0.0 <= metrics["val/map_50"] <= 1.0
    datamodule = objects["datamodule"]
    assert [len(files) for files in datamodule.split_files().values()] == [14, 3, 3]
    assert datamodule.info.class_names == SHAPE_CLASSES
    for split, files in datamodule.split_files().items():  # the run directory lists the files of each split
        assert (tmp_path / "run" / "splits" / f"{split}.txt").read_text().splitlines() == files


def test_a_training_run_lists_the_files_of_each_split_it_cut(tmp_path, train_cfg):
    from cvlab.engine import run_train

    for name in ("cat", "dog"):
        _write_pngs(tmp_path / "data" / name, 10, seed=len(name))
    out = tmp_path / "run"
    _, objects = run_train(train_cfg("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=8",
                                     "data.num_workers=0", "model=resnet18", out=out))
    files = objects["datamodule"].split_files()
    assert [len(files[split]) for split in ("train", "val", "test")] == [14, 3, 3]
    for split in ("train", "val", "test"):
        assert (out / "splits" / f"{split}.txt").read_text().splitlines() == files[split]
