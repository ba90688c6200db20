"""Model registry: every architecture variant is a short function decorated with ``@register_model``.

``create_model(name, **kwargs)`` works without Hydra; an unknown name is answered with the closest
registered names. Each entry records the task it serves so the CLI can pick the task from the model.
"""
from __future__ import annotations

from typing import Callable

from cvlab.utils.errors import UserError, suggest

_MODELS: dict[str, Callable] = {}
_TASKS: dict[str, str] = {}


def register_model(fn: Callable | None = None, *, task: str = "classification"):
    """Register ``fn`` under its own name for ``task``; usable bare or as ``@register_model(task=...)``."""

    def wrap(f: Callable) -> Callable:
        if f.__name__ in _MODELS:
            raise ValueError(f"model {f.__name__!r} is registered twice")
        _MODELS[f.__name__] = f
        _TASKS[f.__name__] = task
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Importing the package registers every model file it lists.
    import cvlab.models  # noqa: F401


def list_models(task: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(name for name in _MODELS if task is None or _TASKS[name] == task)


def model_task(name: str) -> str:
    _ensure_loaded()
    _check_name(name)
    return _TASKS[name]


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}.{suggest(name, _MODELS)} `cvlab list model` shows them all.")


def create_model(name: str, **kwargs):
    """Build the registered model ``name``; ``kwargs`` go to its entry function."""
    from cvlab.layers.init import restore_own_inits

    _ensure_loaded()
    _check_name(name)
    model = _MODELS[name](**kwargs)
    restore_own_inits(model)  # the model's own init pass may have overwritten them
    return model
