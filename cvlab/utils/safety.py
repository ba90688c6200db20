"""Checkpoints are data: reading one never runs anything in it, and the configs it stores can only name cvlab's own
classes and torch's optimisers, schedulers and losses.

Both layers are needed:

- **The pickle.** A checkpoint is the zip archive ``torch.save`` writes. Its pickle may name only the globals that
  rebuild tensors and ordered dicts (:data:`CHECKPOINT_GLOBALS`). That is all that cvlab's classification,
  detection and distillation checkpoints hold, Lightning's loops, callback states and optimizer/scheduler states
  included, because cvlab stores plain types: hyper-parameters as dicts, DataInfo as a dict, numpy's RNG key as a
  tensor. The names are read from the pickle's opcodes before anything is unpickled. ``torch.load(weights_only=True)``
  (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off) then unpickles the file with
  torch's restricted unpickler. torch's process-wide allowlist is not enough alone: importing torch.distributed
  widens it (DeviceMesh, DTensor, every builtin exception...), so cvlab checks its own, smaller list first.
- **The configs.** Hydra imports and calls any ``_target_``, whether or not the file was unpickled safely.
  :func:`check_config` refuses a stored config unless every ``_target_`` in it names a class defined in cvlab,
  torch.optim or torch.nn's loss module (:data:`TARGET_PACKAGES`). The name is checked before anything is
  imported, so ``builtins.open`` or ``this.X`` is never imported. Hydra's other keys are limited to what cvlab
  writes (:data:`HYDRA_FLAGS`). ``_args_`` is refused, and so is any ``${...}`` interpolation.
"""
from __future__ import annotations

import importlib
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

from cvlab.utils.errors import UserError

# What a cvlab checkpoint's pickle names: the ordered dict of a state_dict, the tensor rebuild function, and one
# typed storage per dtype that weights, buffers and optimizer states use.
CHECKPOINT_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    *(f"torch.{kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                          "Byte", "Bool")),
})

# Where a stored ``_target_`` may point: (the package its name must start with, the package the class must be
# defined in). Loss classes are re-exported as torch.nn.X and defined in torch.nn.modules.loss; the rest of torch.nn
# is refused.
TARGET_PACKAGES = (("cvlab", "cvlab"), ("torch.optim", "torch.optim"), ("torch.nn", "torch.nn.modules.loss"))

# Hydra's keys that a stored config may hold, each with the values allowed. They only shape how allowlisted
# classes are built: ``_partial_`` (optimizers and schedulers get their parameters later), ``_recursive_`` (data
# configs build their sampler themselves; nested nodes are checked here either way), ``_convert_`` (container types).
HYDRA_FLAGS = {"_partial_": (True, False), "_recursive_": (True, False),
               "_convert_": ("none", "partial", "object", "all")}

_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(UserError):
    """A file that is not loaded as a checkpoint. The message says why, and :meth:`about` names the file."""

    def about(self, what: str, path) -> UserError:
        return UserError(f"{what} {str(path)!r} is not a cvlab checkpoint: {self}")


class RefusedCheckpoint(CheckpointError):
    """A readable checkpoint that asks for something cvlab never builds from a file: a target outside the
    allowlist, an unregistered task or model."""

    def about(self, what: str, path) -> UserError:
        return UserError(f"refusing {what} {str(path)!r}: {self}")


