"""Selective-search region proposals and their cache on disk: the proposals of R-CNN and Fast R-CNN.

Paper: Uijlings, van de Sande, Gevers & Smeulders 2013, "Selective Search for Object Recognition" (IJCV).

What OpenCV does (``cv2.ximgproc.segmentation``, in opencv-contrib-python-headless): it segments the image with
Felzenszwalb & Huttenlocher's graph method in several colour spaces and thresholds ``k``, groups neighbouring regions
hierarchically by colour, texture, size and fill similarity, and returns the box of every region of every hierarchy,
exact duplicates removed, ordered by a pseudo-random rank: a random number times the region's level. The paper counts
the level from the top (the whole image is 1), OpenCV from the initial segments, so OpenCV's order leads with small
regions and ``max_proposals`` cuts large ones first (R-CNN kept every box). ``fast`` is the paper's fast mode (HSV and
Lab, two similarity combinations; OpenCV's ``k`` = 150, 300, 450, R-CNN's MATLAB code 50, 100), as R-CNN used it;
``quality`` uses five colour spaces, five ``k`` and four combinations.

What cvlab adds by hand, and why:

- **A reproducible order.** OpenCV draws the rank from C's ``rand()``, so one image gives its boxes in another order
  in every call, and ``max_proposals`` keeps other boxes. cvlab seeds that generator (``srand(0)`` through ctypes)
  right before each call (on Linux and macOS; elsewhere the order may vary, and the cache fixes what a run sees).
- **Elongated images.** OpenCV builds older than the 2019 fix (opencv_contrib issue 2102, pull request 2132) raise
  on an image whose sides differ by more than about 2.4 (1 + √2: the texture similarity crops its 45°-rotated
  gradients at a negative offset). Such an image is padded with black at the bottom or right to a ratio of
  :data:`MAX_ASPECT` (a margin below 2.4 for rounding) and the boxes are clipped back to it, so that any OpenCV
  build works (a system or conda one included).
- **The boxes.** OpenCV's integer ``(x, y, w, h)`` rects become absolute ``xyxy`` float32 (a rect covering pixel
  columns ``x .. x + w - 1`` is ``[x, x + w)`` in cvlab's continuous coordinates), clipped to the image; boxes with a
  side under ``min_size`` px are dropped (R-CNN drops those under 20 px on PASCAL's ~500 px images; the default
  :data:`DEFAULT_MIN_SIZE` keeps the objects of 64 px shape scenes) and so are duplicates (the first kept), then the
  first ``max_proposals`` are kept. On PASCAL the fast mode gives about 2000 boxes an image.
- **One OpenCV thread.** The segmentation and the grouping are serial; OpenCV's thread pool would only speed its
  colour conversions and gradients, and N loader workers, each with a pool as wide as the machine, oversubscribe it.
  cvlab runs one image per process instead (:func:`cvlab.data.proposals.precompute_proposals` fills the cache with
  one loader worker per core).

:class:`ProposalCache` keeps them on disk: one ``.npy`` (read with ``allow_pickle=False``) per image content and
settings under ``$CVLAB_CACHE/proposals`` (default ``~/.cache/cvlab/proposals``), written atomically, so concurrent
loader workers and DDP ranks never read half a file. A file that is unreadable, truncated, of an absurd shape or
holding boxes outside its image is recomputed, never trusted.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from cvlab.utils.cache import cache_dir, write_atomic
from cvlab.utils.errors import UserError, suggest
from cvlab.utils.validate import check_choice, check_number

__all__ = ["DEFAULT_MIN_SIZE", "MAX_ASPECT", "METHODS", "MODES", "ProposalCache", "compute_proposals",
           "proposal_settings", "selective_search"]

log = logging.getLogger(__name__)

METHODS = ("selective_search",)
MODES = ("fast", "quality")
DEFAULT_MIN_SIZE = 8
MAX_ASPECT = 2.0  # longer side / shorter side handed to OpenCV (see the module docstring)
# More proposals than any detector uses (R-CNN: ~2000); bounds the size of a cache file that is trusted.
MAX_PROPOSALS = 100_000
_DEFAULTS = {"method": "selective_search", "mode": "fast", "max_proposals": 2000, "min_size": DEFAULT_MIN_SIZE}
# Part of every cache key: raise it when the boxes cvlab makes of OpenCV's output change.
_CACHE_VERSION = 1
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


# ------------------------------------------------------------------------------------------------- settings
def proposal_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's ``proposals:`` settings, checked and completed with the defaults: ``method`` (selective_search),
    ``mode`` (fast or quality), ``max_proposals`` (2000) and ``min_size`` (px, :data:`DEFAULT_MIN_SIZE`). A wrong key
    or value raises :class:`~cvlab.utils.errors.UserError` naming ``model.proposals.<key>``."""
    settings = dict(settings or {})
    unknown = [key for key in settings if key not in _DEFAULTS]
    if unknown:
        raise UserError(f"model.proposals has no key {unknown[0]!r}.{suggest(unknown[0], _DEFAULTS)} Keys: "
                        f"{', '.join(_DEFAULTS)}.")
    settings = {**_DEFAULTS, **settings}
    check_choice("model.proposals.method", settings["method"], METHODS)
    check_choice("model.proposals.mode", settings["mode"], MODES)
    check_number("model.proposals.max_proposals", settings["max_proposals"], 1, MAX_PROPOSALS, integer=True)
    check_number("model.proposals.min_size", settings["min_size"], 1, integer=True)
    return settings


