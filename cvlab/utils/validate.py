"""Range checks of settings, run on the composed config before anything is built or any run directory exists: each
bad value becomes one :class:`~cvlab.utils.errors.UserError` line naming the key, the value and what it may be.

- :func:`check_number`, :func:`check_probability`, :func:`check_choice`, :func:`check_names` are the scalar
  checks; the datamodules call them in their constructors too (``data.batch_size=0`` is refused by the datamodule
  itself, wherever it is built).
- :func:`check_annotation` checks a value against a constructor's type annotation (``trainer.precision`` against
  ``pytorch_lightning.Trainer``'s ``Literal``), for keys the shipped yamls do not type.
- :func:`check_settings` applies :data:`RULES` (the trainer, the seed, predict's ``top_k``/``conf``/``device``) to
  a composed config, refuses a recipe for another task, then builds what is cheap to build with its settings, so
  that their own checks run now: the optimizer (on one dummy parameter), its scheduler, and the datamodule (its
  constructor only: no data is read).
"""
from __future__ import annotations

import inspect
import math
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cvlab.utils.errors import UserError, suggest

# The largest square side an image may be resized to: far above any model of the curriculum, and small enough that
# one batch still fits in memory (4096^2 x 3 floats are 200 MB an image).
MAX_IMAGE_SIZE = 4096
# torch's batch sampler allocates a list of batch_size entries, and every worker is a process: bounds that no run
# reaches, against a typo's 10**9.
MAX_BATCH_SIZE = 65536
MAX_WORKERS = 256


# ------------------------------------------------------------------------------------------------- scalars
def shown(value: Any) -> str:
    """``repr(value)``, shortened in the middle past 60 characters (a 400-digit typo stays one readable line)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:28]}...{text[-24:]} ({len(text)} characters)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {_bound(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_bound(high)}"
    return f"in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, low_open: bool = False, high_open: bool = False,
                 optional: bool = False, hint: str = "") -> None:
    """``value`` is a finite number (an integer with ``integer``) within the bounds (None: unbounded; ``*_open``:
    the bound itself excluded), or None with ``optional``. ``hint`` follows what it must be."""
    if value is None and optional:
        return
    what = "an integer" if integer else "a number"
    if low is not None or high is not None:
        what += " " + _interval(low, high, low_open, high_open)
    # An int is always finite (and may be too large for a float: 10**400).
    ok = _is_number(value) and (isinstance(value, int) or (not integer and math.isfinite(value)))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise UserError(f"{key} must be {what}{' or null' if optional else ''}{hint}, got {shown(value)}.")


def check_min_max(key: str, value: Any, what: str, low: float, high: float | None = None, *,
                  integer: bool = False, low_open: bool = False) -> None:
    """``value`` is a ``[min, max]`` pair (``what`` describes it, with an example) of numbers within the bounds
    (:func:`check_number`), the minimum first."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise UserError(f"{key} is {what}; got {value!r}.")
    for bound in value:
        check_number(key, bound, low, high, integer=integer, low_open=low_open)
    if value[0] > value[1]:
        raise UserError(f"{key}=[{value[0]}, {value[1]}]: the minimum comes first.")


def check_scene_settings(sizes: Sequence, n_objects: Any, max_objects: int) -> None:
    """The drawn shape scenes' ``data.train_size``/``val_size``/``test_size`` (test optional) and ``data.n_objects``."""
    for key, size in zip(("train_size", "val_size", "test_size"), sizes):
        check_number(f"data.{key}", size, 1, integer=True, optional=key == "test_size")
    check_min_max("data.n_objects", n_objects, "a [min, max] count of shapes per scene", 1, max_objects,
                  integer=True)


def check_probability(key: str, value: Any) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise UserError(f"{key} is a probability in [0, 1], got {shown(value)}.")


