"""Detection data: dataset readers for COCO json, Pascal VOC xml and YOLO txt, augmentation, collate, datamodule.

Inside cvlab a box is absolute ``xyxy`` in continuous pixel coordinates — pixel column ``j`` covers
``[j, j + 1)`` — and each reader converts its file format to that at load time:

- COCO json: ``bbox: [x, y, w, h]``, already continuous -> ``(x, y, x + w, y + h)``;
- Pascal VOC xml: ``xmin, ymin, xmax, ymax``, 1-based pixel indices, inclusive -> ``(xmin - 1, ymin - 1, xmax, ymax)``;
- YOLO txt: ``cls cx cy w h`` normalised by the image's width W and height H ->
  ``((cx - w / 2) W, (cy - h / 2) H, (cx + w / 2) W, (cy + h / 2) H)``.

The VOC rule is Detectron2's: a 1-based pixel ``k`` covers ``[k - 1, k)``, so only the minimum moves.
(torchvision's ``VOCDetection`` returns the raw xml values and leaves this choice to the user.) With it, the
same object written in the three formats reads back as the same box (a test checks this to 1e-3 px).

Bad annotations never become a silently wrong box. Each one — a box partly outside the image (clipped), fully
outside or of zero/negative size (skipped), an unknown class (skipped) — is recorded as ``"<file>: <what>"`` in
``dataset.problems``, and so is each skipped image: a file name from an annotation file that is absolute or climbs
out of the data root with ``..`` (refused, never opened), and an image file that is missing, does not decode to the
end or has more pixels than ``data.max_image_pixels``. Every image is decoded once when the dataset is indexed
(:func:`~cvlab.utils.images.check_images`, cached by path, mtime and size), so a truncated file is skipped at
set-up instead of crashing an epoch. The log gets one line per kind of problem, with its count. A json, xml or yaml
file that cannot be read at all, and a COCO json with two images of one id, raise
:class:`~cvlab.utils.errors.UserError` naming it.

Augmentation uses ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes`` (flip, scale/translate
jitter through ``RandomAffine``, ``ColorJitter``, ``SanitizeBoundingBoxes``). v2 has no letterbox resize, so
:class:`Letterbox` (YOLO's aspect-keeping resize + grey padding) is a small hand-written v2 transform. Mosaic and
mixup combine several images, so they are dataset wrappers (``data/wrappers.py``), applied to the training set.

Every source has train, val and test splits: the files' own where they ship them (COCO ``instances_<split>.json``,
VOC ``ImageSets/Main/<split>.txt``, the YOLO yaml's keys or ``images/<split>/`` folders). The layouts labelling
tools export without splits are read as one pool (a single COCO json beside ``images/``, VOC ``Annotations/``
without ``ImageSets/``, YOLO ``images/`` + ``labels/`` + ``classes.txt`` without a yaml). A missing val or test
split is cut from the training split or the pool, seeded (``data.val_fraction`` / ``data.test_fraction``), and the
run's log says so in one line; the datamodule's ``split_files()`` lists the files of every split.
"""
from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cvlab.data.base import (
    IMAGE_EXTENSIONS,
    LETTERBOX_GREY,
    Annotation,
    DataInfo,
    DetectionDataset,
    DetectionSubset,
    SplitDataModule,
    cut_note,
    cut_splits,
    letterbox_geometry,
)
from cvlab.data.proposals import attach_proposals
from cvlab.data.shapes import SHAPE_CLASSES, ShapesDetection
from cvlab.data.wrappers import MixUp, Mosaic
from cvlab.utils.errors import UserError
from cvlab.utils.images import ImageCheck, check_images, open_image
from cvlab.utils.validate import (
    check_image_size,
    check_loader,
    check_min_max,
    check_names,
    check_number,
    check_probability,
    check_scene_settings,
)

logger = logging.getLogger(__name__)

SOURCES = ("shapes_det", "coco", "voc", "yolo")
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------- datasets
@dataclass
class _Record:
    """One annotated image of a file dataset; boxes already checked and in xyxy pixels."""

    path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    height: int
    width: int


# What went wrong, by kind: each kind is one summary line in the log.
_REFUSED, _IMAGE, _ANNOTATION = "refused", "image", "annotation"
_SUMMARIES = {
    _REFUSED: "%d image file name(s) that leave the data root refused",
    _IMAGE: "%d image(s) missing, undecodable or too large skipped",
    _ANNOTATION: "%d annotation problem(s) fixed or skipped",
}


def escapes_root(name: str) -> bool:
    """Whether a file name read from an annotation file is absolute or climbs out of its folder with ``..``
    (``\\`` counts as a separator: Windows tools write it)."""
    posix = name.replace("\\", "/")
    if "\0" in name or PurePosixPath(posix).is_absolute() or PureWindowsPath(name).drive:
        return True
    depth = 0
    for part in PurePosixPath(posix).parts:  # "." parts are already dropped
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return False