# ------------------------------------------------------------------------------------------------- proposals
@functools.cache
def _opencv():
    """``cv2`` with its contrib modules, set to one thread (see the module docstring)."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "ximgproc"):
        raise UserError("selective search needs OpenCV's contrib modules: pip install opencv-contrib-python-headless "
                        "(and uninstall opencv-python, whose cv2 lacks cv2.ximgproc and shadows it)")
    cv2.setNumThreads(1)
    return cv2


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """The C library whose ``rand()`` OpenCV's selective search draws from (the process's own symbols on POSIX)."""
    try:
        return ctypes.CDLL(None) if os.name == "posix" else None
    except OSError:
        return None


def _as_uint8(image: Tensor) -> Tensor:
    """``Tensor[3, H, W]`` uint8 of an RGB image given as uint8 or as float in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"selective search takes an RGB image Tensor[3, H, W], got shape {tuple(image.shape)}")
    if image.is_floating_point():
        return image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if image.dtype != torch.uint8:
        raise ValueError(f"selective search takes a uint8 or float image, got {image.dtype}")
    return image.detach().cpu()


def _unique_in_order(boxes: Tensor) -> Tensor:
    """The rows of ``boxes`` without repeats, each at its first place."""
    if len(boxes) < 2:
        return boxes
    unique, inverse = torch.unique(boxes, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(boxes), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(boxes)), reduce="amin")
    return boxes[first.sort().values]


def selective_search(image: Tensor, mode: str = "fast", max_proposals: int = 2000,
                     min_size: int = DEFAULT_MIN_SIZE) -> Tensor:
    """Selective-search proposals of one RGB image ``Tensor[3, H, W]`` (uint8, or float in [0, 1]).

    Returns ``Tensor[K, 4]`` float32, absolute ``xyxy`` in the image's pixels, ``K <= max_proposals``, in selective
    search's (seeded) rank order, inside the image, each side at least ``min_size`` px, without duplicates.
    ``mode``: ``fast`` (R-CNN's) or ``quality``; ``min_size`` >= 1 (a box clipped to nothing is always dropped).
    See the module docstring for what is OpenCV's and what cvlab's.
    """
    check_choice("selective search mode", mode, MODES)
    check_number("selective search min_size", min_size, 1, integer=True)
    pixels = _as_uint8(image)
    height, width = pixels.shape[-2:]
    # OpenCV's colour conversions read BGR, height x width x channels.
    bgr = pixels.flip(0).permute(1, 2, 0).numpy()
    pad_bottom = max(0, math.ceil(width / MAX_ASPECT) - height)
    pad_right = max(0, math.ceil(height / MAX_ASPECT) - width)
    bgr = np.ascontiguousarray(np.pad(bgr, ((0, pad_bottom), (0, pad_right), (0, 0))))
    cv2 = _opencv()
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    library = _c_library()
    if library is not None:
        library.srand(0)
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)
    boxes = torch.from_numpy(rects)
    boxes[:, 2:] += boxes[:, :2]
    boxes = clip_boxes_to_image(boxes, (height, width))
    boxes = boxes[remove_small_boxes(boxes, float(min_size))]
    return _unique_in_order(boxes)[:max_proposals].contiguous()