def check_choice(key: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise UserError(f"{key} is one of {', '.join(map(str, choices))}; got {shown(value)}."
                        f"{suggest(str(value), map(str, choices))}")


def check_names(key: str, value: Any, optional: bool = True) -> None:
    """A list of distinct, non-empty names (class names)."""
    if value is None and optional:
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{key} must be a list of names, e.g. [cat, dog], got {shown(value)}.")
    if len(set(value)) < len(value):
        raise UserError(f"{key} names a class twice: {value!r}.")


def check_image_size(key: str, value: Any) -> None:
    check_number(key, value, 1, MAX_IMAGE_SIZE, integer=True)


def check_loader(batch_size: Any, num_workers: Any) -> None:
    """``data.batch_size`` and ``data.num_workers`` of a datamodule's loaders."""
    check_number("data.batch_size", batch_size, 1, MAX_BATCH_SIZE, integer=True)
    check_number("data.num_workers", num_workers, 0, MAX_WORKERS, integer=True)


# ------------------------------------------------------------------------------------------------- annotations
def fits(value: Any, annotation: Any) -> bool:
    """Whether a config value (plain python: scalars, lists, dicts) can be passed for ``annotation``.

    Classes a command line cannot spell (an ``Accelerator``, a ``timedelta``) take a ``_target_`` dict; a number
    fits ``str`` (it reaches the code as text: a folder named 2024).
    """
    if annotation in (inspect.Parameter.empty, Any, object):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, argument) for argument in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if isinstance(value, Mapping) and "_target_" in value:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str) or _is_number(value)
    container = origin or annotation
    if container in (list, tuple, Sequence, Iterable) or (isinstance(container, type)
                                                         and issubclass(container, (list, tuple))):
        if not isinstance(value, (list, tuple)):
            return False
        items = typing.get_args(annotation)
        return not items or all(fits(v, items[0]) for v in value)
    if container in (dict, Mapping):
        return isinstance(value, Mapping)
    return False


_SPELLED = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def describe_type(annotation: Any) -> str:
    """``Optional[Union[int, float]]`` -> ``an integer, a number or null``; a Literal lists its values. Classes a
    command line cannot spell (``Tensor``, ``Accelerator``) are left out where anything else remains."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        arguments = typing.get_args(annotation)
        spellable = [a for a in arguments if a in _SPELLED or a is type(None) or typing.get_origin(a) is not None]
        parts = [describe_type(argument) for argument in spellable or arguments]
        parts = [part for part in dict.fromkeys(parts) if part]
        return ", ".join(parts[:-1]) + f" or {parts[-1]}" if len(parts) > 1 else parts[0]
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return ", ".join(repr(choice) if isinstance(choice, str) else str(choice) for choice in choices)
    if annotation is None or annotation is type(None):
        return "null"
    if origin in (list, tuple) or annotation in (list, tuple):
        items = typing.get_args(annotation)
        return f"a list of {describe_type(items[0])}" if items else "a list"
    return _SPELLED.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_annotation(key: str, value: Any, annotation: Any) -> None:
    """``value`` fits the ``annotation`` of the constructor parameter that ``key`` sets."""
    if not fits(value, annotation):
        raise UserError(f"{key} expects {describe_type(annotation)}, got {shown(value)}.")


def parameters(target: Callable) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a class's constructor or a function, with their annotations evaluated where they
    can be (``from __future__ import annotations`` leaves them as text)."""
    function = target.__init__ if isinstance(target, type) else target
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation naming what only a type checker imports: keep it unchecked
        hints = {}
    return {name: parameter.replace(annotation=hints.get(name, parameter.annotation))
            for name, parameter in signature.parameters.items()
            if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}


# ------------------------------------------------------------------------------------------------- devices, folders
def cuda_devices() -> int:
    """How many CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_device(key: str, value: Any) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine."""
    import torch

    if value == "auto":
        return
    try:
        device = torch.device(str(value))
    except (RuntimeError, TypeError):
        raise UserError(f"{key} is auto, cpu, cuda, cuda:N or mps; got {shown(value)}.") from None
    if device.type == "cuda":
        count = cuda_devices()
        if count == 0:
            raise UserError(f"{key}={value} but torch sees no CUDA GPU on this machine; use {key}=cpu or "
                            f"{key}=auto.")
        if device.index is not None and device.index >= count:
            raise UserError(f"{key}={value} but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}.")
    elif device.type == "mps" and not _mps_available():
        raise UserError(f"{key}={value} but this machine has no Apple MPS device; use {key}=cpu or {key}=auto.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key} is auto, cpu, cuda, cuda:N or mps; got {shown(value)}.")


def check_accelerator(key: str, value: Any) -> None:
    """One of Lightning's accelerators, and present on this machine."""
    from pytorch_lightning.accelerators import AcceleratorRegistry

    if isinstance(value, Mapping):
        return
    names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    check_choice(key, value, names)
    if value in ("gpu", "cuda") and cuda_devices() == 0:
        raise UserError(f"{key}={value} but torch sees no CUDA GPU on this machine; use trainer=cpu or "
                        f"{key}=auto.")
    if value == "mps" and not _mps_available():
        raise UserError(f"{key}=mps but this machine has no Apple MPS device; use {key}=auto.")


