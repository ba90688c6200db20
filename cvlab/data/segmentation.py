"""Segmentation data: the shape scenes, a folder of images and masks, Pascal VOC's ``SegmentationClass`` and COCO
instance polygons / RLE rendered to class maps, their augmentation, and the datamodule.

Inside cvlab a mask is a class map: ``Tensor[H, W]`` int64, 0 the background (a class like the others), ``k`` the
class ``class_names[k]`` and 255 (:data:`~cvlab.data.base.IGNORE_INDEX`) where the truth is unknown: VOC's object
borders, COCO's crowd regions, the padding of a crop. Each reader converts its files to that:

- mask files (``masks``, ``voc_seg``) are read by :func:`read_mask`: a PNG of mode ``P`` gives its palette indices
  (its palette is kept for drawing), ``L`` and 16-bit greyscale their values, ``1`` 0/1, and a colour PNG whose three
  channels agree that value. A colour mask (one RGB colour per class) is refused: cvlab reads class indices. A
  ``masks`` folder whose masks hold only 0 and 255 is a binary mask saved to be seen (a known trap: 255 would be
  ignored and the foreground never learnt), so 255 is read as class 1 there and the run's log says so;
- COCO json (``coco_seg``): each annotation's polygons or RLE are rendered with pycocotools; class ``k + 1`` is the
  ``k``-th category in id order. Crowd regions (``iscrowd``) become 255; the instances are painted over them from
  the largest to the smallest, so where two overlap the smaller one lies on top (it is usually the one in front: a
  cup on a table).

Every file is checked when the data is read: each image is decoded once (cached, see
:func:`~cvlab.utils.images.check_images`) and each mask read, and all that is wrong — an image with no mask, a mask
with no image, a mask whose size differs from its image, a class value ``>= num_classes`` other than 255, a file that
cannot be read or is larger than ``data.max_image_pixels``, a file name from an annotation file that leaves the data
root, a JPEG mask (lossy compression blurs the class values at every edge) — is gathered, file by file, into one
:class:`~cvlab.utils.errors.UserError` with the count of each kind (each problem is also a line in the log). Counting
the training pixels of each class (``DataInfo.class_counts``) comes from the same pass.

Splits follow the detection readers: the files' own (``ImageSets/Segmentation/<split>.txt``,
``annotations/instances_<split>.json``, ``images/<split>/`` beside ``masks/<split>/``), and a missing validation or
test split is cut from the training split (or from the pool, when the files ship none), seeded, and said in the log.
The cut is not stratified: a mask holds many classes. VOC2012 ships ``train.txt`` and ``val.txt``, so its test set
is cut from ``train`` and ``val`` stays the official one.

Augmentation is ``torchvision.transforms.v2`` on ``tv_tensors.Image`` and ``tv_tensors.Mask``: see
:func:`segmentation_transforms`. Masks are resized with nearest-neighbour interpolation at the pixels' centres
(``NEAREST_EXACT``; v2's own choice for masks, legacy ``NEAREST``, samples the top-left of each output pixel and
shifts a shrunk mask against its image: :class:`CentredResize` is the small v2 subclass that fixes it).
:func:`segmentation_eval_transform` is the evaluation preprocessing of a single image, for ``predict`` and ``export``.

Written by hand here: the VOC colour map (:func:`voc_palette`, the devkit's bit-spreading formula), the centred mask
resize, the layout discovery and the problem report; decoding is PIL's, rendering pycocotools', the transforms
torchvision's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cvlab.data.base import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    DataInfo,
    SegmentationDataset,
    SplitDataModule,
    cut_note,
    cut_splits,
)
from cvlab.data.detection import AnnotationCollector, coco_files, escapes_root, read_coco
from cvlab.data.shapes import SHAPE_MASK_CLASSES, ShapesSegmentation
from cvlab.utils.errors import UserError
from cvlab.utils.images import check_images, open_header, open_image, too_many_pixels
from cvlab.utils.validate import (
    check_image_size,
    check_loader,
    check_min_max,
    check_names,
    check_number,
    check_probability,
    check_scene_settings,
)

log = logging.getLogger(__name__)

SOURCES = ("shapes_seg", "masks", "voc_seg", "coco_seg")
SPLITS = ("train", "val", "test")

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Class indices are 0..254: 255 is the ignore value, and masks travel as uint8.
MAX_CLASSES = IGNORE_INDEX
# Folder names a validation split ships under (as for ImageFolder): val/, Roboflow's valid/, Keras' validation/.
_VAL_FOLDERS = ("val", "valid", "validation")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_LOSSY = (".jpg", ".jpeg")
_LOGGED_PROBLEMS = 50  # problems written to the log one by one; the rest are counted


def voc_palette(num_colours: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (the devkit's ``labelcolormap``): the bits of index ``i`` are spread over red, green
    and blue, from the top bit down. Index 1 is (128, 0, 0), 15 (person) (192, 128, 128), 255 (224, 224, 192). It is
    cvlab's palette for every class map without one of its own."""
    colours = []
    for index in range(num_colours):
        red = green = blue = 0
        for bit in range(8):
            red |= ((index >> (3 * bit)) & 1) << (7 - bit)
            green |= ((index >> (3 * bit + 1)) & 1) << (7 - bit)
            blue |= ((index >> (3 * bit + 2)) & 1) << (7 - bit)
        colours.append((red, green, blue))
    return tuple(colours)