def compute_proposals(image: Tensor, settings: Mapping[str, Any] | None) -> Tensor:
    """The proposals of ``image`` by a model's ``proposals:`` settings (:func:`proposal_settings`): ``Tensor[K, 4]``
    as :func:`selective_search` returns them. Uncached: :class:`ProposalCache` caches them."""
    settings = proposal_settings(settings)
    return selective_search(image, settings["mode"], settings["max_proposals"], settings["min_size"])


# ------------------------------------------------------------------------------------------------- cache
def _read(path: Path, height: int, width: int, max_proposals: int) -> Tensor | None:
    """The boxes cached in ``path`` for a ``height x width`` image, or None when the file is missing or cannot be
    trusted: not a float32 ``[K <= max_proposals, 4]`` array (checked from the header, before anything else is
    read), truncated, or holding boxes that are not finite, empty or outside the image."""
    try:
        with open(path, "rb") as file:
            header = _HEADER_READERS.get(np.lib.format.read_magic(file))
            if header is None:
                return None
            shape, fortran_order, dtype = header(file)
            if fortran_order or dtype != np.float32 or len(shape) != 2 or shape[1] != 4 or shape[0] > max_proposals:
                log.debug("proposal cache %s holds a %s %s array, recomputed", path, shape, dtype)
                return None
            file.seek(0)
            boxes = torch.from_numpy(np.load(file, allow_pickle=False))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as error:  # truncated or garbled
        log.debug("proposal cache %s unreadable (%s), recomputed", path, error)
        return None
    inside = (torch.isfinite(boxes).all(1) & (boxes[:, :2] >= 0).all(1) & (boxes[:, 2:] > boxes[:, :2]).all(1)
              & (boxes[:, 2] <= width) & (boxes[:, 3] <= height))
    if not bool(inside.all()):
        log.debug("proposal cache %s holds boxes outside its %dx%d image, recomputed", path, width, height)
        return None
    return boxes


class ProposalCache:
    """Region proposals on disk under ``root`` (None: ``$CVLAB_CACHE/proposals``, by default
    ``~/.cache/cvlab/proposals``): one ``.npy`` per image content and settings.

    :meth:`get` returns the cached proposals of an image, computing and storing them on the first call; the key
    hashes the image's pixels (so the same picture under two file names is computed once), the settings, the
    OpenCV version and cvlab's own processing version. A folder that cannot be written leaves the proposals
    uncached (one warning).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = cache_dir("proposals") if root is None else Path(root).expanduser()
        self._warned = False

    def path(self, image: Tensor, settings: Mapping[str, Any] | None) -> Path:
        """The cache file of ``image``'s proposals with ``settings``."""
        return self._path(_as_uint8(image), proposal_settings(settings))

    def _path(self, pixels: Tensor, settings: dict[str, Any]) -> Path:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(json.dumps({"version": _CACHE_VERSION, "opencv": _opencv().__version__, **settings,
                                  "shape": list(pixels.shape)}, sort_keys=True).encode())
        digest.update(pixels.contiguous().numpy().data)
        key = digest.hexdigest()
        return self.root / key[:2] / f"{key}.npy"  # 256 folders: a folder of COCO's 118k files lists slowly

    def cached(self, image: Tensor, settings: Mapping[str, Any] | None) -> Tensor | None:
        """The cached proposals of ``image``, or None when there are none that can be trusted."""
        pixels, settings = _as_uint8(image), proposal_settings(settings)
        return _read(self._path(pixels, settings), *pixels.shape[-2:], settings["max_proposals"])

    def get(self, image: Tensor, settings: Mapping[str, Any] | None) -> Tensor:
        """The proposals of ``image`` (``Tensor[3, H, W]``, uint8 or float in [0, 1]) by ``settings``:
        ``Tensor[K, 4]`` as :func:`selective_search` returns them, read from the cache or computed and stored."""
        pixels, settings = _as_uint8(image), proposal_settings(settings)
        path = self._path(pixels, settings)
        boxes = _read(path, *pixels.shape[-2:], settings["max_proposals"])
        if boxes is not None:
            return boxes
        boxes = compute_proposals(pixels, settings)
        try:
            write_atomic(path, lambda out: np.save(out, boxes.numpy(), allow_pickle=False))
        except OSError as error:
            if not self._warned:
                log.warning("region proposals not cached in %s (%s): they are recomputed every time; set "
                            "CVLAB_CACHE to a writable folder", self.root, error)
                self._warned = True
        return boxes