def check_strategy(key: str, value: Any) -> None:
    from pytorch_lightning.strategies import StrategyRegistry

    if not isinstance(value, Mapping):
        check_choice(key, value, ["auto", *sorted(StrategyRegistry.keys())])


def check_writable_folder(key: str, value: Any) -> None:
    """``value`` is a folder that exists and can be written to, or one that can be made (its nearest existing
    parent is a writable folder). Tried with a temporary file: permissions alone do not tell (root, read-only
    mounts)."""
    path = Path(str(value)).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={value} cannot be a folder: {existing} is a file.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key}={value} is not writable ({existing}: {error.strerror or error}); choose another "
                        "folder.") from None


# ------------------------------------------------------------------------------------------------- rules
def _batches(key: str, value: Any) -> None:
    """Lightning's ``limit_*_batches`` / ``overfit_batches``: a count (int >= 0) or a share (float in [0, 1])."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    check_number(key, value, 0, 1, hint=" (a share of the batches), or a count >= 0")


def _interval_value(key: str, value: Any) -> None:
    if value is None or isinstance(value, (str, Mapping)):
        return
    if isinstance(value, int) and not isinstance(value, bool):
        check_number(key, value, 1, integer=True)
    else:
        check_number(key, value, 0, 1, low_open=True)


def _devices(key: str, value: Any) -> None:
    """Lightning's ``devices``: a count >= 1, -1, a list of indices, ``auto``, or indices as text (``"0,1"``)."""
    if isinstance(value, (list, tuple)):
        ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        ok = value == -1 or value >= 1
    else:
        indices = str(value).strip(",").split(",") if isinstance(value, str) else []
        ok = value in ("auto", "-1") or (bool(indices) and all(part.strip().isdigit() for part in indices))
    if not ok:
        raise UserError(f"{key} is a count >= 1, -1 (every device), a list of indices or auto; got {shown(value)}.")


def _at_least(low: int, optional: bool = False) -> Callable[[str, Any], None]:
    return lambda key, value: check_number(key, value, low, integer=True, optional=optional)


RULES: dict[str, Callable[[str, Any], None]] = {
    "seed": lambda key, value: check_number(key, value, 0, 2**32 - 1, integer=True),
    "optimizer.lr": lambda key, value: check_number(key, value, 0, low_open=True),
    "optimizer.weight_decay": lambda key, value: check_number(key, value, 0),
    # torch's StepLR takes any gamma; a negative one flips the learning rate's sign.
    "scheduler.scheduler.gamma": lambda key, value: check_number(key, value, 0, low_open=True),
    "scheduler.scheduler.step_size": _at_least(1),
    "scheduler.scheduler.warmup_fraction": lambda key, value: check_number(key, value, 0, 1, high_open=True),
    "trainer.accelerator": check_accelerator,
    "trainer.strategy": check_strategy,
    "trainer.devices": _devices,
    "trainer.num_nodes": _at_least(1),
    "trainer.max_epochs": _at_least(-1, optional=True),
    "trainer.min_epochs": _at_least(0, optional=True),
    "trainer.max_steps": _at_least(-1),
    "trainer.min_steps": _at_least(0, optional=True),
    "trainer.limit_train_batches": _batches,
    "trainer.limit_val_batches": _batches,
    "trainer.limit_test_batches": _batches,
    "trainer.limit_predict_batches": _batches,
    "trainer.overfit_batches": _batches,
    "trainer.val_check_interval": _interval_value,
    "trainer.check_val_every_n_epoch": _at_least(1, optional=True),
    "trainer.num_sanity_val_steps": _at_least(-1, optional=True),
    "trainer.log_every_n_steps": _at_least(0, optional=True),
    "trainer.accumulate_grad_batches": _at_least(1),
    "trainer.gradient_clip_val": lambda key, value: check_number(key, value, 0, optional=True),
    "trainer.gradient_clip_algorithm": lambda key, value: value is None or check_choice(key, value, ("norm", "value")),
    "trainer.reload_dataloaders_every_n_epochs": _at_least(0),
    "top_k": _at_least(1),
    "conf": lambda key, value: check_number(key, value, 0, 1, high_open=True),
    "device": check_device,
    "n": _at_least(1, optional=True),
}


_ABSENT = object()


