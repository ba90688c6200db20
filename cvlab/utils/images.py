"""Reading a user's image files: the one list of image extensions and one opener for every command, so an unreadable
file is always one clear line."""
from __future__ import annotations

from pathlib import Path

import PIL.Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from cvlab.utils.errors import UserError

# The one list of image file extensions (torchvision's), lower case with the dot.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)


def open_image(path: Path, mode: str) -> PIL.Image.Image:
    """The image at ``path`` converted to ``mode`` (``RGB``, ``L``), or a UserError naming the unreadable file."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None
