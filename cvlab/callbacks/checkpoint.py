"""Checkpoint files a run can trust: written atomically, never non-finite, ``best.ckpt`` always the best.

- :class:`AtomicCheckpointIO` (the trainer's checkpoint plugin) writes a checkpoint to a temporary file in the
  same directory, fsyncs it, then renames it over the old one. A kill or a full disk during a save leaves the
  previous file whole. (Lightning's own writer stages the file in the system temporary directory and moves it
  over: across filesystems that move is a copy, and a kill during it truncates the checkpoint and leaks the
  staged file.) Temporaries a killed save left behind are removed when the next run in the directory starts.
- :class:`RunCheckpoint` is Lightning's ModelCheckpoint for one named file (``weights/best.ckpt`` by the task's
  main metric, ``weights/last.ckpt``) that refuses to save non-finite weights, never ranks a non-finite score
  as best, and keeps its best score and file when a resumed run's directory has moved.
- :func:`keep_weights_only` rewrites a finished run's ``best.ckpt`` (atomically) with only what restoring the task
  needs (:data:`WEIGHTS_ONLY_KEYS`: the optimizer state, AdamW's two moments being twice the weights, loops and
  callback states go), and the weights keep their dtype, so the stripped file scores exactly as the full one did.
  ``last.ckpt`` keeps everything a resume needs.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from cvlab.callbacks.finite import ADVICE, NonFiniteError, learning_rate, non_finite_count
from cvlab.utils.errors import UserError
from cvlab.utils.safety import read_checkpoint

TEMPORARY_SUFFIX = ".tmp"
# What a finished run's best.ckpt keeps: the weights and buffers, the task's hyper-parameters (every config group and
# the DataInfo), the registered task's name, the epoch and step it was saved at, Lightning's version (Lightning
# migrates a checkpoint by it when ``validate(ckpt_path=...)`` reads it), and ``best_score`` (the monitored metric);
# plus what a task records for itself (``BaseTask.checkpoint_records``: a distilled student, how it was taught).
# Optimizer, scheduler, loop, callback and datamodule states are a resume's.
WEIGHTS_ONLY_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "cvlab_task", "epoch", "global_step",
                     "pytorch-lightning_version", "best_score")


def _temporary_beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s directory: ``.best.ckpt.<pid>-<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (POSIX: the directory entry is data of the directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it to ``path``; on any
    failure (an exception, a full disk) the temporary goes and ``path`` keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(path)
    try:
        with temporary.open("xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def copy_atomically(source: Path, target: Path) -> None:
    with source.open("rb") as original:
        write_atomically(target, lambda file: shutil.copyfileobj(original, file))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Removes the temporaries that saves killed mid-write left in ``directory``; returns them."""
    stale = sorted(directory.glob(f".*.ckpt.*{TEMPORARY_SUFFIX}")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def keep_weights_only(path: Path, monitor: str, mode: str, score, records: tuple[str, ...] = ()) -> None:
    """Rewrites the checkpoint ``path`` atomically with only :data:`WEIGHTS_ONLY_KEYS` and the task's ``records``,
    recording ``score`` of ``monitor`` (``mode`` max or min) as ``best_score``. Tensors are stored as they are (no
    dtype change). A file that holds only those keys already (a resumed run whose best epoch came before the
    interruption) is left as it is, and so is a remote one (Lightning's writer saved it)."""
    if not _is_local_file_protocol(str(path)):
        return
    checkpoint = read_checkpoint(path)
    kept = (*WEIGHTS_ONLY_KEYS, *records)
    if set(checkpoint) <= set(kept):
        return
    stripped = {key: checkpoint[key] for key in kept if key in checkpoint}
    stripped["best_score"] = {"monitor": monitor, "mode": mode, "score": None if score is None else float(score)}
    write_atomically(path, lambda file: torch.save(stripped, file))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`write_atomically` for local paths (remote ones keep Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for one file of a run, ``<dirpath>/<filename>.ckpt``.

    - ``save_top_k`` must be 1: the file name is fixed, so with k > 1 each of the k best would overwrite the
      file in turn, and ``best.ckpt`` would hold the latest of them rather than the best.
    - Before every save the weights and buffers are checked; non-finite ones stop the run (:class:`NonFiniteError`)
      and the file keeps its previous, finite content. A non-finite monitored score never ranks as best.
    - On resume, Lightning restores the best score and path only if the directory is the one the checkpoint
      names; when the run directory has moved (renamed, copied elsewhere), the files are looked up in (or copied
      into) the current directory instead, so the best so far is kept.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.save_top_k != 1:
            name = Path(self.dirpath or ".").name + "/" + (self.filename or "") + self.FILE_EXTENSION
            holds = f"the single best epoch by {self.monitor}" if self.monitor else "the latest epoch"
            raise UserError(f"save_top_k={self.save_top_k} is not supported: {name} is one file, {holds}; keep "
                            "save_top_k=1.")
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and _is_local_file_protocol(str(self.dirpath)):
            remove_stale_temporaries(Path(self.dirpath))

    def check_monitor_top_k(self, trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(current).all()):
            return False
        return super().check_monitor_top_k(trainer, current)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        bad = non_finite_count(trainer.lightning_module)
        if bad:
            raise NonFiniteError(
                f"training stopped: {bad:,} weights are not finite after step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}); lr {learning_rate(trainer)}. {Path(filepath).name} was not written: no "
                f"checkpoint holds non-finite weights. {ADVICE}")
        super()._save_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath and _is_local_file_protocol(str(self.dirpath)):
            state_dict = self._moved_to_this_directory(state_dict)
        super().load_state_dict(state_dict)

    def _moved_to_this_directory(self, state: dict) -> dict:
        """``state`` with every file it names taken from this directory. The best file, if it is not here yet, is
        copied from the old directory; if it is nowhere, the best is forgotten (the next epoch becomes best)."""
        here = Path(self.dirpath)

        def here_too(path: str) -> str:
            return str(here / Path(path).name) if path else path

        best = state.get("best_model_path") or ""
        if self.monitor and best and not Path(here_too(best)).is_file():
            if Path(best).is_file():
                copy_atomically(Path(best), Path(here_too(best)))
            else:
                return {**state, "dirpath": self.dirpath, "best_model_path": "", "best_model_score": None,
                        "best_k_models": {}, "kth_best_model_path": "", "last_model_path": ""}
        return {**state, "dirpath": self.dirpath, "best_model_path": here_too(best),
                "kth_best_model_path": here_too(state.get("kth_best_model_path", "")),
                "last_model_path": here_too(state.get("last_model_path", "")),
                "best_k_models": {here_too(path): score for path, score in state.get("best_k_models", {}).items()}}
