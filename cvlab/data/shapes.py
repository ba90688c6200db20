"""Procedurally drawn shape scenes: embedded data for classification, detection and segmentation.

Every image is drawn from a seed with numpy's ``Generator`` and PIL's ``ImageDraw`` — nothing is downloaded,
and the same (seed, split, index) always gives the same pixels. Five classes, :data:`SHAPE_CLASSES`:
circle, square, triangle, diamond (a narrow rhombus, so it cannot be mistaken for a turned square) and cross.

A scene (:func:`draw_scene`) has

- a background: one colour, or with ``clutter=True`` a colour gradient, a few thin random lines and
  pixel noise. The lines are clutter, not objects: they carry no box and no mask label;
- objects of varied size, colour (always far from the background colour) and slight rotation (±15°), drawn
  in order, later ones over earlier ones.

Occlusion rule: every object keeps at least 60 % of its own pixels visible. A placement that would hide more
of an earlier object is re-drawn (up to 10 tries); if none fits, that object is left out of the scene
altogether. So every drawn object is annotated, and no annotated object is mostly hidden.

Boxes are the tight extent of each object's *visible* pixels in continuous pixel coordinates: pixel column
``j`` covers ``[j, j + 1)``, so an object whose pixels span columns 3..7 has ``x1 = 3, x2 = 8`` (COCO's
convention; it makes a horizontal flip exact: ``x -> W - x``). Centres are drawn so that shapes stay inside
the canvas (only a shape wider than about 0.7 of the image can lose a corner to the border).

This module is hand-written: no library draws labelled shape scenes.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from cvlab.data.base import Annotation, DetectionDataset, SegmentationDataset

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# The classes of a scene's mask: 0 is the background, k + 1 the shape SHAPE_CLASSES[k].
SHAPE_MASK_CLASSES: tuple[str, ...] = ("background", *SHAPE_CLASSES)

_MAX_TILT_DEG = 15.0
_MIN_VISIBLE_FRACTION = 0.6
_PLACEMENT_TRIES = 10
_MIN_COLOUR_DISTANCE = 150  # L1 distance in 0..765 between an object's colour and the background's
_NOISE_AMPLITUDE = 10  # uniform pixel noise in [-10, 10] on the 0..255 scale

# Outlines on the unit half-size (the shape spans [-1, 1] before rotation); the circle is drawn as an ellipse.
_CROSS_ARM = 1.0 / 3.0
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": np.array([(0, -1), (np.sqrt(3) / 2, 0.5), (-np.sqrt(3) / 2, 0.5)], dtype=np.float64),
    "diamond": np.array([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], dtype=np.float64),
    "cross": np.array(
        [(-_CROSS_ARM, -1), (_CROSS_ARM, -1), (_CROSS_ARM, -_CROSS_ARM), (1, -_CROSS_ARM), (1, _CROSS_ARM),
         (_CROSS_ARM, _CROSS_ARM), (_CROSS_ARM, 1), (-_CROSS_ARM, 1), (-_CROSS_ARM, _CROSS_ARM),
         (-1, _CROSS_ARM), (-1, -_CROSS_ARM), (-_CROSS_ARM, -_CROSS_ARM)],
        dtype=np.float64,
    ),
}


class Scene(NamedTuple):
    """One drawn scene. ``boxes``: float32 ``[N, 4]`` xyxy pixels; ``labels``: int64 ``[N]`` in ``0..C-1``;
    ``mask``: uint8 ``[H, W]`` class map, 0 = background and ``label + 1`` where an object is visible."""

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


@dataclass
class _Patch:
    """A shape's pixels in a small window: ``mask[i, j]`` is canvas pixel ``(top + i, left + j)``."""

    mask: np.ndarray
    left: int
    top: int

    def window(self, canvas_size: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The canvas slices this patch covers and the part of ``mask`` that falls inside the canvas."""
        height, width = self.mask.shape
        x0, y0 = max(self.left, 0), max(self.top, 0)
        x1, y1 = min(self.left + width, canvas_size), min(self.top + height, canvas_size)
        inside = self.mask[y0 - self.top: y1 - self.top, x0 - self.left: x1 - self.left]
        return (slice(y0, y1), slice(x0, x1)), inside


def _shape_patch(kind: str, center: tuple[float, float], size: float, angle: float) -> _Patch:
    """Rasterise one shape into a window just large enough for it (drawing small windows keeps scenes fast)."""
    if kind not in SHAPE_CLASSES:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_CLASSES}")
    half = size / 2.0
    reach = half * np.sqrt(2.0) + 2  # a rotated corner reaches at most sqrt(2) * half from the centre
    left, top = int(np.floor(center[0] - reach)), int(np.floor(center[1] - reach))
    side = int(np.ceil(2 * reach)) + 1
    window = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(window)
    cx, cy = center[0] - left, center[1] - top
    if kind == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
    else:
        theta = np.deg2rad(angle)
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = _OUTLINES[kind] @ rotation.T * half + (cx, cy)
        draw.polygon([tuple(p) for p in points], fill=1)
    return _Patch(np.asarray(window).astype(bool), left, top)


def draw_shape(kind: str, canvas_size: int, center: tuple[float, float], size: float,
               angle: float = 0.0) -> np.ndarray:
    """Pixels of one shape on an empty ``canvas_size`` square canvas.

    Args:
        kind: one of :data:`SHAPE_CLASSES`.
        center: ``(x, y)`` in pixels.
        size: the shape's extent before rotation (circle diameter, square side, ...), in pixels.
        angle: rotation in degrees (ignored for the circle).

    Returns:
        bool ``[canvas_size, canvas_size]``, True on the shape.
    """
    region, inside = _shape_patch(kind, center, size, angle).window(canvas_size)
    canvas = np.zeros((canvas_size, canvas_size), dtype=bool)
    canvas[region] = inside
    return canvas


def _background(rng: np.random.Generator, size: int, colour: np.ndarray, clutter: bool) -> np.ndarray:
    """uint8 ``[size, size, 3]`` background: flat, or a gradient crossed by a few thin lines."""
    if not clutter:
        return np.broadcast_to(colour.astype(np.uint8), (size, size, 3)).copy()
    far_colour = np.clip(colour + rng.normal(0.0, 40.0, 3), 0, 255)
    direction = rng.uniform(0.0, 2 * np.pi)
    steps = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = np.cos(direction) * steps[None, :] + np.sin(direction) * steps[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    gradient = (colour + (far_colour - colour).astype(np.float32) * ramp[..., None]).astype(np.uint8)
    image = Image.fromarray(gradient)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        ends = rng.uniform(0, size, 4)
        draw.line(list(ends), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return np.array(image)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= _MIN_COLOUR_DISTANCE:
            return colour.astype(np.uint8)


def _occludes_too_much(covered: np.ndarray, visible: np.ndarray, areas: np.ndarray) -> bool:
    """Would covering the pixels ``covered`` (their instance ids: 0 = none, i + 1 = object i) leave some object
    with fewer than 60 % of its ``areas[i]`` pixels, given ``visible[i]`` are visible now?"""
    hidden = np.bincount(covered, minlength=len(areas) + 1)[1:]
    return bool(np.any(visible - hidden < _MIN_VISIBLE_FRACTION * areas))


def draw_scene(rng: np.random.Generator, size: int = 64, n_objects: tuple[int, int] = (1, 4),
               min_size: float | None = None, max_size: float | None = None, clutter: bool = True,
               labels: Sequence[int] | None = None, center_jitter: float | None = None) -> Scene:
    """Draw one scene (see the module docstring for the rules).

    Args:
        rng: the only source of randomness.
        size: the square image's side in pixels.
        n_objects: inclusive range of how many objects to try to place.
        min_size, max_size: range of the shapes' extent in pixels (default ``size / 6`` .. ``size / 2``).
        clutter: gradient, lines and noise in the background; False gives a flat background and no noise.
        labels: draw exactly these classes, in this order (overrides ``n_objects``).
        center_jitter: None places objects anywhere inside the canvas; a fraction ``f`` keeps each centre
            within ``f * size`` of the image centre (used for one-object classification images).
    """
    min_size = max(4.0, size / 6.0) if min_size is None else float(min_size)
    max_size = size / 2.0 if max_size is None else float(max_size)
    if labels is None:
        labels = rng.integers(0, len(SHAPE_CLASSES), int(rng.integers(n_objects[0], n_objects[1] + 1))).tolist()

    background_colour = rng.integers(0, 256, 3)
    canvas = _background(rng, size, background_colour, clutter)
    instances = np.zeros((size, size), dtype=np.intp)
    areas, visible = np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    regions: list[tuple[slice, slice]] = []
    kept_labels: list[int] = []
    for label in labels:
        extent = rng.uniform(min_size, max_size)
        angle = rng.uniform(-_MAX_TILT_DEG, _MAX_TILT_DEG)
        colour = _contrasting_colour(rng, background_colour)
        # Rotation can push corners out by up to sqrt(2), so keep that margin from the border.
        margin = min(extent / 2.0 * np.sqrt(2.0), size / 2.0)
        low, high = margin, size - margin
        if center_jitter is not None:
            low, high = max(low, size / 2.0 - center_jitter * size), min(high, size / 2.0 + center_jitter * size)
        for _ in range(_PLACEMENT_TRIES):
            center = tuple(rng.uniform(low, max(low, high), 2))
            region, shape = _shape_patch(SHAPE_CLASSES[label], center, extent, angle).window(size)
            covered = instances[region][shape]
            if covered.size and not _occludes_too_much(covered, visible, areas):
                break
        else:
            continue
        visible = visible - np.bincount(covered, minlength=len(areas) + 1)[1:]
        instances[region][shape] = len(areas) + 1
        canvas[region][shape] = colour
        areas, visible = np.append(areas, covered.size), np.append(visible, covered.size)
        regions.append(region)
        kept_labels.append(int(label))

    if clutter:
        noise = rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, canvas.shape, dtype=np.int16)
        canvas = np.clip(canvas + noise, 0, 255).astype(np.uint8)
    boxes = np.zeros((len(kept_labels), 4), dtype=np.float32)
    for i, (rows, cols) in enumerate(regions):  # an object's visible pixels lie inside the window it was drawn in
        ys, xs = np.nonzero(instances[rows, cols] == i + 1)
        boxes[i] = (cols.start + xs.min(), rows.start + ys.min(), cols.start + xs.max() + 1, rows.start + ys.max() + 1)
    label_array = np.asarray(kept_labels, dtype=np.int64)
    class_of_instance = np.concatenate([[0], label_array + 1]).astype(np.uint8)
    return Scene(Image.fromarray(canvas), boxes, label_array, class_of_instance[instances])


def _split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, split, index): splits never share images, and item i does not depend on n."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


class ShapesClassification(torch.utils.data.Dataset):
    """One roughly centred shape per image; classes cycle so every class has ``n / 5`` images (± 1).

    Item: ``(Tensor[3, size, size] float in [0, 1], int label)``; ``transform`` (if given) maps the tensor.
    All images are drawn once, in ``__init__`` (2,000 32 px images take well under a second).
    """

    class_names = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)

    def __init__(self, split: str = "train", n: int = 2000, size: int = 32, seed: int = 0,
                 transform: Callable[[Tensor], Tensor] | None = None):
        self.transform = transform
        self.targets = [i % self.num_classes for i in range(n)]
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        for i, label in enumerate(self.targets):
            scene = draw_scene(_split_rng(seed, split, i), size, labels=[label], min_size=0.4 * size,
                               max_size=0.75 * size, center_jitter=0.12)
            images[i] = np.asarray(scene.image)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ShapesDetection(DetectionDataset):
    """Scenes of 1..4 shapes (by default) for detection; item as in the detection contract
    ``(Tensor[3, size, size], dict(boxes=Tensor[N, 4] xyxy, labels=Tensor[N], image_id=int))``.

    All scenes are drawn once, in ``__init__`` (1,000 64 px scenes take about a second); ``masks`` keeps the
    class maps (uint8 ``[n, size, size]``) for segmentation.
    """

    def __init__(self, split: str = "train", n: int = 1000, size: int = 64, seed: int = 0,
                 n_objects: tuple[int, int] = (1, 4), transforms: Callable | None = None):
        super().__init__(SHAPE_CLASSES, transforms)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        self.masks = np.empty((n, size, size), dtype=np.uint8)
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        for i in range(n):
            scene = draw_scene(_split_rng(seed, split, i), size, n_objects=tuple(n_objects))
            images[i] = np.asarray(scene.image)
            self.masks[i] = scene.mask
            self.boxes.append(torch.from_numpy(scene.boxes))
            self.labels.append(torch.from_numpy(scene.labels))
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.boxes)

    def load(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        return self.images[index], self.boxes[index], self.labels[index], index

    def annotation(self, index: int) -> Annotation:
        side = self.images.shape[-1]
        return Annotation(self.boxes[index], self.labels[index], side, side)


class ShapesSegmentation(SegmentationDataset):
    """Scenes of 1..4 shapes (by default) for semantic segmentation: the class maps of :func:`draw_scene`, in the
    six classes of :data:`SHAPE_MASK_CLASSES` (background, then the shapes). Item as in the segmentation contract
    ``(Tensor[3, size, size], Tensor[size, size] int64)``; the clutter lines are background.

    The shapes span ``size / 4`` to ``size / 2`` (detection's scenes start at ``size / 6``): the thinnest part of
    any shape, a cross's arm (a third of its extent), is then at least 8 px wide at 96 px, as wide as one cell of the
    stride-8 map a segmentor's head predicts from. All scenes are drawn once, in ``__init__``; ``masks`` holds them
    (uint8 ``Tensor[n, size, size]``).
    """

    def __init__(self, split: str = "train", n: int = 1500, size: int = 96, seed: int = 0,
                 n_objects: tuple[int, int] = (1, 4), transforms: Callable | None = None):
        super().__init__(SHAPE_MASK_CLASSES, transforms)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        masks = np.empty((n, size, size), dtype=np.uint8)
        for i in range(n):
            scene = draw_scene(_split_rng(seed, split, i), size, n_objects=tuple(n_objects), min_size=size / 4,
                               max_size=size / 2)
            images[i], masks[i] = np.asarray(scene.image), scene.mask
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.masks)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]

    def pixel_counts(self) -> list[int]:
        """Pixels per class over the whole split."""
        return torch.bincount(self.masks.flatten(), minlength=len(self.class_names)).tolist()
