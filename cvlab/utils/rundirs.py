"""Run directories: claiming a new one that no other run shares, and finding the run a checkpoint belongs to.

Run directories are named by the second they start in (``runs/<task>/<model>/<YYYYmmdd-HHMMSS>``), so two runs
started in the same second want the same name; :func:`claim_dir` gives the second one ``<name>-1``, the third
``<name>-2``, ... . Creating a directory is atomic on every local and network filesystem (``mkdir`` fails if it
exists), so no lock is needed and no two processes ever get the same directory.
"""
from __future__ import annotations

from pathlib import Path

# A checkpoint written by a run lies in <run>/WEIGHTS_DIR/, and Hydra's record of the run in <run>/HYDRA_DIR/.
WEIGHTS_DIR = "weights"
HYDRA_DIR = ".hydra"


def claim_dir(wanted: Path | str) -> Path:
    """Creates and returns ``wanted``, or the first of ``wanted-1``, ``wanted-2``, ... that does not exist yet."""
    wanted = Path(wanted)
    wanted.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        candidate = wanted if suffix == 0 else wanted.with_name(f"{wanted.name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1


def run_dir_of_checkpoint(ckpt: Path | str) -> Path | None:
    """The run directory ``ckpt`` was written by (``<run>/weights/last.ckpt`` -> ``<run>``), or None for a
    checkpoint that is not a file or does not lie in a run directory (one copied elsewhere, a downloaded file)."""
    path = Path(ckpt).expanduser().resolve()
    run = path.parent.parent
    if path.is_file() and path.parent.name == WEIGHTS_DIR and (run / HYDRA_DIR).is_dir():
        return run
    return None
