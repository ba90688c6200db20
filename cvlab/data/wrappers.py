"""Multi-image augmentation as dataset wrappers: :class:`Mosaic` and :class:`MixUp`, for detection training sets.

Each wraps a :class:`~cvlab.data.base.DetectionDataset` and is one: it reads the raw items of the dataset it wraps
(``load_at``: uint8 pixels and xyxy boxes, before any transform), combines them, and applies the wrapped dataset's
``transforms`` (the training pipeline) to the result. Wrappers nest: ``MixUp(Mosaic(train_set))`` blends two
mosaics, as YOLOv5 does.

Every random choice of an item comes from ``(seed, epoch, index)`` alone — the training loader asks for
``(epoch, index)`` keys (:class:`~cvlab.data.samplers.EpochKeyedSampler`) — so a resumed run, and any number of
loader workers, see the same combined images.

- **Mosaic** (Bochkovskiy, Wang & Liao 2020, "YOLOv4: Optimal Speed and Accuracy of Object Detection", §3.3): with
  probability ``p`` the item and three random others, each resized so that its longer side is ``size``, meet at a
  random centre of a ``size x size`` canvas (uniform over the middle half of each axis): the item reaches the
  centre from the top left, the others from the top right, the bottom left and the bottom right. What falls off
  the canvas is cut; boxes move with their image and are clipped to its visible part, and a box left under 2 px on
  a side, or with under a fifth of its area, is dropped (too little of its object remains to learn from).
- **MixUp** (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"; for detection Zhang et al. 2019, "Bag
  of Freebies for Training Object Detection Neural Networks"): with probability ``p`` the item is blended with a
  random other one, ``r * a + (1 - r) * b`` with ``r ~ Beta(alpha, alpha)``, both letterboxed to ``size`` first, and
  the boxes of both are kept. The ratio is drawn, not YOLOv4's fixed 0.5: the default ``alpha = 32`` (YOLOv5's)
  keeps ``r`` near 0.5 (standard deviation 0.06), so both images stay visible; a small ``alpha`` (the paper's 0.2 for
  classification) mostly shows one. Boxes carry no weight ``r``, since cvlab's detection losses take no per-box
  weights.
- **The last epochs without them** (``until_epoch``): from that epoch on, every item is the wrapped dataset's own.
  Training ends on images like the ones it is tested on (YOLOX's 15 ``no_aug_epochs``, YOLOv6's
  ``stop_aug_last_n_epoch=15``, Ultralytics' ``close_mosaic=10``); the datamodule's ``close_mosaic`` sets it.

Hand-written: torchvision's v2 transforms work on one image at a time (its MixUp/CutMix mix classification
labels, not boxes).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from cvlab.data.base import LETTERBOX_GREY, DetectionDataset, letterbox_geometry

_MIN_BOX_SIDE = 2.0  # px: a mosaic box thinner than this is dropped
_MIN_KEPT_AREA = 0.2  # share of a box's area that must stay on the canvas for the box to be kept

Item = tuple[Tensor, Tensor, Tensor, int]  # (uint8 image Tensor[3, H, W], boxes Tensor[N, 4], labels Tensor[N], id)


def _fit_longer_side(image: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resizes ``image`` (aspect kept) so that its longer side is ``size``; boxes follow."""
    height, width = image.shape[-2:]
    _, new_height, new_width, _, _ = letterbox_geometry(height, width, size)
    if (new_height, new_width) == (height, width):
        return image, boxes
    image = F.resize(image, [new_height, new_width], antialias=True)
    return image, boxes * boxes.new_tensor([new_width / width, new_height / height] * 2)


class _MultiImage(DetectionDataset):
    """What the wrappers share: the wrapped dataset, the probability, the output size and the item's generator."""

    def __init__(self, dataset: DetectionDataset, probability: float, size: int, seed: int,
                 until_epoch: int | None = None):
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        super().__init__(dataset.class_names, dataset.transforms)
        self.dataset, self.probability, self.size, self.seed = dataset, probability, size, seed
        self.until_epoch = until_epoch
        self.problems = dataset.problems

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Item:
        return self.load_at(index, 0)

    def _generator(self, epoch: int, index: int) -> np.random.Generator:
        # The class name keeps a mosaic's and a mixup's draws for one item independent.
        return np.random.default_rng([self.seed, zlib.crc32(type(self).__name__.encode()), epoch, index])

    def _combines(self, rng: np.random.Generator, epoch: int) -> bool:
        """Whether this draw combines images: before ``until_epoch`` (if any), with probability ``probability``."""
        if self.until_epoch is not None and epoch >= self.until_epoch:
            return False
        return rng.random() < self.probability