# --------------------------------------------------------------------------------------------------- transforms
class _CentredMasks:
    """Makes a v2 resize sample masks at the output pixels' centres (``NEAREST_EXACT``), where the image is sampled.
    v2 resizes a ``tv_tensors.Mask`` with legacy ``NEAREST``, which takes the top-left source pixel of each output
    pixel: shrinking by 3 moves the mask a whole source pixel against its image."""

    def _call_kernel(self, functional: Callable, inpt: Any, *args: Any, **kwargs: Any) -> Any:
        if functional is F.resize and isinstance(inpt, tv_tensors.Mask):
            kwargs["interpolation"] = v2.InterpolationMode.NEAREST_EXACT
        return super()._call_kernel(functional, inpt, *args, **kwargs)


class CentredResize(_CentredMasks, v2.Resize):
    """``v2.Resize`` with masks sampled at the pixel centres."""


class CentredRandomResize(_CentredMasks, v2.RandomResize):
    """``v2.RandomResize`` with masks sampled at the pixel centres."""


def _resize(image_size: int) -> v2.Resize:
    """The evaluation resize, to ``image_size x image_size`` whatever the aspect."""
    return CentredResize((image_size, image_size), antialias=True)


def segmentation_transforms(image_size: int, train: bool = True, hflip: float = 0.5,
                            scale: Sequence[float] = (0.5, 2.0), color_jitter: float = 0.2) -> v2.Compose:
    """The v2 pipeline for ``SegmentationDataset(transforms=...)``, called as ``(image, mask)`` on the uint8
    ``tv_tensors.Image`` and ``tv_tensors.Mask`` the datasets hand over.

    Evaluation: resize to ``image_size x image_size``. Training then adds, each left out at a neutral setting:

    - scale jitter: the side resized to ``f x image_size``, ``f`` uniform in ``scale`` (``RandomResize``), then a
      random ``image_size`` crop (``RandomCrop``), padded where the image became smaller: 0 in the image, 255
      (ignored) in the mask — MMSegmentation's resize-ratio + crop;
    - a horizontal flip with probability ``hflip``;
    - colour jitter (brightness, contrast and saturation ``color_jitter``, hue a quarter of it): images only, v2
      leaves masks alone.

    Masks are resized with nearest-neighbour interpolation in every step, so they keep their class values, sampled
    at the pixel centres as the image is (:class:`CentredResize`).
    """
    steps: list[v2.Transform] = [_resize(image_size)]
    if train:
        if tuple(scale) != (1.0, 1.0):
            low, high = (max(1, round(image_size * factor)) for factor in scale)
            steps += [CentredRandomResize(low, high + 1),  # its upper bound is exclusive
                      v2.RandomCrop(image_size, pad_if_needed=True,
                                    fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                        hue=min(color_jitter / 4, 0.5)))
    return v2.Compose(steps)


