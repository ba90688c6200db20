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
outside or of zero/negative size (skipped), an unknown class (skipped), a missing image file (the image is
skipped) — is recorded as ``"<file>: <what>"`` in ``dataset.problems`` and logged once with a count. A json,
xml or yaml file that cannot be read at all raises :class:`~cvlab.utils.errors.UserError` naming it.

Augmentation uses ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes`` (flip, scale/translate
jitter through ``RandomAffine``, ``ColorJitter``, ``SanitizeBoundingBoxes``). v2 has no letterbox resize, so
:class:`Letterbox` (YOLO's aspect-keeping resize + grey padding) is a small hand-written v2 transform. Mosaic and
mixup combine several images, so they are dataset wrappers (``data/wrappers.py``), applied to the training set.

Every source has train, val and test splits: the files' own where they ship them (COCO ``<split>/`` +
``instances_<split>.json``, VOC ``ImageSets/Main/<split>.txt``, the YOLO yaml's keys); a missing val or test split
is cut from the training split, seeded (``data.val_fraction`` / ``data.test_fraction``), and the run's log says so.
"""
from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
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
from cvlab.data.shapes import SHAPE_CLASSES, ShapesDetection
from cvlab.data.wrappers import MixUp, Mosaic
from cvlab.utils.errors import UserError

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


class _AnnotationCollector:
    """Checks boxes against their image, keeps the good ones and words every problem for ``dataset.problems``."""

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.problems: list[str] = []

    def report(self, source: str | Path, problem: str) -> None:
        self.problems.append(f"{source}: {problem}")

    def add(self, source: str | Path, path: Path, image_id: int, width: int, height: int,
            objects: Sequence[tuple[Sequence[float], int]]) -> None:
        """Record one image with its ``(xyxy box, label)`` objects; ``source`` names the file reported."""
        if not path.is_file():
            self.report(source, f"image file {path} not found, image skipped")
            return
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
                                    np.asarray(labels, dtype=np.int64), image_id, int(height), int(width)))


class _FileDetectionDataset(DetectionDataset):
    """A dataset of image files with checked annotations; logs its problems once."""

    def __init__(self, name: str, class_names: Sequence[str], collected: _AnnotationCollector,
                 transforms: Callable | None):
        super().__init__(class_names, transforms)
        self.records = collected.records
        self.problems = collected.problems
        if self.problems:
            logger.warning("%s: %d annotation problem(s) fixed or skipped (listed in dataset.problems), first: %s",
                           name, len(self.problems), self.problems[0])

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        record = self.records[index]
        with PIL.Image.open(record.path) as image:
            pixels = F.pil_to_tensor(image.convert("RGB"))
        return pixels, torch.from_numpy(record.boxes), torch.from_numpy(record.labels), record.image_id

    def annotation(self, index: int) -> Annotation:
        record = self.records[index]
        return Annotation(torch.from_numpy(record.boxes), torch.from_numpy(record.labels), record.height, record.width)


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` read from the file header only; (0, 0) for a missing file (reported later)."""
    if not path.is_file():
        return 0, 0
    with PIL.Image.open(path) as image:
        return image.size


class CocoDataset(_FileDetectionDataset):
    """COCO ``instances_*.json`` + an image folder.

    Category ids are mapped to contiguous labels ``0..C-1`` in increasing id order; names come from the json.
    ``iscrowd`` annotations are skipped (COCO's evaluation ignores them too); ``image_id`` is the json's id.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transforms: Callable | None = None):
        image_dir, ann_file = Path(image_dir), Path(ann_file)
        try:
            data = json.loads(ann_file.read_text())
            images, categories = data["images"], sorted(data["categories"], key=lambda c: c["id"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read COCO annotations {ann_file}: {error!r}; expected a json with "
                            f"'images', 'annotations' and 'categories'") from None
        label_of_category = {c["id"]: i for i, c in enumerate(categories)}
        objects_of_image: dict[int, list[tuple[list[float], int]]] = {image["id"]: [] for image in images}
        collected = _AnnotationCollector()
        for ann in data.get("annotations", []):
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
        for image in images:
            path = image_dir / image["file_name"]
            width, height = image.get("width"), image.get("height")
            if not (width and height):
                width, height = _image_size(path)
            collected.add(f"{ann_file.name} image {image['file_name']}", path, int(image["id"]), width, height,
                          objects_of_image[image["id"]])
        super().__init__(str(ann_file), [c["name"] for c in categories], collected, transforms)


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

    ``class_names`` fixes the label order; None discovers them (:func:`voc_class_names`). Objects marked
    ``difficult`` are kept unless ``keep_difficult=False``. ``image_id`` is the position in the split list.
    """

    def __init__(self, root: str | Path, split: str = "train", class_names: Sequence[str] | None = None,
                 transforms: Callable | None = None, keep_difficult: bool = True):
        root = Path(root)
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise UserError(f"{split_file} not found: a VOC root holds Annotations/, JPEGImages/ and "
                            f"ImageSets/Main/<split>.txt")
        class_names = tuple(class_names) if class_names else voc_class_names(root)
        label_of_name = {name: i for i, name in enumerate(class_names)}
        collected = _AnnotationCollector()
        for image_id, stem in enumerate(split_file.read_text().split()):
            xml_path = root / "Annotations" / f"{stem}.xml"
            if not xml_path.is_file():
                collected.report(xml_path, "annotation file not found, image skipped")
                continue
            annotation = _read_xml(xml_path)
            path = root / "JPEGImages" / annotation.findtext("filename", f"{stem}.jpg").strip()
            try:
                width, height = (int(float(annotation.findtext(f"size/{key}") or 0)) for key in ("width", "height"))
            except ValueError:
                raise UserError(f"cannot read the image size in VOC annotation {xml_path}") from None
            if not (width and height):
                width, height = _image_size(path)
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
            collected.add(xml_path, path, image_id, width, height, objects)
        super().__init__(str(root), class_names, collected, transforms)


def _read_yolo_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read YOLO dataset yaml {path}: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("names"), (list, dict)):
        raise UserError(f"YOLO dataset yaml {path} needs 'names' (a list, or a dict from class index to name)")
    return config


