"""cvlab's cache on disk: where it lives, and how a file gets there whole.

The cache root is ``$CVLAB_CACHE``, by default ``~/.cache/cvlab``; each kind of entry has a folder of its own
(``image_checks/``, ``proposals/``). Files are written beside their place and renamed over it, so a reader in
another process (a loader worker, another DDP rank, a second run) sees the old file or the whole new one, never half
of one.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["cache_dir", "write_atomic"]


def cache_dir(name: str) -> Path:
    """The cache folder ``name``: ``$CVLAB_CACHE/<name>``, by default ``~/.cache/cvlab/<name>`` (not created)."""
    return Path(os.environ.get("CVLAB_CACHE") or Path.home() / ".cache" / "cvlab").expanduser() / name


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Creates or replaces ``path`` with what ``write`` writes to a binary file: written to a temporary file in the
    same folder, then renamed over ``path`` (``os.replace`` is atomic on one file system). Raises OSError when the
    folder is not writable; the temporary file is removed whatever fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