class AnnotationCollector:
    """Checks image files and boxes, keeps the good records and words every problem for ``dataset.problems``.

    A reader names the images (:meth:`image_path`), has them decoded in one pass (:meth:`check`), then adds each
    with its objects (:meth:`add`).
    """

    def __init__(self, max_image_pixels: int | None = None) -> None:
        self.max_image_pixels = max_image_pixels
        self.records: list[_Record] = []
        self.problems: list[str] = []
        self.kinds: dict[str, list[str]] = {}
        self.checks: dict[Path, ImageCheck] = {}

    def report(self, source: str | Path, problem: str, kind: str = _ANNOTATION) -> None:
        self.problems.append(f"{source}: {problem}")
        self.kinds.setdefault(kind, []).append(self.problems[-1])

    def image_path(self, source: str | Path, folders: Sequence[Path], name: str) -> Path | None:
        """The file an annotation names: ``name`` in the first of ``folders`` that holds it (the first folder when
        none does; it is reported missing later). None, reported, when the name leaves the folders."""
        if escapes_root(name):
            self.report(source, f"file name {name!r} leaves the data root, refused", _REFUSED)
            return None
        relative = name.replace("\\", "/")
        candidates = [folder / relative for folder in folders]
        return next((path for path in candidates if path.is_file()), candidates[0])

    def check(self, paths: Sequence[Path]) -> None:
        """Decodes the images once, before they are added (cached: see :func:`~cvlab.utils.images.check_images`)."""
        self.checks.update(check_images([path for path in paths if path not in self.checks], self.max_image_pixels))

    def size(self, path: Path) -> tuple[int, int] | None:
        """``(width, height)`` of a checked image, None for a missing or broken one."""
        check = self.checks[path]
        return None if check.problem else (check.width, check.height)

    def add(self, source: str | Path, path: Path, image_id: int, width: int | None, height: int | None,
            objects: Sequence[tuple[Sequence[float], int]]) -> None:
        """Records one checked image with its ``(xyxy box, label)`` objects; ``source`` names the file reported.
        ``width`` and ``height`` are the annotation's (None or 0: the image's own)."""
        check = self.checks[path]
        if check.problem:
            self.report(source, f"image file {path} {check.problem}, image skipped", _IMAGE)
            return
        width, height = int(width or check.width), int(height or check.height)
        boxes, labels = [], []
        for k, (box, label) in enumerate(objects):
            x1, y1, x2, y2 = (float(v) for v in box)
            where = f"object {k} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                self.report(source, f"{where} is not finite, skipped")
            elif x2 <= x1 or y2 <= y1:
                self.report(source, f"{where} has zero or negative size, skipped")
            elif x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                self.report(source, f"{where} lies outside the {width}x{height} image, skipped")
            else:
                clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
                if clipped != (x1, y1, x2, y2):
                    self.report(source, f"{where} reaches outside the {width}x{height} image, clipped")
                boxes.append(clipped)
                labels.append(label)
        self.records.append(_Record(path, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                    np.asarray(labels, dtype=np.int64), image_id, height, width))


class _FileDetectionDataset(DetectionDataset):
    """A dataset of image files with checked annotations; logs one line per kind of problem."""

    def __init__(self, name: str, class_names: Sequence[str], collected: AnnotationCollector,
                 transforms: Callable | None):
        super().__init__(class_names, transforms)
        self.records = collected.records
        self.problems = collected.problems
        self.max_image_pixels = collected.max_image_pixels
        for kind, problems in collected.kinds.items():
            logger.warning(f"%s: {_SUMMARIES[kind]} (listed in dataset.problems), first: %s", name, len(problems),
                           problems[0])

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        record = self.records[index]
        pixels = F.pil_to_tensor(open_image(record.path, "RGB", self.max_image_pixels))
        return pixels, torch.from_numpy(record.boxes), torch.from_numpy(record.labels), record.image_id

    def annotation(self, index: int) -> Annotation:
        record = self.records[index]
        return Annotation(torch.from_numpy(record.boxes), torch.from_numpy(record.labels), record.height, record.width)


def read_coco(ann_file: Path) -> tuple[list[dict], list[tuple[int, str, Any, Any]], list[dict]]:
    """``(categories, images, annotations)`` of a COCO json: the categories sorted by id, each image as
    ``(id, file_name, width, height)`` (width and height None when the json omits them), the annotations as they
    are. A json that cannot be read, or two images of one id, raise :class:`~cvlab.utils.errors.UserError`."""
    try:
        data = json.loads(ann_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images = [(int(image["id"]), str(image["file_name"]), image.get("width"), image.get("height"))
                  for image in data["images"]]
        annotations = list(data.get("annotations", []))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read COCO annotations {ann_file}: {error!r}; expected a json with "
                        f"'images' (each with 'id' and 'file_name'), 'annotations' and 'categories'") from None
    file_of_image: dict[int, str] = {}
    for image_id, file_name, _, _ in images:
        if image_id in file_of_image:
            raise UserError(f"COCO annotations {ann_file}: image id {image_id} is used twice in 'images' "
                            f"({file_of_image[image_id]!r} and {file_name!r}); every image needs its own id")
        file_of_image[image_id] = file_name
    return categories, images, annotations


class CocoDataset(_FileDetectionDataset):
    """COCO json (``images``, ``annotations``, ``categories``) + the folder its ``file_name``\\ s are relative to.

    ``image_dir`` is that folder, or several searched in order: Label Studio names files relative to the export
    (``images/x.jpg``), CVAT relative to ``images/``. A ``file_name`` that is absolute or climbs out with ``..`` is
    refused (reported, skipped); two images with one id are an error. Category ids are mapped to contiguous labels
    ``0..C-1`` in increasing id order; names come from the json. ``iscrowd`` annotations are skipped (COCO's
    evaluation ignores them too); ``image_id`` is the json's id.
    """

    def __init__(self, image_dir: str | Path | Sequence[str | Path], ann_file: str | Path,
                 transforms: Callable | None = None, max_image_pixels: int | None = None):
        folders = [Path(image_dir)] if isinstance(image_dir, (str, Path)) else [Path(d) for d in image_dir]
        ann_file = Path(ann_file)
        categories, images, annotations = read_coco(ann_file)
        label_of_category = {c["id"]: i for i, c in enumerate(categories)}
        objects_of_image: dict[int, list[tuple[list[float], int]]] = {image[0]: [] for image in images}
        collected = AnnotationCollector(max_image_pixels)
        for ann in annotations:
            source = f"{ann_file.name} annotation {ann.get('id')}"
            if ann.get("iscrowd", 0):
                continue
            if ann.get("image_id") not in objects_of_image:
                collected.report(source, f"refers to image id {ann.get('image_id')} not in 'images', skipped")
            elif ann.get("category_id") not in label_of_category:
                collected.report(source, f"unknown category id {ann.get('category_id')}, skipped")
            else:
                try:
                    x, y, w, h = (float(v) for v in ann["bbox"])
                except (KeyError, TypeError, ValueError):
                    collected.report(source, f"bbox {ann.get('bbox')} is not [x, y, w, h], skipped")
                    continue
                objects_of_image[ann["image_id"]].append(([x, y, x + w, y + h], label_of_category[ann["category_id"]]))
        named = [(image, collected.image_path(f"{ann_file.name} image {image[1]}", folders, image[1]))
                 for image in images]
        named = [(image, path) for image, path in named if path is not None]
        collected.check([path for _, path in named])
        for (image_id, file_name, width, height), path in named:
            collected.add(f"{ann_file.name} image {file_name}", path, image_id, width, height,
                          objects_of_image[image_id])
        super().__init__(str(ann_file), [c["name"] for c in categories], collected, transforms)


