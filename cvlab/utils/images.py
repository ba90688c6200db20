"""Reading a user's image files: the one list of image extensions, one opener for every command, and the check every
dataset runs on its files when it indexes them, so that a broken file is one clear line at set-up and never a crash in
epoch 0.

- :func:`open_image` decodes one image. Its size is read from the header first, and an image with more pixels than
  the limit is refused before any pixel is decoded (a decompression bomb: a 20000 x 20000 PNG can be a few kB).
  16-bit greyscale (PIL modes ``I;16*`` and ``I``, which 16-bit PNGs open as) is scaled to 8 bits,
  ``round(v * 255 / 65535)``, so it reaches ``[0, 1]`` as ``v / 65535`` does (PIL's own ``convert`` clips it to white).
- :func:`check_images` decodes every file fully: a truncated JPEG passes ``Image.verify()`` but fails here. The
  verdicts are cached on disk per folder, keyed by file name, mtime and size, so a re-run does not decode again; the
  cache lives in ``$CVLAB_CACHE/image_checks`` (default ``~/.cache/cvlab``) and is skipped where that is not writable.

The pixel limit defaults to PIL's ``MAX_IMAGE_PIXELS`` (89,478,485). PIL warns above it and refuses twice as many at
``open``; cvlab refuses above its own limit instead, which may be set higher or lower (``data.max_image_pixels``), so
PIL's check is off while a header is read here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from cvlab.utils.cache import cache_dir, write_atomic
from cvlab.utils.errors import UserError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "ImageCheck", "check_images", "image_cache_dir",
           "open_header", "open_image", "too_many_pixels"]

log = logging.getLogger(__name__)

# The one list of image file extensions (torchvision's), lower case with the dot.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)

DEFAULT_MAX_IMAGE_PIXELS: int = PIL.Image.MAX_IMAGE_PIXELS  # PIL's, read at import

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CACHE_VERSION = 1
_PIL_LIMIT_LOCK = threading.Lock()  # PIL's limit is a module global: one header at a time with it off


class ImageCheck(NamedTuple):
    """What :func:`check_images` found: the image's ``width`` and ``height`` (0 when unreadable), and ``problem``, a
    phrase such as ``"not found"`` or ``"cannot be decoded (OSError: ...)"``, None for a good image."""

    width: int
    height: int
    problem: str | None


def image_cache_dir() -> Path:
    """Where the verdicts of :func:`check_images` are kept: ``$CVLAB_CACHE/image_checks``, by default
    ``~/.cache/cvlab/image_checks``."""
    return cache_dir("image_checks")


@contextmanager
def open_header(path: Path) -> Iterator[PIL.Image.Image]:
    """``PIL.Image.open(path)`` (the header only) without PIL's own pixel limit; cvlab checks its own."""
    with _PIL_LIMIT_LOCK:
        saved, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            image = PIL.Image.open(path)
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = saved
    with image:
        yield image


def too_many_pixels(width: int, height: int, max_pixels: int | None) -> str | None:
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height <= limit:
        return None
    return (f"has {width}x{height} = {width * height:,} pixels, more than the {limit:,} allowed (a decompression "
            f"bomb?); data.max_image_pixels sets the limit")


def _in_mode(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535)
        image = PIL.Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), mode="L")
    return image.convert(mode)


def open_image(path: str | Path, mode: str, max_pixels: int | None = None) -> PIL.Image.Image:
    """The image at ``path`` decoded and converted to ``mode`` (``RGB``, ``L``); 16-bit greyscale scaled to 8 bits.

    Raises UserError naming the file when it cannot be read, or when it has more than ``max_pixels`` pixels
    (None: :data:`DEFAULT_MAX_IMAGE_PIXELS`), which is checked from the header before anything is decoded.
    """
    path = Path(path)
    try:
        with open_header(path) as image:
            too_large = too_many_pixels(*image.size, max_pixels)
            if too_large is None:
                return _in_mode(image, mode)
    except Exception as error:  # PIL raises many types for a broken file
        raise UserError(f"cannot read image {path}: {type(error).__name__}: {error}") from None
    raise UserError(f"refusing image {path}: it {too_large}")


def _decode(path: Path, max_pixels: int | None) -> tuple[ImageCheck, bool]:
    """The verdict on one file, and whether it may be cached (a refusal by size is not: the limit may change)."""
    if not path.is_file():
        return ImageCheck(0, 0, "not found"), False
    try:
        with open_header(path) as image:
            width, height = image.size
            too_large = too_many_pixels(width, height, max_pixels)
            if too_large is not None:
                return ImageCheck(width, height, too_large), False
            image.load()
    except Exception as error:  # PIL raises many types for a broken file
        return ImageCheck(0, 0, f"cannot be decoded ({type(error).__name__}: {error})"), True
    return ImageCheck(width, height, None), True


class _FolderCache:
    """The cached verdicts of one folder's files: ``{name: [mtime_ns, size, width, height, problem]}`` in a json
    named after the folder's path."""

    def __init__(self, folder: Path):
        self.folder = folder
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:20]
        self.file = image_cache_dir() / f"{key}.json"
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            stored = json.loads(self.file.read_text())
            if stored.get("version") == _CACHE_VERSION and stored.get("folder") == str(folder.resolve()):
                self.entries = stored["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache yet, or an unreadable one: checked afresh and rewritten

    def get(self, path: Path, stamp: tuple[int, int]) -> ImageCheck | None:
        entry = self.entries.get(path.name)
        if entry is None or tuple(entry[:2]) != stamp:
            return None
        return ImageCheck(*entry[2:])

    def put(self, path: Path, stamp: tuple[int, int], check: ImageCheck) -> None:
        self.entries[path.name] = [*stamp, *check]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        text = json.dumps({"version": _CACHE_VERSION, "folder": str(self.folder.resolve()), "files": self.entries})
        try:  # two runs checking the same folder never leave half a file
            write_atomic(self.file, lambda out: out.write(text.encode()))
        except OSError as error:
            log.debug("image check cache %s not written: %s", self.file, error)


def check_images(paths: Sequence[str | Path], max_pixels: int | None = None) -> dict[Path, ImageCheck]:
    """Decodes each file fully and says what it found (:class:`ImageCheck`), keyed by the paths as given.

    A file over ``max_pixels`` pixels (None: :data:`DEFAULT_MAX_IMAGE_PIXELS`) is refused from its header, never
    decoded. Verdicts are cached by file name, mtime and size (see the module docstring), so an unchanged file is
    decoded once.
    """
    caches: dict[Path, _FolderCache] = {}
    checks: dict[Path, ImageCheck] = {}
    for path in map(Path, paths):
        try:
            status = path.stat()
        except (OSError, ValueError):  # missing, or a name the file system refuses
            checks[path] = ImageCheck(0, 0, "not found")
            continue
        stamp = (status.st_mtime_ns, status.st_size)
        cache = caches.get(path.parent)
        if cache is None:
            cache = caches[path.parent] = _FolderCache(path.parent)
        cached = cache.get(path, stamp)
        if cached is not None and too_many_pixels(cached.width, cached.height, max_pixels) is None:
            checks[path] = cached
            continue
        checks[path], cacheable = _decode(path, max_pixels)
        if cacheable:
            cache.put(path, stamp, checks[path])
    for cache in caches.values():
        cache.save()
    return checks