def _yolo_label_path(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image_path.parts)
    if "images" in parts:
        parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    return Path(*parts).with_suffix(".txt")


class YOLODataset(_FileDetectionDataset):
    """Ultralytics layout: a dataset yaml with ``path`` (optional, relative to the yaml), ``train``/``val`` (a
    folder of images, a .txt list of image paths, or a list of those) and ``names``; labels in
    ``labels/.../<image stem>.txt`` with one ``cls cx cy w h`` line (normalised) per object.

    A polygon line (``cls x1 y1 x2 y2 ...``, Ultralytics' segment labels) becomes the box around its points.
    An image without a label file has no objects. ``image_id`` is the position in the sorted image list.
    """

    def __init__(self, data_yaml: str | Path, split: str = "train", transforms: Callable | None = None):
        data_yaml = Path(data_yaml)
        config = _read_yolo_yaml(data_yaml)
        names = config["names"]
        class_names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
        if split not in config:
            raise UserError(f"YOLO dataset yaml {data_yaml} has no {split!r} entry")
        root = data_yaml.parent / (config.get("path") or ".")
        collected = _AnnotationCollector()
        for image_id, image_path in enumerate(self._image_paths(root, config[split], collected)):
            width, height = _image_size(image_path)
            label_path = _yolo_label_path(image_path)
            lines = label_path.read_text().splitlines() if label_path.is_file() else []
            objects = []
            for line_number, line in enumerate(lines, start=1):
                obj = self._parse_line(line, len(class_names), width, height)
                if isinstance(obj, str):
                    collected.report(f"{label_path}:{line_number}", obj)
                elif obj is not None:
                    objects.append(obj)
            collected.add(label_path, image_path, image_id, width, height, objects)
        super().__init__(str(data_yaml), class_names, collected, transforms)

    @staticmethod
    def _image_paths(root: Path, entries: str | list[str], collected: _AnnotationCollector) -> list[Path]:
        paths: list[Path] = []
        for entry in [entries] if isinstance(entries, str) else entries:
            location = root / entry
            if location.is_dir():
                paths += sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            elif location.is_file():
                paths += [root / line.strip() for line in location.read_text().splitlines() if line.strip()]
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
            return f"unknown class {label} (the yaml names {num_classes}), skipped"
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
    (grey 114/255) to the largest, which leaves every box where it was."""
    images, targets = zip(*batch)
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    stacked = images[0].new_full((len(images), images[0].shape[0], height, width), LETTERBOX_GREY / 255)
    for slot, image in zip(stacked, images):
        slot[:, : image.shape[-2], : image.shape[-1]] = image
    return stacked, list(targets)


# ------------------------------------------------------------------------------------------------- datamodule
class DetectionDataModule(SplitDataModule):
    """Train/val/test loaders of one detection source, all letterboxed to ``image_size``.

    ======================  ==================================================================================
    ``source``              data
    ======================  ==================================================================================
    ``shapes_det``          embedded shape scenes drawn at ``image_size`` (``train_size``/``val_size``/``test_size``
                            images; ``test_size`` None: ``val_size``)
    ``coco``                ``root/<split>/`` images + ``root/annotations/instances_<split>.json``
                            (splits default to ``train2017``/``val2017``/``test2017``)
    ``voc``                 ``root`` = a VOC year folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``);
                            splits default to ``train``/``val``/``test``; classes from ``class_names`` or discovered
    ``yolo``                ``root`` = the dataset yaml (or a folder holding exactly one); splits = its keys
    ======================  ==================================================================================

    The training split must ship; a validation or test split the files lack (VOC2012 has no annotated
    ``test.txt``, COCO's ``test2017`` no ``instances`` json) is cut from it, seeded: ``ceil(fraction x N)`` images for
    ``val_fraction`` / ``test_fraction``.

    ``num_classes``, ``class_names`` and ``class_counts`` (boxes per class in the training set) are set by
    :meth:`setup` (``class_names`` for ``shapes_det`` already in ``__init__``). A ``num_classes`` given up front is
    checked against the data; ``class_names`` matters for VOC only (COCO and YOLO name their classes in their files).
    ``augment=False`` gives the training set the evaluation pipeline. ``mosaic`` and ``mixup`` are the
    probabilities of :class:`~cvlab.data.wrappers.Mosaic` and :class:`~cvlab.data.wrappers.MixUp` (applied in that
    order) in the training loader; ``train_set`` stays the split as read. ``sampler`` is offered ``num_samples``,
    ``num_classes``, ``class_counts`` and ``seed``; a sampler that draws images by their class label is refused.
    """

    kind = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(self, source: str = "shapes_det", root: str | None = None, image_size: int = 64,
                 batch_size: int = 16, num_workers: int = 0, augment: bool = True, hflip: float = 0.5,
                 scale: Sequence[float] = (0.5, 1.5), translate: float = 0.1, color_jitter: float = 0.2,
                 mosaic: float = 0.0, mixup: float = 0.0, seed: int = 0, train_size: int = 1000, val_size: int = 200,
                 test_size: int | None = None, n_objects: Sequence[int] = (1, 4), train_split: str | None = None,
                 val_split: str | None = None, test_split: str | None = None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, class_names: Sequence[str] | None = None, num_classes: int | None = None,
                 name: str | None = None, sampler: dict | None = None):
        if source not in SOURCES:
            raise UserError(f"unknown detection data source {source!r}; choose one of {', '.join(SOURCES)}")
        if source != "shapes_det" and not root:
            raise UserError(f"data source {source!r} needs data.root=PATH")
        for key, probability in (("mosaic", mosaic), ("mixup", mixup)):
            if not 0 <= probability <= 1:
                raise UserError(f"data.{key} is a probability in [0, 1], got {probability}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, sampler=sampler,
                         val_fraction=val_fraction, test_fraction=test_fraction)
        self.source, self.root, self.image_size = source, root, image_size
        self.augment = augment
        self.augmentation = {"hflip": hflip, "scale": tuple(scale), "translate": translate,
                             "color_jitter": color_jitter}
        self.mosaic, self.mixup = float(mosaic), float(mixup)
        self.sizes = (train_size, val_size, val_size if test_size is None else test_size)
        self.n_objects = tuple(n_objects)
        default_splits = {"coco": ("train2017", "val2017", "test2017")}.get(source, SPLITS)
        self.splits = tuple(given or default for given, default in zip((train_split, val_split, test_split),
                                                                        default_splits))
        self.class_names = SHAPE_CLASSES if source == "shapes_det" else tuple(class_names) if class_names else None
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
        self.class_names = self.train_set.class_names
        self.num_classes = len(self.class_names)
        self.check_num_classes(self.name, self.expected_num_classes, self.class_names)
        labels = [self.train_set.annotation(i).labels for i in range(len(self.train_set))]
        self.class_counts = tuple(torch.bincount(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
                                                 minlength=self.num_classes).tolist())
        self.note(f"data {self.name}: {note}; {len(self.train_set)} / {len(self.val_set)} / {len(self.test_set)} "
                  "train / val / test images")

    def _read_files(self, training: v2.Compose, evaluation: v2.Compose) -> str:
        """Sets the three splits of a file source; returns how they were made, for the log."""
        root = self._annotation_root()
        train_split = self.splits[0]
        missing = [role for role, split in zip(SPLITS[1:], self.splits[1:]) if not self._ships(root, split)]
        if not missing:
            self.train_set, self.val_set, self.test_set = (
                self._open(root, split, transforms)
                for split, transforms in zip(self.splits, (training, evaluation, evaluation)))
            return f"the files ship the splits ({', '.join(self.splits)})"
        source = self._open(root, train_split, None)
        fractions = {role: getattr(self, f"{role}_fraction") for role in missing}
        rest, *parts = cut_splits(len(source), list(fractions.values()), self.seed, what=f"{self.name} {train_split}")
        views = {"train": DetectionSubset(source, rest, training)}
        views.update((role, DetectionSubset(source, part, evaluation)) for role, part in zip(missing, parts))
        for role, split in zip(SPLITS[1:], self.splits[1:]):
            if role not in views:
                views[role] = self._open(root, split, evaluation)
        self.train_set, self.val_set, self.test_set = (views[role] for role in SPLITS)
        absent = " and ".join(self.splits[SPLITS.index(role)] for role in missing)
        return f"no {absent} split in the files: " + cut_note(fractions, f"the {len(source)} {train_split} images",
                                                              self.seed, stratified=False)

    def _annotation_root(self) -> Path:
        """The folder (COCO, VOC) or the dataset yaml (YOLO) the splits are read from."""
        root = Path(self.root).expanduser()
        if self.source == "yolo" and root.is_dir():
            yamls = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
            if len(yamls) != 1:
                raise UserError(f"{root} must hold exactly one dataset yaml for source 'yolo' (found {len(yamls)});"
                                f" or set data.root to the yaml itself")
            root = yamls[0]
        return root

    def _ships(self, root: Path, split: str) -> bool:
        """Whether the files hold an annotated ``split``."""
        if self.source == "coco":
            return (root / split).is_dir() and (root / "annotations" / f"instances_{split}.json").is_file()
        if self.source == "voc":
            return (root / "ImageSets" / "Main" / f"{split}.txt").is_file()
        return bool(_read_yolo_yaml(root).get(split))

    def _open(self, root: Path, split: str, transforms: v2.Compose | None) -> DetectionDataset:
        if self.source == "coco":
            return CocoDataset(root / split, root / "annotations" / f"instances_{split}.json", transforms)
        if self.source == "voc":
            if self.class_names is None:
                self.class_names = voc_class_names(root)
            return VOCDataset(root, split, self.class_names, transforms)
        return YOLODataset(root, split, transforms)

    # ------------------------------------------------------------------------------------------ the contract
    def describe(self) -> DataInfo:
        return DataInfo(num_classes=self.num_classes, class_names=self.class_names, in_chans=3,
                        image_size=self.image_size, class_counts=self.class_counts)

    def training_view(self) -> tuple[Dataset, bool]:
        dataset = self.train_set
        if self.mosaic > 0:
            dataset = Mosaic(dataset, self.mosaic, self.image_size, seed=self.seed)
        if self.mixup > 0:
            dataset = MixUp(dataset, self.mixup, self.image_size, seed=self.seed)
        return dataset, dataset is not self.train_set