def coco_files(root: Path, splits: Sequence[str], ann: str | None = None
               ) -> tuple[dict[str, tuple[Path, list[Path]]], dict[str, str], str | None]:
    """Where a COCO folder keeps its json and images: ``(files, names, found)``.

    ``files`` maps each split role (train, val, test) the folder ships to its json and the image folders its
    ``file_name``\\ s are searched in, in order; ``names`` gives each role's split name in the files (``splits``:
    the names of train, val and test). The splits are ``annotations/instances_<split>.json`` beside ``<split>/``,
    ``images/<split>/`` or ``images/``. Without them, the one json in ``annotations/`` or in ``root`` (CVAT, Label
    Studio, Roboflow exports), or ``ann`` (absolute or relative to ``root``), is the whole pool: ``files`` holds only
    ``train``, named ``all``, and ``found`` says which json it is (None when the folder ships its splits).
    """
    if ann is None:
        files, names = {}, {}
        for role, split in zip(SPLITS, splits):
            ann_file = root / "annotations" / f"instances_{split}.json"
            image_dirs = [root / split, root / "images" / split, root / "images"]
            if ann_file.is_file() and any(folder.is_dir() for folder in image_dirs):
                files[role], names[role] = (ann_file, list(dict.fromkeys([*image_dirs, root]))), split
        if "train" in files:
            return files, names, None
        candidates = sorted((root / "annotations").glob("*.json")) + sorted(root.glob("*.json"))
        if len(candidates) != 1:
            listed = f" ({', '.join(p.relative_to(root).as_posix() for p in candidates)})" if candidates else ""
            raise UserError(f"{root} holds {len(candidates)} COCO json files{listed} and no "
                            f"annotations/instances_{splits[0]}.json: name the one to read with "
                            "data.ann=FILE, or the splits with data.train_split= / val_split= / test_split=")
        ann_file = candidates[0]
    else:
        ann_file = Path(ann).expanduser()
        ann_file = ann_file if ann_file.is_absolute() or not (root / ann_file).is_file() else root / ann_file
        if not ann_file.is_file():
            raise UserError(f"data.ann={ann}: no such file (absolute, or relative to data.root {root})")
    found = f"one annotation file {Path(os.path.relpath(ann_file, root)).as_posix()}"
    return ({"train": (ann_file, list(dict.fromkeys([root / "images", ann_file.parent, root])))}, {"train": "all"},
            found)


def _read_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        raise UserError(f"cannot read VOC annotation {path}: {error}") from None


def voc_class_names(root: str | Path) -> tuple[str, ...]:
    """Every object name in ``root/Annotations/*.xml``, sorted (for VOC itself: its usual 20-class order)."""
    names = {obj.findtext("name", "").strip() for xml in sorted((Path(root) / "Annotations").glob("*.xml"))
             for obj in _read_xml(xml).iter("object")}
    return tuple(sorted(names - {""}))


class VOCDataset(_FileDetectionDataset):
    """Pascal VOC layout: ``root/{Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt}``.

    ``split`` None reads every ``Annotations/*.xml`` (LabelImg's layout, without ``ImageSets/``). The image is
    ``JPEGImages/<filename>``; a ``<filename>`` that is absolute or climbs out with ``..`` is refused, one that is
    not there falls back to ``<xml stem>.<any image extension>`` (tools write stale names after a rename), and
    LabelImg's ``<path>`` (the labeller's own disk) is ignored. ``class_names`` fixes the label order; None
    discovers them (:func:`voc_class_names`). Objects marked ``difficult`` are kept unless ``keep_difficult=False``.
    ``image_id`` is the position in the split list (or in the sorted xml files).
    """

    def __init__(self, root: str | Path, split: str | None = "train", class_names: Sequence[str] | None = None,
                 transforms: Callable | None = None, keep_difficult: bool = True,
                 max_image_pixels: int | None = None):
        root = Path(root)
        if split is None:
            xml_paths = sorted((root / "Annotations").glob("*.xml"))
        else:
            split_file = root / "ImageSets" / "Main" / f"{split}.txt"
            if not split_file.is_file():
                raise UserError(f"{split_file} not found: a VOC root holds Annotations/, JPEGImages/ and "
                                f"ImageSets/Main/<split>.txt")
            xml_paths = [root / "Annotations" / f"{stem}.xml" for stem in split_file.read_text().split()]
        class_names = tuple(class_names) if class_names else voc_class_names(root)
        label_of_name = {name: i for i, name in enumerate(class_names)}
        collected = AnnotationCollector(max_image_pixels)
        entries = []
        for image_id, xml_path in enumerate(xml_paths):
            if not xml_path.is_file():
                collected.report(xml_path, "annotation file not found, image skipped")
                continue
            annotation = _read_xml(xml_path)
            path = self._image_path(collected, xml_path, annotation.findtext("filename", "").strip())
            if path is None:
                continue
            try:
                width, height = (int(float(annotation.findtext(f"size/{key}") or 0)) for key in ("width", "height"))
            except ValueError:
                raise UserError(f"cannot read the image size in VOC annotation {xml_path}") from None
            objects = []
            for k, obj in enumerate(annotation.iter("object")):
                name = obj.findtext("name", "").strip()
                if not keep_difficult and obj.findtext("difficult", "0").strip() == "1":
                    continue
                if name not in label_of_name:
                    collected.report(xml_path, f"object {k} has unknown class {name!r}, skipped")
                    continue
                try:
                    xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{key}")) for key in
                                              ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    collected.report(xml_path, f"object {k} has no readable bndbox, skipped")
                    continue
                objects.append(((xmin - 1, ymin - 1, xmax, ymax), label_of_name[name]))
            entries.append((xml_path, path, image_id, width, height, objects))
        collected.check([entry[1] for entry in entries])
        for entry in entries:
            collected.add(*entry)
        super().__init__(str(root), class_names, collected, transforms)

    @staticmethod
    def _image_path(collected: AnnotationCollector, xml_path: Path, filename: str) -> Path | None:
        folder = xml_path.parent.parent / "JPEGImages"
        path = collected.image_path(xml_path, [folder], filename or f"{xml_path.stem}.jpg")
        if path is None or path.is_file():
            return path
        return next((p for p in sorted(folder.glob(f"{xml_path.stem}.*")) if p.suffix.lower() in IMAGE_EXTENSIONS),
                    path)