class Mosaic(_MultiImage):
    """Four images on one ``size x size`` canvas around a random centre, with probability ``probability``
    (see the module docstring). Items: ``(uint8 Tensor[3, size, size], boxes Tensor[N, 4], labels, image_id)``
    before the transforms, ``image_id`` being the item's own."""

    def load_at(self, index: int, epoch: int) -> Item:
        rng = self._generator(epoch, index)
        if not self._combines(rng, epoch):
            return self.dataset.load_at(index, epoch)
        size = self.size
        others = rng.integers(len(self.dataset), size=3)
        centre_x, centre_y = (int(v) for v in rng.integers(size // 4, 3 * size // 4 + 1, size=2))
        canvas = torch.full((3, size, size), LETTERBOX_GREY, dtype=torch.uint8)
        all_boxes, all_labels, image_id = [], [], None
        for corner, item in enumerate([index, *others.tolist()]):
            image, boxes, labels, item_id = self.dataset.load_at(item, epoch)
            image_id = item_id if image_id is None else image_id
            image, boxes = _fit_longer_side(image, boxes.to(torch.float32), size)
            height, width = image.shape[-2:]
            # Corners 0..3: the image ends at the centre from the top left, top right, bottom left, bottom right.
            left = centre_x - width if corner in (0, 2) else centre_x
            top = centre_y - height if corner in (0, 1) else centre_y
            x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + width, size), min(top + height, size)
            canvas[:, y0:y1, x0:x1] = image[:, y0 - top: y1 - top, x0 - left: x1 - left]
            shifted = boxes + boxes.new_tensor([left, top, left, top])
            clipped = torch.stack([shifted[:, 0].clamp(x0, x1), shifted[:, 1].clamp(y0, y1),
                                   shifted[:, 2].clamp(x0, x1), shifted[:, 3].clamp(y0, y1)], dim=1)
            sides = clipped[:, 2:] - clipped[:, :2]
            area = (shifted[:, 2:] - shifted[:, :2]).prod(dim=1)
            keep = (sides >= _MIN_BOX_SIDE).all(dim=1) & (sides.prod(dim=1) >= _MIN_KEPT_AREA * area)
            all_boxes.append(clipped[keep])
            all_labels.append(labels[keep])
        return canvas, torch.cat(all_boxes), torch.cat(all_labels), image_id


class MixUp(_MultiImage):
    """The item blended with a random other one, ratio ``r ~ Beta(alpha, alpha)``, with probability
    ``probability`` (see the module docstring). Items: ``(uint8 Tensor[3, size, size], the boxes of both
    Tensor[N1 + N2, 4], their labels, image_id)`` before the transforms, ``image_id`` being the item's own."""

    def __init__(self, dataset: DetectionDataset, probability: float, size: int, alpha: float = 32.0,
                 seed: int = 0, until_epoch: int | None = None):
        super().__init__(dataset, probability, size, seed, until_epoch)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha

    def _letterboxed(self, item: Item) -> Item:
        image, boxes, labels, image_id = item
        image, boxes = _fit_longer_side(image, boxes.to(torch.float32), self.size)
        height, width = image.shape[-2:]
        left, top = (self.size - width) // 2, (self.size - height) // 2
        canvas = torch.full((3, self.size, self.size), LETTERBOX_GREY, dtype=torch.uint8)
        canvas[:, top: top + height, left: left + width] = image
        return canvas, boxes + boxes.new_tensor([left, top, left, top]), labels, image_id

    def load_at(self, index: int, epoch: int) -> Item:
        rng = self._generator(epoch, index)
        if not self._combines(rng, epoch) or len(self.dataset) < 2:
            return self.dataset.load_at(index, epoch)
        other = int(rng.integers(len(self.dataset) - 1))
        other += other >= index  # any item but this one: a blend with itself would double every box
        ratio = float(rng.beta(self.alpha, self.alpha))
        image, boxes, labels, image_id = self._letterboxed(self.dataset.load_at(index, epoch))
        other_image, other_boxes, other_labels, _ = self._letterboxed(self.dataset.load_at(other, epoch))
        blended = (image.float() * ratio + other_image.float() * (1 - ratio)).round().to(torch.uint8)
        return blended, torch.cat([boxes, other_boxes]), torch.cat([labels, other_labels]), image_id
