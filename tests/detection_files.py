"""Detection datasets written in their real file formats (COCO json, Pascal VOC xml, YOLO txt) from shape scenes,
for the tests that read them (tests/data/test_detection_data.py, tests/data/test_user_data.py,
tests/test_detection_e2e.py)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cvlab.data.shapes import SHAPE_CLASSES, draw_scene

COCO_CATEGORY_IDS = [3, 7, 11, 20, 42]  # not contiguous, to exercise the id -> label mapping


def shape_scenes(label_lists: Sequence[Sequence[int]] = ((0, 1), (2, 3, 4), (4, 1)),
                 seed: int = 100) -> list[tuple[str, Image.Image, np.ndarray, np.ndarray]]:
    """One ``(stem, image, boxes xyxy, labels)`` shape scene per label list, pasted at (8, 0) on an 80 x 64 canvas
    so the images are not square. The default three hold every class, so VOC's discovery finds all five."""
    scenes = []
    for i, labels in enumerate(label_lists):
        scene = draw_scene(np.random.default_rng(seed + i), 64, labels=list(labels))
        assert scene.labels.tolist() == list(labels)
        canvas = Image.new("RGB", (80, 64), (30, 30, 30))
        canvas.paste(scene.image, (8, 0))
        scenes.append((f"img{i}", canvas, scene.boxes + np.float32([8, 0, 8, 0]), scene.labels))
    return scenes


def _save_coco(image_dir: Path, ann_file: Path, scenes, file_prefix: str = "") -> None:
    """The scenes as PNGs in ``image_dir`` and one COCO json (image ids 1, 2, ...) naming each
    ``file_prefix + stem.png``."""
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (stem, image, boxes, labels) in enumerate(scenes, start=1):
        image.save(image_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{file_prefix}{stem}.png", "width": image.width,
                       "height": image.height})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": COCO_CATEGORY_IDS[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1)})
    # Categories listed out of id order: the reader must sort them.
    categories = [{"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, SHAPE_CLASSES)][::-1]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def write_coco(root: Path, split: str, scenes) -> None:
    """``root/<split>/<stem>.png`` and ``root/annotations/instances_<split>.json`` (image ids 1, 2, ...)."""
    _save_coco(root / split, root / "annotations" / f"instances_{split}.json", scenes)


def write_coco_export(root: Path, scenes, ann_file: str = "annotations/instances_default.json",
                      file_prefix: str = "") -> None:
    """A labelling tool's COCO export, without splits: ``root/images/`` and one json. CVAT writes
    ``annotations/instances_default.json`` naming files relative to ``images/``; Label Studio ``result.json`` naming
    them ``images/<file>`` (``file_prefix="images/"``)."""
    _save_coco(root / "images", root / ann_file, scenes, file_prefix)


def write_voc(root: Path, split: str | None, scenes) -> None:
    """A VOC year folder: ``Annotations/*.xml`` (1-based inclusive pixels), ``JPEGImages/``, ``ImageSets/Main/``;
    ``split`` None writes no ``ImageSets/`` (LabelImg's layout)."""
    for folder in ("Annotations", "JPEGImages"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, image, boxes, labels in scenes:
        image.save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        objects = "".join(
            f"<object><name>{SHAPE_CLASSES[label]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}</ymin><xmax>{int(x2)}</xmax><ymax>{int(y2)}</ymax>"
            f"</bndbox></object>"
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()))
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{image.width}</width>"
            f"<height>{image.height}</height><depth>3</depth></size>{objects}</annotation>")
    if split is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s[0]}\n" for s in scenes))


def write_yolo_files(image_dir: Path, label_dir: Path, scenes) -> None:
    """PNGs in ``image_dir`` and one ``<stem>.txt`` of normalised ``cls cx cy w h`` lines each in ``label_dir``."""
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for stem, image, boxes, labels in scenes:
        image.save(image_dir / f"{stem}.png")
        w, h = image.size
        lines = [f"{label} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist())]
        (label_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def write_yolo(root: Path, split: str, scenes) -> None:
    """Ultralytics layout: ``images/<split>/``, ``labels/<split>/*.txt`` (normalised cx cy w h), ``data.yaml``."""
    write_yolo_files(root / "images" / split, root / "labels" / split, scenes)
    yaml_path = root / "data.yaml"
    config = yaml.safe_load(yaml_path.read_text()) if yaml_path.exists() else {
        "path": ".", "names": dict(enumerate(SHAPE_CLASSES))}
    config[split] = f"images/{split}"
    yaml_path.write_text(yaml.safe_dump(config))