def segmentation_eval_transform(image_size: int) -> v2.Compose:
    """One image as the model sees the validation and test images: a uint8 ``Tensor[C, H, W]`` (or a PIL image) to
    float32 ``Tensor[C, image_size, image_size]`` in [0, 1], the same resize as :func:`segmentation_transforms`
    evaluates with (for ``predict`` and ``export``; the logits are mapped back to ``H x W`` by the caller)."""
    return v2.Compose([v2.ToImage(), _resize(image_size), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


# --------------------------------------------------------------------------------------------------- reading
def read_mask(path: str | Path, max_pixels: int | None = None) -> tuple[np.ndarray, list[int] | None]:
    """The class indices of a mask file, ``[H, W]`` integers, and for a palette PNG (mode ``P``) its palette as a flat
    ``[r0, g0, b0, r1, ...]`` list (else None).

    Mode ``P``: the palette indices; ``L``, ``I;16``, ``I``: the values (16-bit values are not scaled: they are
    classes); ``1``: 0 and 1; ``RGB``, ``RGBA``, ``LA`` whose colour channels agree everywhere: that value. Raises
    UserError naming the file for another mode, a colour mask, a file that cannot be read, or one with more than
    ``max_pixels`` pixels (None: :data:`~cvlab.utils.images.DEFAULT_MAX_IMAGE_PIXELS`), checked from the header as
    :func:`~cvlab.utils.images.open_image` does.
    """
    path = Path(path)
    try:
        with open_header(path) as image:
            too_large = too_many_pixels(*image.size, max_pixels)
            if too_large is not None:
                raise UserError(f"refusing mask {path}: it {too_large}")
            mode = image.mode
            palette = image.getpalette() if mode == "P" else None
            if mode in ("P", "L", *_SIXTEEN_BIT_MODES):
                values = np.asarray(image)
            elif mode == "1":
                values = np.asarray(image).astype(np.uint8)
            elif mode in ("RGB", "RGBA", "LA"):
                colours = np.asarray(image.convert("RGB"))
                if not ((colours[..., 0] == colours[..., 1]) & (colours[..., 1] == colours[..., 2])).all():
                    raise UserError(f"mask {path} is a colour image (mode {mode}); cvlab reads class indices: save "
                                    "each pixel's class number in a PNG of mode L or P")
                values = colours[..., 0]
            else:
                raise UserError(f"mask {path} has PIL mode {mode}; cvlab reads class indices from PNGs of mode L, P "
                                "or 16-bit greyscale")
    except UserError:
        raise
    except Exception as error:  # PIL raises many types for a broken file
        raise UserError(f"cannot read mask {path}: {type(error).__name__}: {error}") from None
    return values, palette


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool ``[height, width]`` of one COCO segmentation: polygons, uncompressed RLE (``counts`` a list, as crowd
    regions are written) or compressed RLE (``counts`` a string). ValueError for a malformed one."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                                       and all(isinstance(v, (int, float)) and np.isfinite(v) for v in polygon)
                                       for polygon in segmentation):
            raise ValueError("polygons must be lists of at least 3 (x, y) points")
        # pycocotools reads a list whose first entry has 4 numbers as boxes: every polygon here has >= 6.
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {list(segmentation['size'])} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise ValueError(f"RLE counts must be non-negative run lengths adding up to {height * width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError("RLE counts must be a list or a string")
    else:
        raise ValueError("no polygons or RLE ('segmentation' is missing or malformed)")
    try:
        return coco_mask.decode(rle).astype(bool)
    except Exception as error:  # a malformed compressed string
        raise ValueError(f"cannot decode the RLE ({type(error).__name__}: {error})") from None


def coco_class_map(objects: Sequence[tuple[int, Any, bool]], height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width]`` class map of one image's COCO objects ``(class index, segmentation, crowd)``: 0
    where none lies, 255 on crowd regions, then each instance's class, painted from the largest instance to the
    smallest (see the module docstring). ValueError for a malformed segmentation."""
    classes = np.zeros((height, width), dtype=np.uint8)
    decoded = [(label, crowd, _decode_segmentation(segmentation, height, width))
               for label, segmentation, crowd in objects]
    for _, _, pixels in (entry for entry in decoded if entry[1]):
        classes[pixels] = IGNORE_INDEX
    instances = sorted((entry for entry in decoded if not entry[1]), key=lambda entry: -int(entry[2].sum()))
    for label, _, pixels in instances:
        classes[pixels] = label
    return classes


@dataclass
class _Item:
    """One image and what its class map is read from: a mask file, or COCO objects ``(class, segmentation,
    crowd)``. ``name`` is the image's path relative to the data root (for messages and split files); ``size``,
    ``(height, width)``, is the image's own, set when it is checked; ``declared`` the size a json states."""

    image: Path
    name: str
    mask: Path | None = None
    objects: list[tuple[int, Any, bool]] = field(default_factory=list)
    declared: tuple[int, int] | None = None
    size: tuple[int, int] = (0, 0)
    counts: np.ndarray | None = None  # pixels per raw value 0..k (up to the largest present), set by the scan


def _class_map(item: _Item, max_pixels: int | None) -> tuple[np.ndarray, list[int] | None]:
    """The raw class values of an item (before the binary 255 -> 1 reading) and the mask's palette. UserError for a
    mask file that cannot be read, ValueError for a malformed COCO segmentation."""
    if item.mask is not None:
        return read_mask(item.mask, max_pixels)
    return coco_class_map(item.objects, *item.size), None


class SegmentationFiles(SegmentationDataset):
    """Images and class maps read from files (the ``masks``, ``voc_seg`` and ``coco_seg`` sources), already checked
    by the datamodule. ``binary``: the masks hold 0/255, and 255 is read as class 1."""

    def __init__(self, items: Sequence[_Item], class_names: Sequence[str], transforms: Callable | None = None,
                 binary: bool = False, max_image_pixels: int | None = None):
        super().__init__(class_names, transforms)
        self.items, self.binary, self.max_image_pixels = list(items), binary, max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        item = self.items[index]
        image = F.pil_to_tensor(open_image(item.image, "RGB", self.max_image_pixels))
        values, _ = _class_map(item, self.max_image_pixels)
        if self.binary:
            values = np.where(values == IGNORE_INDEX, 1, values)
        return image, torch.from_numpy(values.astype(np.uint8))


# --------------------------------------------------------------------------------------------------- problems
# The kinds of problem, each counted in the one error: phrases that follow a count.
_NO_MASK = "image(s) without a mask"
_NO_IMAGE = "mask(s) without an image"
_SIZE = "mask(s) whose size differs from the image's"
_VALUE = "mask(s) with class values out of range"
_UNREADABLE = "image(s) or mask(s) that cannot be read"
_REFUSED = "file name(s) that leave the data root"
_AMBIGUOUS = "name(s) with more than one image or mask"
_LOSSY_MASK = "JPEG mask(s) (lossy compression blurs the class values at the edges: save masks as PNG)"
_ANNOTATION = "annotation(s) without a usable segmentation, image or category"


class _Problems:
    """What is wrong with the files, by kind, each entry naming its file; :meth:`raise_if_any` makes one error."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.kinds.setdefault(kind, []).append(f"{where} ({detail})" if detail else where)

    def raise_if_any(self, name: str, root: Path) -> None:
        problems = [f"{kind.split(' (')[0]}: {entry}" for kind, entries in self.kinds.items() for entry in entries]
        if not problems:
            return
        for problem in problems[:_LOGGED_PROBLEMS]:
            log.warning("%s: %s", name, problem)
        if len(problems) > _LOGGED_PROBLEMS:
            log.warning("%s: ... and %d more problem(s)", name, len(problems) - _LOGGED_PROBLEMS)
        counts = "; ".join(f"{len(entries)} {kind}: {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
                           for kind, entries in self.kinds.items())
        raise UserError(f"{name}: {len(problems)} problem(s) with the files in {root}: {counts}; fix or remove "
                        "them (the log lists each)")


# --------------------------------------------------------------------------------------------------- layouts
@dataclass
class _Layout:
    """What a data folder holds: the items of each split the files ship, keyed train, val, test, with the split's
    name in the files; or, when they name no splits, the whole pool under ``train`` and ``found``, how the layout
    was recognised (for the log). ``class_names`` when the files name the classes; ``notes`` for the log."""

    items: dict[str, list[_Item]]
    names: dict[str, str]
    found: str | None = None
    class_names: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _files_by_name(folder: Path) -> dict[str, list[Path]]:
    """The image files below ``folder`` keyed by their path relative to it without the suffix (``a/b`` for
    ``a/b.png``); hidden files are skipped."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file():
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return found


def _pair_folders(root: Path, image_dir: Path, mask_dir: Path, problems: _Problems) -> list[_Item]:
    """The images of ``image_dir`` with the masks of the same names in ``mask_dir``."""
    images, masks = _files_by_name(image_dir), _files_by_name(mask_dir)
    items = []
    for key in sorted(images.keys() | masks.keys()):
        found_images, found_masks = images.get(key, []), masks.get(key, [])
        if len(found_images) > 1 or len(found_masks) > 1:
            problems.add(_AMBIGUOUS, ", ".join(_relative(p, root) for p in found_images + found_masks))
        elif not found_masks:
            problems.add(_NO_MASK, _relative(found_images[0], root))
        elif not found_images:
            problems.add(_NO_IMAGE, _relative(found_masks[0], root))
        elif found_masks[0].suffix.lower() in _LOSSY:
            problems.add(_LOSSY_MASK, _relative(found_masks[0], root))
        else:
            items.append(_Item(found_images[0], _relative(found_images[0], root), mask=found_masks[0]))
    return items


def _voc_folder(root: Path) -> Path:
    """The VOC year folder at or below ``root`` (``VOC2012``, ``VOCdevkit/VOC2012`` or a single other year)."""
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for folder in candidates:
        if (folder / "SegmentationClass").is_dir():
            return folder
    years = sorted(folder for folder in [*root.glob("VOC*"), *root.glob("VOCdevkit/VOC*")]
                   if (folder / "SegmentationClass").is_dir())
    if len(years) == 1:
        return years[0]
    if years:
        raise UserError(f"{root} holds {len(years)} VOC years ({', '.join(_relative(y, root) for y in years)}); "
                        "point data.root at one of them")
    raise UserError(f"{root} is not a VOC segmentation folder: expected JPEGImages/, SegmentationClass/ and "
                    "ImageSets/Segmentation/<split>.txt (in data.root, VOC2012/ or VOCdevkit/VOC2012/)")


def _voc_items(root: Path, voc: Path, stems: Sequence[str], source: str, problems: _Problems) -> list[_Item]:
    """The listed images of a VOC folder (``JPEGImages/<stem>.jpg``, another image suffix where that is missing)
    with their ``SegmentationClass/<stem>.png``; a stem that leaves the folder is refused."""
    items = []
    for stem in stems:
        if escapes_root(stem):
            problems.add(_REFUSED, f"{source}: {stem!r}")
            continue
        image = voc / "JPEGImages" / f"{stem}.jpg"
        if not image.is_file():
            image = next((p for p in sorted(image.parent.glob(f"{Path(stem).name}.*"))
                          if p.suffix.lower() in IMAGE_EXTENSIONS), image)
        mask = voc / "SegmentationClass" / f"{stem}.png"
        if not mask.is_file():
            problems.add(_NO_MASK, _relative(image, root), f"listed in {source}" if image.is_file()
                         else f"listed in {source}; the image is missing too")
        elif not image.is_file():
            problems.add(_NO_IMAGE, _relative(mask, root))
        else:
            items.append(_Item(image, _relative(image, root), mask=mask))
    return items


def _coco_items(root: Path, ann_file: Path, folders: list[Path], problems: _Problems) -> tuple[list[_Item],
                                                                                               tuple[str, ...]]:
    """The images of one COCO json with their objects ``(1 + category position, segmentation, crowd)``, and the
    class names (background first)."""
    categories, images, annotations = read_coco(ann_file)
    label_of_category = {c["id"]: k + 1 for k, c in enumerate(categories)}
    objects: dict[int, list[tuple[int, Any, bool]]] = {image_id: [] for image_id, *_ in images}
    for ann in annotations:
        where = f"{ann_file.name} annotation {ann.get('id')}"
        if ann.get("image_id") not in objects:
            problems.add(_ANNOTATION, where, f"image id {ann.get('image_id')} is not in 'images'")
        elif ann.get("category_id") not in label_of_category:
            problems.add(_ANNOTATION, where, f"unknown category id {ann.get('category_id')}")
        elif "segmentation" not in ann:
            problems.add(_ANNOTATION, where, "no 'segmentation' (polygons or RLE)")
        else:
            objects[ann["image_id"]].append((label_of_category[ann["category_id"]], ann["segmentation"],
                                             bool(ann.get("iscrowd", 0))))
    names = AnnotationCollector()  # the detection reader's file-name checks
    items = []
    for image_id, file_name, width, height in images:
        path = names.image_path(f"{ann_file.name} image {file_name}", folders, file_name)
        if path is not None:
            declared = (int(height), int(width)) if width and height else None
            items.append(_Item(path, _relative(path, root), objects=objects[image_id], declared=declared))
    for refusal in names.problems:
        problems.add(_REFUSED, refusal)
    return items, ("background", *(str(c["name"]) for c in categories))


# --------------------------------------------------------------------------------------------------- datamodule
def _check_arguments(source: str, root, image_size, batch_size, num_workers, hflip, scale, color_jitter, sizes,
                     n_objects, class_names, num_classes, ann, max_image_pixels) -> None:
    """The datamodule's arguments, checked before anything is read (one line each, naming the data.* key)."""
    if source not in SOURCES:
        raise UserError(f"unknown segmentation data source {source!r}; choose one of {', '.join(SOURCES)}")
    check_loader(batch_size, num_workers)
    check_image_size("data.image_size", image_size)
    check_probability("data.hflip", hflip)
    check_number("data.color_jitter", color_jitter, 0)
    check_min_max("data.scale", scale, "a [min, max] range of zoom factors, e.g. [0.5, 2.0]", 0, low_open=True)
    check_number("data.num_classes", num_classes, 2, MAX_CLASSES, integer=True, optional=True,
                 hint=" (background included; 255 marks ignored pixels)")
    check_names("data.class_names", class_names)
    if class_names is not None and source != "masks":
        raise UserError(f"data.class_names names the classes of a masks folder; {source} names its own, leave "
                        "data.class_names=null")
    if ann is not None and source != "coco_seg":
        raise UserError(f"data.ann names a COCO json; data source {source!r} reads none, leave data.ann=null")
    check_number("data.max_image_pixels", max_image_pixels, 1, integer=True, optional=True)
    fixed = {"shapes_seg": len(SHAPE_MASK_CLASSES), "voc_seg": len(VOC_CLASSES)}.get(source)
    if fixed is not None and num_classes is not None and num_classes != fixed:
        raise UserError(f"{source}: data.num_classes={num_classes} but the data has {fixed} classes (background "
                        f"included); leave data.num_classes={fixed} (or null).")
    if source == "shapes_seg":
        if max_image_pixels is not None:
            raise UserError("data.max_image_pixels limits the image files read; shapes_seg draws its images, leave "
                            "it null")
        check_scene_settings(sizes, n_objects, 16)
    elif not root:
        raise UserError(f"data source {source!r} needs data.root=PATH")
    elif not Path(str(root)).expanduser().is_dir():
        raise UserError(f"data.root {str(root)!r} is not a folder; point it at the {source} dataset.")


class SegmentationDataModule(SplitDataModule):
    """Train/val/test loaders of one segmentation source, every image and mask resized to ``image_size`` square.

    ======================  ==================================================================================
    ``source``              data (``root``: the folder)
    ======================  ==================================================================================
    ``shapes_seg``          embedded shape scenes drawn at ``image_size``, six classes (background + the shapes):
                            ``train_size`` / ``val_size`` / ``test_size`` scenes (``test_size`` None: ``val_size``)
                            of ``n_objects`` shapes
    ``masks``               ``images/`` beside ``masks/`` with the same file names (``images/a/b.jpg`` ->
                            ``masks/a/b.png``), or ``images/<split>/`` beside ``masks/<split>/`` (splits
                            ``train``, ``val`` / ``valid`` / ``validation``, ``test``; other names with
                            ``train_split`` ...). Class ``k`` is named by line ``k`` of a ``classes.txt`` (in
                            ``root`` or ``masks/``) or ``class_names``, else ``class_<k>``; the number of classes
                            is then ``num_classes``, or the largest value in the masks + 1 (said in the log)
    ``voc_seg``             a VOC year folder (``VOC2012/``, or ``VOCdevkit/`` holding it): ``JPEGImages/``,
                            ``SegmentationClass/`` palette PNGs, ``ImageSets/Segmentation/<split>.txt``; the 21
                            VOC classes and VOC's palette. Without the lists: every mask is the pool
    ``coco_seg``            as the detection ``coco`` source (``annotations/instances_<split>.json`` beside
                            ``<split>/``, or one json of an export, or ``ann``): instance polygons and RLE rendered
                            to class maps, class ``k + 1`` = the ``k``-th category by id, crowd regions ignored
    ======================  ==================================================================================

    A split the files lack is cut from the training split (or the pool), seeded, ``ceil(fraction x N)`` images for
    ``val_fraction`` / ``test_fraction``, unstratified; the log says how, and :meth:`split_files` lists each split's
    files. Every file is checked at set-up and every problem is reported in one UserError (see the module
    docstring). After :meth:`setup`: ``class_names``, ``num_classes`` (background included), ``class_counts``
    (training pixels per class, ignored ones left out), ``palette`` (one colour per class: a palette PNG's own, else
    VOC's colour map) and ``binary`` (a masks folder of 0/255 masks read as 0/1).

    ``augment=False`` gives the training set the evaluation pipeline; ``hflip``, ``scale`` and ``color_jitter`` are
    those of :func:`segmentation_transforms`. ``max_image_pixels`` bounds every image and mask file read (None:
    PIL's limit). ``sampler`` is offered ``num_samples``, ``num_classes``, ``class_counts`` (pixels) and ``seed``.
    """

    kind = "segmentation"

    def __init__(self, source: str = "shapes_seg", root: str | None = None, image_size: int = 96,
                 batch_size: int = 16, num_workers: int = 0, augment: bool = True, hflip: float = 0.5,
                 scale: Sequence[float] = (0.5, 2.0), color_jitter: float = 0.2, seed: int = 0,
                 train_size: int = 1500, val_size: int = 200, test_size: int | None = None,
                 n_objects: Sequence[int] = (1, 4), train_split: str | None = None, val_split: str | None = None,
                 test_split: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 class_names: Sequence[str] | None = None, num_classes: int | None = None, name: str | None = None,
                 sampler: dict | None = None, ann: str | None = None, max_image_pixels: int | None = None):
        _check_arguments(source, root, image_size, batch_size, num_workers, hflip, scale, color_jitter,
                         (train_size, val_size, test_size), n_objects, class_names, num_classes, ann,
                         max_image_pixels)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, sampler=sampler,
                         val_fraction=val_fraction, test_fraction=test_fraction)
        self.source, self.root, self.image_size, self.name = source, root, image_size, name or source
        self.augment = augment
        self.augmentation = {"hflip": hflip, "scale": tuple(scale), "color_jitter": color_jitter}
        self.sizes = (train_size, val_size, val_size if test_size is None else test_size)
        self.n_objects = tuple(n_objects)
        self.given_splits = (train_split, val_split, test_split)
        self.ann, self.max_image_pixels = ann, max_image_pixels
        self.given_class_names = tuple(class_names) if class_names else None
        self.expected_num_classes = num_classes
        self.class_names: tuple[str, ...] = SHAPE_MASK_CLASSES if source == "shapes_seg" else ()
        self.num_classes = len(self.class_names) or num_classes
        self.class_counts: tuple[int, ...] = ()
        self.palette: tuple[tuple[int, int, int], ...] | None = None
        self.binary = False

    # ------------------------------------------------------------------------------------------ reading
    def read(self) -> None:
        evaluation = segmentation_transforms(self.image_size, train=False)
        training = segmentation_transforms(self.image_size, train=True, **self.augmentation) if self.augment \
            else evaluation
        if self.source == "shapes_seg":
            self.train_set, self.val_set, self.test_set = (
                ShapesSegmentation(split, size, self.image_size, self.seed, self.n_objects, transforms)
                for split, size, transforms in zip(SPLITS, self.sizes, (training, evaluation, evaluation)))
            self.class_counts = tuple(self.train_set.pixel_counts())
            self.palette = voc_palette(len(self.class_names))
            note = f"three splits drawn from seed {self.seed}"
        else:
            note = self._read_files(training, evaluation)
        self.note(f"data {self.name}: {note}; {len(self.train_set)} / {len(self.val_set)} / {len(self.test_set)} "
                  f"train / val / test images, {self.num_classes} classes")

    def _read_files(self, training: v2.Compose, evaluation: v2.Compose) -> str:
        """Sets the three splits of a file source, their file lists, classes, pixel counts and palette; returns how
        the splits were made, for the log."""
        root = Path(str(self.root)).expanduser()
        problems = _Problems()
        layout = {"masks": self._masks_layout, "voc_seg": self._voc_layout,
                  "coco_seg": self._coco_layout}[self.source](root, problems)
        class_names = layout.class_names
        limit = len(class_names) if class_names else self.expected_num_classes
        palette = self._scan([item for role_items in layout.items.values() for item in role_items], limit, problems)
        problems.raise_if_any(self.name, root)
        items = dict(layout.items)
        if not items["train"]:
            raise UserError(f"{self.name}: no image with a mask in {root}")
        missing = [role for role in SPLITS[1:] if role not in items]
        if not missing:
            note = f"the files ship the splits ({', '.join(layout.names.values())})"
        else:
            pool = items["train"]
            fractions = {role: getattr(self, f"{role}_fraction") for role in missing}
            rest, *parts = cut_splits(len(pool), list(fractions.values()), self.seed,
                                      what=f"{self.name} {layout.names['train']}")
            items["train"] = [pool[i] for i in rest]
            items.update((role, [pool[i] for i in part]) for role, part in zip(missing, parts))
            if layout.found:
                note = f"{layout.found}, no splits: " + cut_note(fractions, f"the {len(pool)} images", self.seed,
                                                                  stratified=False)
            else:
                absent = " and ".join(self._split_name(SPLITS.index(role)) for role in missing)
                note = f"no {absent} split in the files: " + cut_note(
                    fractions, f"the {len(pool)} {layout.names['train']} images", self.seed, stratified=False)
        note = "; ".join([*layout.notes, note])
        counts = {role: self._sum_counts(role_items) for role, role_items in items.items()}
        if self.source == "masks":
            class_names = self._read_values(counts, class_names, limit, root)
        self.check_num_classes(self.name, self.expected_num_classes, class_names)
        self.class_names, self.num_classes = tuple(class_names), len(class_names)
        self.class_counts = tuple(int(c) for c in counts["train"][:self.num_classes])
        self.palette = self._palette(palette)
        self.train_set, self.val_set, self.test_set = (
            SegmentationFiles(items[role], self.class_names, transforms, self.binary, self.max_image_pixels)
            for role, transforms in zip(SPLITS, (training, evaluation, evaluation)))
        self.files = {role: [item.name for item in items[role]] for role in SPLITS}
        return note

    def _read_values(self, counts: dict[str, np.ndarray], class_names: tuple[str, ...] | None, limit: int | None,
                     root: Path) -> tuple[str, ...]:
        """How a masks folder's values read: 0/255 everywhere is binary (255 -> 1, in ``counts`` too), and without
        names the classes are ``class_<k>``, as many as ``limit`` or else the largest value + 1."""
        every = sum(counts.values())
        self.binary = bool(every[IGNORE_INDEX]) and not every[1:IGNORE_INDEX].any()
        if self.binary:
            for role_counts in counts.values():
                role_counts[1], role_counts[IGNORE_INDEX] = role_counts[IGNORE_INDEX], 0
            self.note(f"data {self.name}: every mask holds only 0 and 255: a binary mask saved to be seen, read as 0 "
                      "(background) and 1 (foreground)")
        if class_names is not None:
            return class_names
        if limit is None:
            used = np.flatnonzero(sum(counts.values())[:IGNORE_INDEX])
            limit = int(used.max()) + 1 if len(used) else 1
            if limit < 2:
                raise UserError(f"{self.name}: every mask in {root} is 0 (background): nothing to segment")
            self.note(f"data {self.name}: {limit} classes, from the largest class value in the masks ({limit - 1}); "
                      "data.num_classes or a classes.txt sets the number")
        return tuple(f"class_{k}" for k in range(limit))

    @staticmethod
    def _sum_counts(items: Sequence[_Item]) -> np.ndarray:
        """Pixels per value 0..255 over ``items``."""
        total = np.zeros(IGNORE_INDEX + 1, dtype=np.int64)
        for item in items:
            total[:len(item.counts)] += item.counts
        return total

    def _scan(self, items: Sequence[_Item], limit: int | None, problems: _Problems) -> list[int] | None:
        """Checks every image and reads every class map once, setting each item's size and pixel counts; returns
        the first palette PNG's palette. ``limit``: the number of classes, when known (larger values are
        problems)."""
        root = Path(str(self.root)).expanduser()
        checks = check_images([item.image for item in items], self.max_image_pixels)
        palette = None
        for item in items:
            check = checks[item.image]
            if check.problem is not None:
                problems.add(_NO_IMAGE if check.problem == "not found" else _UNREADABLE, item.name,
                             "" if check.problem == "not found" else f"image {check.problem}")
                continue
            item.size = (check.height, check.width)
            if item.declared is not None and item.declared != item.size:
                problems.add(_SIZE, item.name, f"the json says {item.declared[1]}x{item.declared[0]}, the image is "
                                               f"{check.width}x{check.height}")
                continue
            try:
                values, item_palette = _class_map(item, self.max_image_pixels)
            except (UserError, ValueError) as error:
                problems.add(_ANNOTATION if item.mask is None else _UNREADABLE, item.name, str(error))
                continue
            where = item.name if item.mask is None else _relative(item.mask, root)
            if values.shape != item.size:
                problems.add(_SIZE, where, f"mask {values.shape[1]}x{values.shape[0]}, image "
                                           f"{check.width}x{check.height}")
                continue
            if values.size and (int(values.min()) < 0 or int(values.max()) > IGNORE_INDEX):
                problems.add(_VALUE, where, f"values {int(values.min())}..{int(values.max())}: class indices are "
                                            f"0..{MAX_CLASSES - 1}, 255 ignored")
                continue
            found = np.bincount(values.ravel())
            if limit is not None and found[limit:IGNORE_INDEX].any():
                wrong = (np.flatnonzero(found[limit:IGNORE_INDEX]) + limit).tolist()
                problems.add(_VALUE, where, f"class value(s) {', '.join(map(str, wrong[:5]))}"
                                            f"{', ...' if len(wrong) > 5 else ''} but the data has {limit} classes "
                                            f"(0..{limit - 1}; 255 is ignored)")
                continue
            item.counts = found
            palette = palette if palette is not None else item_palette
        return palette

    def _palette(self, flat: list[int] | None) -> tuple[tuple[int, int, int], ...]:
        """One colour per class: VOC's for voc_seg, the first palette PNG's where it has one for the class, else
        VOC's colour map."""
        default = voc_palette(self.num_classes)
        if flat is None or self.source == "voc_seg":
            return default
        own = [tuple(flat[3 * k: 3 * k + 3]) for k in range(min(len(flat) // 3, self.num_classes))]
        return tuple(own) + default[len(own):]

    def _split_name(self, position: int) -> str:
        defaults = ("train2017", "val2017", "test2017") if self.source == "coco_seg" else SPLITS
        return self.given_splits[position] or defaults[position]

    def _masks_layout(self, root: Path, problems: _Problems) -> _Layout:
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise UserError(f"{root} is not a masks folder: expected images/ beside masks/, holding files of the "
                            "same names (images/a.jpg and masks/a.png), or images/<split>/ beside masks/<split>/")
        class_names = self._masks_class_names(root)
        for role, given in zip(SPLITS, self.given_splits):
            if given is not None and not (images / given).is_dir():  # a split named by the user is a folder
                folders = sorted(d.name for d in images.iterdir() if d.is_dir())
                raise UserError(f"data.{role}_split={given}: no images/{given}/ in {root} (its folders: "
                                f"{', '.join(folders) or 'none'}); name a split folder or leave data.{role}_split=null")
        candidates = {"train": [self._split_name(0)],
                      "val": [self.given_splits[1]] if self.given_splits[1] else list(_VAL_FOLDERS),
                      "test": [self._split_name(2)]}
        shipped = {role: next((name for name in names if (images / name).is_dir()), None)
                   for role, names in candidates.items()}
        shipped = {role: name for role, name in shipped.items() if name is not None}
        if "train" not in shipped:
            return _Layout({"train": _pair_folders(root, images, masks, problems)}, {"train": "all"},
                           "images/ and masks/ without split folders", class_names)
        items = {role: _pair_folders(root, images / name, masks / name, problems) for role, name in shipped.items()}
        items = {role: found for role, found in items.items() if found or role == "train"}  # empty: cut instead
        return _Layout(items, {role: shipped[role] for role in items}, None, class_names)

    def _masks_class_names(self, root: Path) -> tuple[str, ...] | None:
        """``data.class_names``, else the lines of a ``classes.txt`` (in ``root`` or ``masks/``); None: unnamed."""
        listed = next((path for path in (root / "classes.txt", root / "masks" / "classes.txt") if path.is_file()),
                      None)
        from_file = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip()) if listed else None
        if self.given_class_names and from_file and self.given_class_names != from_file:
            raise UserError(f"data.class_names={list(self.given_class_names)} but {listed} lists {list(from_file)}; "
                            "give one of them")
        names = self.given_class_names or from_file
        if names is not None:
            check_names(f"the class names of {listed}" if listed and not self.given_class_names else
                        "data.class_names", list(names))
            if not 2 <= len(names) <= MAX_CLASSES:
                raise UserError(f"{self.name}: {len(names)} class names; a mask has 2 to {MAX_CLASSES} classes "
                                "(background included)")
        return names

    def _voc_layout(self, root: Path, problems: _Problems) -> _Layout:
        voc = _voc_folder(root)
        lists = voc / "ImageSets" / "Segmentation"
        if not (lists / f"{self._split_name(0)}.txt").is_file():
            stems = sorted(path.stem for path in (voc / "SegmentationClass").glob("*.png"))
            return _Layout({"train": _voc_items(root, voc, stems, "SegmentationClass/", problems)}, {"train": "all"},
                           "SegmentationClass/ without ImageSets/Segmentation/", VOC_CLASSES)
        items, names, notes = {}, {}, []
        for position, role in enumerate(SPLITS):
            split = self._split_name(position)
            listed = lists / f"{split}.txt"
            if not listed.is_file():
                continue
            stems = listed.read_text().split()
            if role != "train" and not any((voc / "SegmentationClass" / f"{stem}.png").is_file() for stem in stems
                                           if not escapes_root(stem)):
                notes.append(f"{split}.txt lists no image with a mask (VOC's test images are unannotated)")
                continue
            items[role] = _voc_items(root, voc, stems, _relative(listed, root), problems)
            names[role] = split
        return _Layout(items, names, None, VOC_CLASSES, notes)

    def _coco_layout(self, root: Path, problems: _Problems) -> _Layout:
        files, names, found = coco_files(root, tuple(self._split_name(k) for k in range(3)), self.ann)
        items, class_names = {}, None
        for role, (ann_file, folders) in files.items():
            items[role], role_names = _coco_items(root, ann_file, folders, problems)
            if class_names is not None and role_names != class_names:
                raise UserError(f"{self.name}: the train categories {list(class_names[1:])} differ from the {role} "
                                f"categories {list(role_names[1:])} ({_relative(ann_file, root)})")
            class_names = role_names
        if len(class_names) > MAX_CLASSES:
            raise UserError(f"{self.name}: {len(class_names) - 1} categories; at most {MAX_CLASSES - 1} fit a mask")
        return _Layout(items, names, found, class_names)

    # ------------------------------------------------------------------------------------------ the contract
    def describe(self) -> DataInfo:
        return DataInfo(num_classes=self.num_classes, class_names=self.class_names, in_chans=3,
                        image_size=self.image_size, class_counts=self.class_counts, ignore_index=IGNORE_INDEX,
                        palette=self.palette)