def check_settings(cfg) -> None:
    """Every rule of :data:`RULES` whose key ``cfg`` holds, then the trial builds (optimizer, scheduler,
    datamodule)."""
    from omegaconf import OmegaConf

    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is not _ABSENT:
            rule(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)
    _check_device_count(cfg)
    _check_recipe(cfg)
    _try_optimizer(cfg)
    _try_datamodule(cfg)


def _check_recipe(cfg) -> None:
    """A recipe (``recipe=modern``) names the task its settings are for (``recipe.task``)."""
    from omegaconf import OmegaConf

    wanted, task = OmegaConf.select(cfg, "recipe.task"), OmegaConf.select(cfg, "task.name")
    if wanted is not None and task is not None and wanted != task:
        raise UserError(f"recipe={OmegaConf.select(cfg, 'recipe.name')} is a training recipe for {wanted} models "
                        f"(`cvlab list model`); task={task} cannot use it. Drop recipe=... or choose a {wanted} model.")


def _check_device_count(cfg) -> None:
    """``trainer.devices`` asks for devices the machine has: at most its GPUs, or a count of CPU processes."""
    from omegaconf import OmegaConf

    accelerator, devices = (OmegaConf.select(cfg, f"trainer.{key}") for key in ("accelerator", "devices"))
    if accelerator is None or devices in (None, "auto"):
        return
    gpus = cuda_devices()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if on_gpu and isinstance(devices, int) and devices > gpus:
        raise UserError(f"trainer.devices={devices} but this machine has {gpus} CUDA GPU(s); "
                        "trainer.devices=-1 takes them all.")
    if accelerator == "cpu" or (accelerator == "auto" and gpus == 0 and not _mps_available()):
        count = int(devices) if isinstance(devices, str) and devices.strip().isdigit() else devices
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
            raise UserError(f"trainer.devices={shown(devices)} on the CPU is a count of processes >= 1 (or auto).")


def first_line(error: BaseException, count: int = 1) -> str:
    """The first ``count`` non-empty lines of an error's message, joined: libraries' errors made one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:count]) if lines else type(error).__name__


def _try_optimizer(cfg) -> None:
    """Builds the optimizer on one dummy parameter (torch checks lr, betas, eps, momentum ... itself), then its
    scheduler, as a run would."""
    if cfg.get("optimizer") is None or "_target_" not in cfg.optimizer:
        return
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    name = cfg.optimizer._target_.rpartition(".")[2]
    try:
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as error:  # torch raises ValueError / TypeError; Hydra wraps them
        raise UserError(f"optimizer {name} refuses its settings: {first_line(error.__cause__ or error)}") from None
    plan = cfg.get("scheduler")
    if plan is None or not OmegaConf.is_dict(plan.get("scheduler")) or "_target_" not in plan.scheduler:
        return
    scheduler_name = plan.scheduler._target_.rpartition(".")[2]
    try:
        make_scheduler = instantiate(plan.scheduler)
        if "total_steps" in inspect.signature(make_scheduler.func).parameters \
                and make_scheduler.keywords.get("total_steps") is None:
            make_scheduler.keywords["total_steps"] = 100  # the task fills in the trainer's count
        make_scheduler(optimizer)
    except Exception as error:
        raise UserError(f"scheduler {scheduler_name} refuses its settings: "
                        f"{first_line(error.__cause__ or error)}") from None


def _try_datamodule(cfg) -> None:
    """Runs the datamodule's constructor (its argument checks; nothing is read) with the run's sampler and seed."""
    if cfg.get("data") is None or "_target_" not in cfg.data:
        return
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cvlab.utils.plugins import plain_config

    try:
        datamodule = instantiate(cfg.data, sampler=plain_config(cfg.get("sampler")), seed=cfg.get("seed", 0))
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"data={cfg.data.get('name', '')} refuses its settings: {first_line(cause or error)}") \
            from None
    except UserError:
        raise
    except Exception as error:  # OmegaConf interpolation or type errors on the way in
        raise UserError(f"data={OmegaConf.select(cfg, 'data.name', default='')} refuses its settings: "
                        f"{first_line(error)}") from None
    task = OmegaConf.select(cfg, "task.name")
    wanted = OmegaConf.select(cfg, "task.data_kind") or task  # a task may train on another task's data (generation)
    if task is not None and getattr(datamodule, "kind", wanted) != wanted:
        raise UserError(f"data={cfg.data.get('name')} is {datamodule.kind} data but task={task} trains on {wanted} "
                        f"data; choose a {datamodule.kind} model (`cvlab list model`) or other data.")