def one_line(error: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: what an error says in a one-line report."""
    text = " ".join(str(error).split("\n")[0].split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------- the pickle
def pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` that the pickle ``data`` would import, read from its opcodes without unpickling.

    Opcodes that take the name from the stack rather than spelling it out (protocol 4's STACK_GLOBAL, INST, OBJ)
    are refused: ``torch.save`` writes protocol 2, which names every global with GLOBAL.
    """
    names = set()
    for opcode, argument, _position in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            names.add(argument.replace(" ", "."))
        elif opcode.name in ("STACK_GLOBAL", "INST", "OBJ"):
            raise CheckpointError(f"its pickle uses the {opcode.name} opcode, which torch.save never writes "
                                  "(nothing in it was run).")
    return names


def _data_pickle(archive: zipfile.ZipFile) -> bytes:
    """The one pickle that ``torch.load`` unpickles, ``<archive>/data.pkl``. An archive that could be read two ways
    (duplicate or scattered entries) is refused."""
    names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    pickles = [name for name in names if name.endswith("/data.pkl")]
    if len(set(names)) != len(names) or len(roots) != 1 or len(pickles) != 1:
        raise CheckpointError("it is a zip archive but not one that torch.save writes (nothing in it was run).")
    return archive.read(pickles[0])


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict in ``path``, unpickled only after its pickle has been checked against
    :data:`CHECKPOINT_GLOBALS`, then loaded with ``torch.load(weights_only=True)``.

    Raises a :class:`CheckpointError` for anything else: a missing or unreadable file, a bare pickle, a truncated
    archive, a pickle that names another global, a dict without ``state_dict`` or ``hyper_parameters``.
    ``mmap`` maps the tensors instead of reading them, for callers that need only the hyper-parameters.
    """
    import torch

    try:
        with open(path, "rb") as file:
            if not zipfile.is_zipfile(file):
                raise CheckpointError("it is not the zip archive that torch.save writes (a bare pickle, a truncated "
                                      "file or another format; nothing in it was run).")
            file.seek(0)
            with zipfile.ZipFile(file) as archive:
                unexpected = sorted(pickle_globals(_data_pickle(archive)) - CHECKPOINT_GLOBALS)
            if unexpected:
                raise CheckpointError(f"its pickle names {', '.join(unexpected)}, which no cvlab checkpoint holds "
                                      "(nothing in it was run).")
            file.seek(0)
            # The open file is what was checked: loading it (not the path again) reads those same bytes. mmap
            # needs the path, and torch's restricted unpickler still guards that read.
            checkpoint = torch.load(path if mmap else file, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001  (nothing was run: any failure means the file is unreadable)
        raise CheckpointError(f"torch cannot read it ({one_line(error)}).") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"it holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    for key in ("state_dict", "hyper_parameters"):
        if not isinstance(checkpoint.get(key), dict):
            raise CheckpointError(f"it has no {key} dict (a cvlab checkpoint is written by a cvlab run).")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor)
               for key, value in checkpoint["state_dict"].items()):
        raise CheckpointError("its state_dict holds something other than named tensors.")
    return checkpoint


# ---------------------------------------------------------------------------------------------------- the configs
def check_target(target: Any, where: str) -> None:
    """Refuses (:class:`RefusedCheckpoint`) a stored ``_target_`` unless it names a class on the allowlist
    (:data:`TARGET_PACKAGES`). A name outside the allowlist is refused before anything is imported."""
    allowed = "a stored _target_ must name a class of cvlab, torch.optim or torch.nn's losses (nothing was imported)."
    if not isinstance(target, str) or not _DOTTED_NAME.fullmatch(target):
        raise RefusedCheckpoint(f"its {where} config has _target_ {target!r}; {allowed}")
    defined_in = next((home for prefix, home in TARGET_PACKAGES if target.startswith(prefix + ".")), None)
    if defined_in is None:
        raise RefusedCheckpoint(f"its {where} config names {target}; {allowed}")
    module_name, _, attribute = target.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise RefusedCheckpoint(f"its {where} config names {target}, which does not exist in this cvlab.") from None
    if not isinstance(resolved, type):
        raise RefusedCheckpoint(f"its {where} config names {target}, which is no class; {allowed}")
    home = resolved.__module__
    if not (home == defined_in or home.startswith(defined_in + ".")):
        raise RefusedCheckpoint(f"its {where} config names {target}, a class of {home}; {allowed}")


def check_config(cfg: Any, where: str) -> None:
    """Refuses (:class:`RefusedCheckpoint`) a stored config that is not plain data or whose building could run
    anything but an allowlisted class: ``_target_`` is checked by :func:`check_target` at any depth (whatever
    ``_recursive_`` says), Hydra's flags must hold the values of :data:`HYDRA_FLAGS`, and ``_args_``, other
    Hydra-style keys and ``${...}`` interpolations (resolved when the config is built) are refused."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if not isinstance(key, str):
                raise RefusedCheckpoint(f"its {where} config has the key {key!r}; stored configs have string keys.")
            if key == "_target_":
                check_target(value, where)
            elif key in HYDRA_FLAGS:
                if value not in HYDRA_FLAGS[key] or type(value) is not type(HYDRA_FLAGS[key][0]):
                    raise RefusedCheckpoint(f"its {where} config sets {key}={value!r}; cvlab stores one of "
                                            f"{', '.join(map(repr, HYDRA_FLAGS[key]))}.")
            elif key.startswith("_") and key.endswith("_"):
                raise RefusedCheckpoint(f"its {where} config has {key}, which cvlab never stores (its configs name "
                                        "every argument; nothing was run).")
            else:
                check_config(value, f"{where}.{key}")
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            check_config(item, where)
    elif isinstance(cfg, str):
        if "${" in cfg:
            raise RefusedCheckpoint(f"its {where} config holds the interpolation {cfg!r}; stored configs are "
                                    "resolved values.")
    elif not isinstance(cfg, _PLAIN_SCALARS):
        raise RefusedCheckpoint(f"its {where} config holds a {type(cfg).__name__}; stored configs are plain data.")