def _read_yolo_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read YOLO dataset yaml {path}: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("names"), (list, dict)):
        raise UserError(f"YOLO dataset yaml {path} needs 'names' (a list, or a dict from class index to name)")
    return config


def _yolo_names(names: list | dict) -> list[str]:
    return [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(name) for name in names]


def _yolo_location(root: Path, entry: str) -> Path:
    """Where a yaml's split entry points. Ultralytics' rule for Roboflow's exports: ``../train/images`` that is not
    there is read as ``train/images``."""
    location = root / entry
    if not location.exists() and entry.startswith("../"):
        location = root / entry[3:]
    return location


def yolo_root(data_yaml: Path, config: dict) -> Path:
    """The folder a YOLO yaml's entries are relative to: its ``path`` (relative to the yaml) where the train entry
    is found there, else the yaml's own folder. Ultralytics reads a relative ``path`` from its own datasets
    folder, so a downloaded yaml's ``path: coco8`` usually points nowhere on this disk."""
    candidates = [data_yaml.parent / config["path"]] if config.get("path") else []
    candidates.append(data_yaml.parent)
    train = config.get("train") or []
    for root in candidates:
        if all(_yolo_location(root, entry).exists() for entry in ([train] if isinstance(train, str) else train)):
            return root
    return candidates[0]


