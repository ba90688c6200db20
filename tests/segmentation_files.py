"""Segmentation datasets written in their real file formats — a masks folder (palette PNGs), Pascal VOC's
SegmentationClass layout, COCO polygons / RLE / crowd — for the tests that read them (tests/data/
test_segmentation_data.py, and any test that trains on a masks folder). Each writer returns the class maps the files
must read back as, keyed by file stem."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from cvlab.data.base import IGNORE_INDEX
from cvlab.data.segmentation import voc_palette

# The palette of the masks folder's PNGs (not VOC's, so that reading it back is seen), and its class names.
PNG_PALETTE = [(0, 0, 0), (250, 20, 20), (20, 250, 20), (20, 20, 250)]
MASK_CLASSES = ("background", "road", "car", "sky")


def save_palette_png(values: np.ndarray, path: Path, palette=PNG_PALETTE) -> None:
    """``values`` as a mode P PNG carrying ``palette`` (the rest of its 256 entries white)."""
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    flat = [v for colour in palette for v in colour]
    image.putpalette(flat + [255] * (768 - len(flat)))
    image.save(path)


def class_map(k: int, side: int = 16) -> np.ndarray:
    """Mask ``k`` of a masks folder: two rectangles of classes 1..3, the top row ignored (255) in odd masks."""
    values = np.zeros((side, side), dtype=np.uint8)
    values[side // 8: side * 5 // 8, 1 + k % 4: side // 2 + 1 + k % 4] = 1 + k % 3
    values[side * 11 // 16: side * 15 // 16, side * 3 // 16: side * 13 // 16] = 1 + (k + 1) % 3
    if k % 2:
        values[0] = IGNORE_INDEX
    return values


def colour_image(values: np.ndarray) -> Image.Image:
    """An image whose pixels have their class's colour (grey where ignored): a model learns it at once, and the
    alignment of image and mask can be read off it."""
    colours = np.array([*PNG_PALETTE, *[(128, 128, 128)] * (256 - len(PNG_PALETTE))], dtype=np.uint8)
    return Image.fromarray(colours[values])


def write_masks_folder(root: Path, count: int = 10, side: int = 16) -> dict[str, np.ndarray]:
    """``root/images/img<k>.png`` + ``root/masks/img<k>.png`` (palette PNGs of :func:`class_map`) and a
    ``classes.txt`` naming :data:`MASK_CLASSES`; no split folders."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    maps = {}
    for k in range(count):
        maps[f"img{k}"] = class_map(k, side)
        colour_image(maps[f"img{k}"]).save(root / "images" / f"img{k}.png")
        save_palette_png(maps[f"img{k}"], root / "masks" / f"img{k}.png")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in MASK_CLASSES))
    return maps


def write_voc_seg(root: Path, side: int = 16) -> dict[str, np.ndarray]:
    """``root`` (a VOCdevkit folder) ``/VOC2012`` with 8 segmented images (``train.txt``: 6, ``val.txt``: 2), VOC
    palette PNGs with 255 borders, and a ``test.txt`` listing a 9th image without a mask (as VOC2012's test images
    are)."""
    voc = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    maps = {}
    for k in range(9):
        Image.fromarray(np.full((side, side, 3), 20 * k, dtype=np.uint8)).save(voc / "JPEGImages" / f"2007_{k}.jpg")
        if k == 8:
            continue
        values = np.zeros((side, side), dtype=np.uint8)
        values[3:12, 3:12] = IGNORE_INDEX  # VOC's border around an object
        values[4:11, 4:11] = 15 if k % 2 else 1  # person / aeroplane
        values[13:, :k + 1] = 20
        maps[f"2007_{k}"] = values
        save_palette_png(values, voc / "SegmentationClass" / f"2007_{k}.png", voc_palette())
    lists = voc / "ImageSets" / "Segmentation"
    lists.joinpath("train.txt").write_text("".join(f"2007_{k}\n" for k in range(6)))
    lists.joinpath("val.txt").write_text("2007_6\n2007_7\n")
    lists.joinpath("test.txt").write_text("2007_8\n")
    return maps


def rectangle(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A COCO polygon around pixels ``x0..x1 - 1``, ``y0..y1 - 1`` (COCO's coordinates are the pixels' edges)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(region: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations are written): run lengths of the column-major pixels, starting
    with 0s."""
    flat, runs, current, length = region.flatten(order="F"), [], 0, 0
    for value in flat:
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    return {"size": list(region.shape), "counts": runs}


def coco_scene(height: int, width: int) -> tuple[list[dict], np.ndarray]:
    """One image's annotations (category 3 = class 1, 7 = class 2; at least 16 x 16) and the class map they must
    give: a small instance listed before a large one that covers it, a polygon in two parts, a crowd region
    (uncompressed RLE) and an instance over it (compressed RLE)."""
    expected = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[8:, 10:] = 1
    over_crowd = np.zeros((height, width), dtype=np.uint8)
    over_crowd[10:13, 11:] = 1
    encoded = coco_mask.encode(np.asfortranarray(over_crowd))
    annotations = [
        {"id": 1, "category_id": 7, "segmentation": [rectangle(4, 2, 8, 6)], "iscrowd": 0},
        {"id": 2, "category_id": 3, "segmentation": [rectangle(0, 0, 9, 7), rectangle(0, 9, 3, 11)], "iscrowd": 0},
        {"id": 3, "category_id": 3, "segmentation": uncompressed_rle(crowd), "iscrowd": 1},
        {"id": 4, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [height, width], "counts": encoded["counts"].decode()}},
    ]
    expected[0:7, 0:9] = 1
    expected[9:11, 0:3] = 1
    expected[2:6, 4:8] = 2  # smaller, so on top of the large one listed after it
    expected[8:, 10:] = IGNORE_INDEX
    expected[10:13, 11:] = 2
    return annotations, expected


COCO_CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # out of id order: class 1 is cat


def write_coco_seg(root: Path, ann_file: str, images: list[dict], annotations: list[dict],
                   image_folder: str = "images", categories: list[dict] = COCO_CATEGORIES) -> None:
    """The ``images`` (each a COCO image entry with ``width`` and ``height``) as flat PNGs in ``root/image_folder/``
    (an export's ``images/``, or COCO's own ``train2017/``) and one json ``root/ann_file`` with them, ``annotations``
    and ``categories`` (by default 7 "dog" and 3 "cat", listed out of id order: the reader sorts them)."""
    (root / image_folder).mkdir(parents=True, exist_ok=True)
    for image in images:
        Image.fromarray(np.full((image["height"], image["width"], 3), 10 * image["id"], dtype=np.uint8)).save(
            root / image_folder / image["file_name"])
    path = root / ann_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