def _yolo_label_path(image_path: Path, root: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``. Only the
    folders below ``root`` count (those of a yaml entry outside it: all), and an image with no ``images`` folder
    there has its labels beside it (LabelImg)."""
    base = root if image_path.is_relative_to(root) else Path(image_path.anchor)
    parts = list(image_path.relative_to(base).parts)
    if "images" in parts[:-1]:
        parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    return base.joinpath(*parts).with_suffix(".txt")


class YOLODataset(_FileDetectionDataset):
    """YOLO txt labels: one ``cls cx cy w h`` line (normalised) per object in ``labels/.../<image stem>.txt``.

    ``images`` (relative to ``root``): a folder of images, a .txt list of image paths, or a list of those. A list
    line that is absolute or climbs out of the root with ``..`` is refused. :meth:`from_yaml` reads the split of an
    Ultralytics dataset yaml. A polygon line (``cls x1 y1 x2 y2 ...``, Ultralytics' segment labels) becomes the
    box around its points. An image without a label file has no objects. ``image_id`` is the position in the sorted
    image list.
    """

    def __init__(self, root: str | Path, images: str | Sequence[str], class_names: Sequence[str],
                 transforms: Callable | None = None, max_image_pixels: int | None = None, name: str | None = None):
        root = Path(root)
        collected = AnnotationCollector(max_image_pixels)
        paths = self._image_paths(root, images, collected)
        collected.check(paths)
        for image_id, image_path in enumerate(paths):
            label_path = _yolo_label_path(image_path, root)
            size = collected.size(image_path)
            lines = label_path.read_text().splitlines() if size and label_path.is_file() else []
            objects = []
            for line_number, line in enumerate(lines, start=1):
                obj = self._parse_line(line, len(class_names), *size)
                if isinstance(obj, str):
                    collected.report(f"{label_path}:{line_number}", obj)
                elif obj is not None:
                    objects.append(obj)
            collected.add(label_path, image_path, image_id, None, None, objects)
        super().__init__(name or str(root), class_names, collected, transforms)

    @classmethod
    def from_yaml(cls, data_yaml: str | Path, split: str = "train", transforms: Callable | None = None,
                  max_image_pixels: int | None = None) -> "YOLODataset":
        """Split ``split`` of an Ultralytics dataset yaml (``path``, ``train``/``val``/``test``, ``names``)."""
        data_yaml = Path(data_yaml)
        config = _read_yolo_yaml(data_yaml)
        if not config.get(split):
            raise UserError(f"YOLO dataset yaml {data_yaml} has no {split!r} entry")
        return cls(yolo_root(data_yaml, config), config[split], _yolo_names(config["names"]), transforms,
                   max_image_pixels, name=str(data_yaml))

    @staticmethod
    def _image_paths(root: Path, entries: str | Sequence[str], collected: AnnotationCollector) -> list[Path]:
        paths: list[Path] = []
        for entry in [entries] if isinstance(entries, str) else entries:
            location = _yolo_location(root, str(entry))
            if location.is_dir():
                paths += sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            elif location.is_file():
                for line in location.read_text().splitlines():
                    path = collected.image_path(location, [root], line.strip()) if line.strip() else None
                    if path is not None:
                        paths.append(path)
            else:
                collected.report(location, "split folder or list not found")
        return paths

    @staticmethod
    def _parse_line(line: str, num_classes: int, width: int, height: int) -> tuple[tuple, int] | str | None:
        """``(xyxy pixel box, label)``, a problem message, or None for a blank line."""
        fields = line.split()
        if not fields:
            return None
        try:
            label, values = int(float(fields[0])), [float(v) for v in fields[1:]]
        except ValueError:
            return f"cannot parse {line!r}, skipped"
        if not 0 <= label < num_classes:
            return f"unknown class {label} (the data names {num_classes}), skipped"
        if len(values) == 4:
            cx, cy, w, h = values
            return ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), label
        if len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            return (min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height), label
        return f"expected 'cls cx cy w h' or a polygon, got {line!r}, skipped"


# ------------------------------------------------------------------------------------------------- transforms
class Letterbox(v2.Transform):
    """Resize so the longer side is ``size`` (aspect kept), then pad evenly to ``size x size`` with grey 114
    (masks with 0). Boxes and masks follow. Hand-written: v2 has no aspect-keeping resize-and-pad."""

    def __init__(self, size: int, fill: int = LETTERBOX_GREY):
        super().__init__()
        self.size = size
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        _, new_height, new_width, left, top = letterbox_geometry(height, width, self.size)
        return {"size": [new_height, new_width],
                "padding": [left, top, self.size - new_width - left, self.size - new_height - top]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        resized = self._call_kernel(F.resize, inpt, params["size"], antialias=True)
        if isinstance(inpt, tv_tensors.Mask):
            fill = 0
        elif isinstance(inpt, Tensor) and inpt.is_floating_point():
            fill = self.fill / 255
        else:
            fill = self.fill
        return self._call_kernel(F.pad, resized, params["padding"], fill=fill)


def unletterbox_boxes(boxes: Tensor, height: int, width: int, size: int) -> Tensor:
    """Map ``Tensor[N, 4]`` xyxy boxes on the letterboxed ``size`` square back to the ``height x width`` image."""
    scale, _, _, left, top = letterbox_geometry(height, width, size)
    offset = boxes.new_tensor([left, top, left, top])
    limits = boxes.new_tensor([width, height, width, height])
    return ((boxes - offset) / scale).clamp(min=0).minimum(limits)


def detection_transforms(image_size: int, train: bool = True, hflip: float = 0.5,
                         scale: Sequence[float] = (0.5, 1.5), translate: float = 0.1,
                         color_jitter: float = 0.2) -> v2.Compose:
    """The v2 pipeline for ``DetectionDataset(transforms=...)``, on uint8 images as the datasets hand them over.

    Evaluation: letterbox only. Training adds horizontal flip, scale and translation jitter (``RandomAffine``,
    grey where the image moves away), colour jitter; a zero strength leaves that step out. Boxes are then
    clamped to the image and degenerate ones (< 1 px) removed with their labels.
    """
    steps: list[v2.Transform] = [Letterbox(image_size)]
    if train:
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if tuple(scale) != (1.0, 1.0) or translate > 0:
            steps.append(v2.RandomAffine(degrees=0.0, translate=(translate, translate), scale=tuple(scale),
                                         interpolation=v2.InterpolationMode.BILINEAR,
                                         fill={tv_tensors.Image: LETTERBOX_GREY, "others": 0}))
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                        hue=min(color_jitter / 4, 0.5)))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


def detection_collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    """``(Tensor[N, 3, H, W], list of N targets)``. Images of different sizes are padded at the right and bottom
    (grey 114/255) to the largest, which leaves every box where it was. The targets stay per image, with their
    ``"proposals"`` where the data carries them (``Tensor[K, 4]``, K varying)."""
    images, targets = zip(*batch)
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    stacked = images[0].new_full((len(images), images[0].shape[0], height, width), LETTERBOX_GREY / 255)
    for slot, image in zip(stacked, images):
        slot[:, : image.shape[-2], : image.shape[-1]] = image
    return stacked, list(targets)


# ------------------------------------------------------------------------------------------------- datamodule
@dataclass
class _Layout:
    """What a data folder holds: an opener (transforms -> dataset) for each split the files ship, keyed train, val,
    test, with the split's name in the files; or, when the files name no splits, one ``train`` opener for the whole
    pool and ``found``, how the layout was recognised (for the log)."""

    openers: dict[str, Callable[[Callable | None], DetectionDataset]]
    names: dict[str, str]
    found: str | None = None


_MAX_OBJECTS = 64  # shapes per drawn scene: beyond this they no longer fit a scene


def _check_arguments(source: str, root, image_size, batch_size, num_workers, hflip, scale, translate, color_jitter,
                     mosaic, mixup, close_mosaic, sizes, n_objects, class_names, num_classes) -> None:
    """The datamodule's arguments, checked before anything is read (one line each, naming the data.* key)."""
    if source not in SOURCES:
        raise UserError(f"unknown detection data source {source!r}; choose one of {', '.join(SOURCES)}")
    check_loader(batch_size, num_workers)
    check_image_size("data.image_size", image_size)
    for key, probability in (("hflip", hflip), ("mosaic", mosaic), ("mixup", mixup)):
        check_probability(f"data.{key}", probability)
    check_number("data.close_mosaic", close_mosaic, 0, integer=True)
    check_number("data.translate", translate, 0, 1)
    check_number("data.color_jitter", color_jitter, 0)
    check_min_max("data.scale", scale, "a [min, max] range of zoom factors, e.g. [0.75, 1.25]", 0, low_open=True)
    check_number("data.num_classes", num_classes, 1, integer=True, optional=True)
    check_names("data.class_names", class_names)
    if source == "shapes_det":
        check_scene_settings(sizes, n_objects, _MAX_OBJECTS)
        if num_classes is not None and num_classes != len(SHAPE_CLASSES):
            raise UserError(f"shapes_det: data.num_classes={num_classes} but the data has {len(SHAPE_CLASSES)} "
                            f"classes; leave data.num_classes={len(SHAPE_CLASSES)} (or null).")
    elif not root:
        raise UserError(f"data source {source!r} needs data.root=PATH")
    elif not Path(str(root)).expanduser().exists():
        raise UserError(f"data.root {str(root)!r} does not exist; point it at the {source} dataset.")


class DetectionDataModule(SplitDataModule):
    """Train/val/test loaders of one detection source, all letterboxed to ``image_size``.

    ======================  ==================================================================================
    ``source``              data (``root``: the folder)
    ======================  ==================================================================================
    ``shapes_det``          embedded shape scenes drawn at ``image_size`` (``train_size``/``val_size``/``test_size``
                            images; ``test_size`` None: ``val_size``)
    ``coco``                ``annotations/instances_<split>.json`` + ``<split>/`` (or ``images/<split>/``,
                            ``images/``) images; splits default to ``train2017``/``val2017``/``test2017``.
                            Without them: the one json in ``annotations/`` or in ``root`` (CVAT, Label Studio,
                            Roboflow exports) or ``ann``, images in ``images/`` or ``root``
    ``voc``                 a VOC year folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``);
                            without ``ImageSets/`` (LabelImg): every xml. Classes from ``class_names`` or discovered
    ``yolo``                the dataset yaml, or a folder holding exactly one (Ultralytics: ``images/<split>``,
                            ``labels/<split>``); splits = its keys. Without a yaml: ``images/`` beside ``labels/``
                            (``images/<split>/`` folders are splits) or images with their .txt beside them, classes
                            from ``class_names`` or a ``classes.txt`` (in ``root`` or ``labels/``)
    ======================  ==================================================================================

    A validation or test split the files lack (VOC2012 has no annotated ``test.txt``, COCO's ``test2017`` no
    ``instances`` json, an export none at all) is cut from the training split (the pool), seeded:
    ``ceil(fraction x N)`` images for ``val_fraction`` / ``test_fraction``, stratified by each image's rarest class
    where every such class has enough images. The log says how in one line; :meth:`split_files` lists each split's
    files. Every image is decoded once at set-up (cached); broken ones, those over ``max_image_pixels`` pixels (None:
    PIL's limit) and file names from annotations that leave the root are skipped and reported.

    ``num_classes``, ``class_names`` and ``class_counts`` (boxes per class in the training set) are set by
    :meth:`setup` (``class_names`` for ``shapes_det`` already in ``__init__``). A ``num_classes`` given up front is
    checked against the data; ``class_names`` orders VOC's classes, names those of a YOLO folder without a yaml,
    and must match the names a COCO json or YOLO yaml gives. ``ann`` (COCO only) is the json to read, absolute or
    relative to ``root``. ``augment=False`` gives the training set the evaluation pipeline. ``mosaic`` and ``mixup``
    are the probabilities of :class:`~cvlab.data.wrappers.Mosaic` and :class:`~cvlab.data.wrappers.MixUp` (applied
    in that order) in the training loader; ``train_set`` stays the split as read. ``close_mosaic`` turns both off
    for the last that many epochs of the trainer's ``max_epochs``. ``sampler`` is offered
    ``num_samples``, ``num_classes``, ``class_counts``, ``seed`` and ``image_labels`` (each training image's object
    classes: ``sampler=repeat_factor``); a sampler that draws images by one class label each is refused.
    :meth:`attach_proposals` adds selective-search proposals to every split's targets (for R-CNN and Fast R-CNN).
    """

    kind = "detection"
    collate_fn = staticmethod(detection_collate)
    sampler_inputs = ("image_labels", *SplitDataModule.sampler_inputs)

    def __init__(self, source: str = "shapes_det", root: str | None = None, image_size: int = 64,
                 batch_size: int = 16, num_workers: int = 0, augment: bool = True, hflip: float = 0.5,
                 scale: Sequence[float] = (0.5, 1.5), translate: float = 0.1, color_jitter: float = 0.2,
                 mosaic: float = 0.0, mixup: float = 0.0, close_mosaic: int = 0, seed: int = 0,
                 train_size: int = 1000, val_size: int = 200,
                 test_size: int | None = None, n_objects: Sequence[int] = (1, 4), train_split: str | None = None,
                 val_split: str | None = None, test_split: str | None = None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, class_names: Sequence[str] | None = None, num_classes: int | None = None,
                 name: str | None = None, sampler: dict | None = None, ann: str | None = None,
                 max_image_pixels: int | None = None):
        _check_arguments(source, root, image_size, batch_size, num_workers, hflip, scale, translate, color_jitter,
                         mosaic, mixup, close_mosaic, (train_size, val_size, test_size), n_objects, class_names,
                         num_classes)
        if ann is not None and source != "coco":
            raise UserError(f"data.ann names a COCO json; data source {source!r} reads none, leave data.ann=null")
        if max_image_pixels is not None and (source == "shapes_det" or int(max_image_pixels) < 1):
            raise UserError(f"data.max_image_pixels={max_image_pixels}: a positive pixel count limiting the image "
                            "files read (not for shapes_det, which draws its images)")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, sampler=sampler,
                         val_fraction=val_fraction, test_fraction=test_fraction)
        self.source, self.root, self.image_size = source, root, image_size
        self.ann, self.max_image_pixels = ann, None if max_image_pixels is None else int(max_image_pixels)
        self.augment = augment
        self.augmentation = {"hflip": hflip, "scale": tuple(scale), "translate": translate,
                             "color_jitter": color_jitter}
        self.mosaic, self.mixup = float(mosaic), float(mixup)
        self.close_mosaic = int(close_mosaic)
        self.sizes = (train_size, val_size, val_size if test_size is None else test_size)
        self.n_objects = tuple(n_objects)
        default_splits = {"coco": ("train2017", "val2017", "test2017")}.get(source, SPLITS)
        self.splits = tuple(given or default for given, default in zip((train_split, val_split, test_split),
                                                                        default_splits))
        self.given_class_names = tuple(class_names) if class_names and source != "shapes_det" else None
        self.class_names = SHAPE_CLASSES if source == "shapes_det" else self.given_class_names
        self.name = name or source
        self.expected_num_classes = num_classes
        self.num_classes = len(self.class_names) if self.class_names else num_classes
        self.class_counts: tuple[int, ...] = ()

    # ------------------------------------------------------------------------------------------ reading
    def read(self) -> None:
        evaluation = detection_transforms(self.image_size, train=False)
        training = detection_transforms(self.image_size, train=True, **self.augmentation) if self.augment \
            else evaluation
        if self.source == "shapes_det":
            self.train_set, self.val_set, self.test_set = (
                ShapesDetection(split, size, self.image_size, self.seed, self.n_objects, transforms)
                for split, size, transforms in zip(SPLITS, self.sizes, (training, evaluation, evaluation)))
            note = f"three splits drawn from seed {self.seed}"
        else:
            note = self._read_files(training, evaluation)
        for split, dataset in (("validation", self.val_set), ("test", self.test_set)):
            if dataset.class_names != self.train_set.class_names:
                raise UserError(f"{self.name}: train classes {self.train_set.class_names} differ from {split} classes "
                                f"{dataset.class_names}")
        if self.given_class_names and self.train_set.class_names != self.given_class_names:
            raise UserError(f"{self.name}: data.class_names={list(self.given_class_names)} but the files name the "
                            f"classes {list(self.train_set.class_names)}; leave data.class_names=null")
        self.class_names = self.train_set.class_names
        self.num_classes = len(self.class_names)
        self.check_num_classes(self.name, self.expected_num_classes, self.class_names)
        labels = [self.train_set.annotation(i).labels for i in range(len(self.train_set))]
        self.class_counts = tuple(torch.bincount(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
                                                 minlength=self.num_classes).tolist())
        self.note(f"data {self.name}: {note}; {len(self.train_set)} / {len(self.val_set)} / {len(self.test_set)} "
                  "train / val / test images")

    def _read_files(self, training: v2.Compose, evaluation: v2.Compose) -> str:
        """Sets the three splits of a file source and their file lists; returns how they were made, for the log."""
        root = Path(self.root).expanduser()  # __init__ checked that it exists
        layout = {"coco": self._coco_layout, "voc": self._voc_layout, "yolo": self._yolo_layout}[self.source](root)
        missing = [role for role in SPLITS[1:] if role not in layout.openers]
        if not missing:
            views = {role: layout.openers[role](transforms)
                     for role, transforms in zip(SPLITS, (training, evaluation, evaluation))}
            files = {role: self._file_names(root, dataset, range(len(dataset))) for role, dataset in views.items()}
            note = f"the files ship the splits ({', '.join(layout.names.values())})"
        else:
            pool = layout.openers["train"](None)
            if not len(pool):
                raise UserError(f"{self.name}: no usable image in {root} (the problems are listed above)")
            fractions = {role: getattr(self, f"{role}_fraction") for role in missing}
            rest, *parts, stratified = self._cut(pool, list(fractions.values()), layout.names["train"])
            views = {"train": DetectionSubset(pool, rest, training)}
            views.update((role, DetectionSubset(pool, part, evaluation)) for role, part in zip(missing, parts))
            files = {role: self._file_names(root, pool, view.indices) for role, view in views.items()}
            for role in SPLITS[1:]:
                if role not in views:
                    views[role] = layout.openers[role](evaluation)
                    files[role] = self._file_names(root, views[role], range(len(views[role])))
            if layout.found is None:
                absent = " and ".join(self.splits[SPLITS.index(role)] for role in missing)
                note = f"no {absent} split in the files: " + cut_note(
                    fractions, f"the {len(pool)} {layout.names['train']} images", self.seed, stratified)
            else:
                note = f"{layout.found}, no splits: " + cut_note(fractions, f"the {len(pool)} images", self.seed,
                                                                  stratified)
        self.train_set, self.val_set, self.test_set = (views[role] for role in SPLITS)
        self.files = {role: files[role] for role in SPLITS}
        return note

    def _cut(self, pool: DetectionDataset, fractions: list[float], pool_name: str) -> list:
        """``[rest, *parts, stratified]``: :func:`cut_splits` of the pool, stratified by each image's rarest class
        (images without boxes: a class of their own) where every such class has enough images, else not."""
        labels = [pool.annotation(i).labels.tolist() for i in range(len(pool))]
        counts = np.bincount([label for image in labels for label in image], minlength=pool.num_classes)
        strata = [min(image, key=lambda label: (counts[label], label)) if image else pool.num_classes
                  for image in labels]
        what = f"{self.name} {pool_name}"
        try:
            return [*cut_splits(len(pool), fractions, self.seed, strata, what=what), True]
        except UserError:  # a class too rare to share out: the cut ignores the classes
            return [*cut_splits(len(pool), fractions, self.seed, what=what), False]

    @staticmethod
    def _file_names(root: Path, dataset: DetectionDataset, indices: Sequence[int]) -> list[str]:
        base = root if root.is_dir() else root.parent
        return [Path(os.path.relpath(dataset.records[i].path, base)).as_posix() for i in indices]

    def _coco_layout(self, root: Path) -> _Layout:
        def opener(ann_file: Path, folders: list[Path]) -> Callable[[Callable | None], DetectionDataset]:
            return lambda transforms: CocoDataset(folders, ann_file, transforms, self.max_image_pixels)

        files, names, found = coco_files(root, self.splits, self.ann)
        return _Layout({role: opener(*files[role]) for role in files}, names, found)

    def _voc_layout(self, root: Path) -> _Layout:
        if self.class_names is None:
            self.class_names = voc_class_names(root)

        def opener(split: str | None) -> Callable[[Callable | None], DetectionDataset]:
            return lambda transforms: VOCDataset(root, split, self.class_names, transforms,
                                                 max_image_pixels=self.max_image_pixels)

        lists = root / "ImageSets" / "Main"
        if (lists / f"{self.splits[0]}.txt").is_file():
            shipped = {role: split for role, split in zip(SPLITS, self.splits) if (lists / f"{split}.txt").is_file()}
            return _Layout({role: opener(split) for role, split in shipped.items()}, shipped)
        if not (root / "Annotations").is_dir():
            raise UserError(f"{root} is not a VOC folder: expected Annotations/*.xml and JPEGImages/ "
                            "(ImageSets/Main/<split>.txt optional)")
        return _Layout({"train": opener(None)}, {"train": "all"}, "Annotations/ without ImageSets/Main/")

    def _yolo_layout(self, root: Path) -> _Layout:
        def opener(base: Path, images, names: Sequence[str], label: str) -> Callable:
            return lambda transforms: YOLODataset(base, images, names, transforms, self.max_image_pixels, label)

        data_yaml = root if root.is_file() else None
        if data_yaml is None:
            yamls = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
            if len(yamls) > 1:
                raise UserError(f"{root} holds {len(yamls)} yaml files; set data.root to the dataset yaml itself")
            data_yaml = yamls[0] if yamls else None
        if data_yaml is not None:
            config = _read_yolo_yaml(data_yaml)
            base, names = yolo_root(data_yaml, config), _yolo_names(config["names"])
            shipped = {role: split for role, split in zip(SPLITS, self.splits) if config.get(split)}
            if "train" not in shipped:
                raise UserError(f"YOLO dataset yaml {data_yaml} has no {self.splits[0]!r} entry")
            return _Layout({role: opener(base, config[split], names, str(data_yaml))
                            for role, split in shipped.items()}, shipped)
        names = self._yolo_folder_names(root)
        images = root / "images"
        shipped = {role: split for role, split in zip(SPLITS, self.splits) if (images / split).is_dir()}
        if "train" in shipped:
            return _Layout({role: opener(root, f"images/{split}", names, str(root)) for role, split in shipped.items()},
                           shipped)
        if images.is_dir():
            return _Layout({"train": opener(root, "images", names, str(root))}, {"train": "all"},
                           "images/ and labels/ without a dataset yaml")
        return _Layout({"train": opener(root, ".", names, str(root))}, {"train": "all"},
                       "images with their labels beside them, without a dataset yaml")

    def _yolo_folder_names(self, root: Path) -> tuple[str, ...]:
        """The classes of a YOLO folder without a yaml: ``data.class_names``, else its ``classes.txt``."""
        listed = next((path for path in (root / "classes.txt", root / "labels" / "classes.txt") if path.is_file()),
                      None)
        from_file = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip()) if listed else None
        if self.given_class_names and from_file and self.given_class_names != from_file:
            raise UserError(f"data.class_names={list(self.given_class_names)} but {listed} lists {list(from_file)}; "
                            "give one of them")
        names = self.given_class_names or from_file
        if not names:
            raise UserError(f"{root} has no dataset yaml and no classes.txt: name the classes with "
                            "data.class_names=[a,b,...] (label k is the k-th name)")
        return names

    # ------------------------------------------------------------------------------------------ the contract
    def describe(self) -> DataInfo:
        return DataInfo(num_classes=self.num_classes, class_names=self.class_names, in_chans=3,
                        image_size=self.image_size, class_counts=self.class_counts)

    def attach_proposals(self, settings: dict) -> dict:
        """Makes every split's targets carry ``"proposals"`` by a model's ``proposals:`` settings
        (:mod:`cvlab.data.proposals`), computing the uncached ones now; returns the settings completed with their
        defaults. Refused with mosaic or mixup, whose combined images have no proposals of their own."""
        if self.mosaic > 0 or self.mixup > 0:
            raise UserError(f"data.mosaic={self.mosaic:g} / data.mixup={self.mixup:g} combine several images, which a "
                            "model taking region proposals (model.proposals) cannot use; set data.mosaic=0 "
                            "data.mixup=0")
        self.setup()
        self.train_set, self.val_set, self.test_set = attach_proposals((self.train_set, self.val_set, self.test_set),
                                                                        settings)
        return self.train_set.settings

    def sampler_values(self) -> dict[str, Any]:
        labels = [self.train_set.annotation(i).labels.tolist() for i in range(len(self.train_set))]
        return {**super().sampler_values(), "image_labels": labels}

    def training_view(self) -> tuple[Dataset, bool]:
        dataset = self.train_set
        if self.mosaic == 0 and self.mixup == 0:
            return dataset, False
        until = self._combining_until()
        if self.mosaic > 0:
            dataset = Mosaic(dataset, self.mosaic, self.image_size, seed=self.seed, until_epoch=until)
        if self.mixup > 0:
            dataset = MixUp(dataset, self.mixup, self.image_size, seed=self.seed, until_epoch=until)
        return dataset, True

    def _combining_until(self) -> int | None:
        """The first epoch without mosaic and mixup by ``close_mosaic`` and the trainer's ``max_epochs``; None: all
        use them."""
        if self.close_mosaic == 0:
            return None
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        if epochs is None or epochs < 0:
            raise UserError(f"data.close_mosaic={self.close_mosaic} counts epochs back from trainer.max_epochs, "
                            "which this run leaves open; set trainer.max_epochs=N or data.close_mosaic=0")
        until = max(epochs - self.close_mosaic, 0)
        self.note(f"mosaic/mixup for epochs 1-{until} of {epochs}, then the plain images (data.close_mosaic="
                  f"{self.close_mosaic})" if until else
                  f"no epoch uses mosaic/mixup: data.close_mosaic={self.close_mosaic} covers all {epochs} epochs "
                  "(set data.close_mosaic lower to use them)")
        return until
