"""Model registry: every architecture variant is a short function decorated with ``@register_model``.

``create_model(name, **kwargs)`` works without Hydra; an unknown name is answered with the closest
registered names. ``create_model(name, features_only=True, out_indices=...)`` gives a backbone's stage outputs
instead (:mod:`cvlab.models.backbones.features`). Each entry records the task it serves so the CLI can pick the
task from the model.
"""
from __future__ import annotations

from collections.abc import Sequence
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


def create_model(name: str, features_only: bool = False, out_indices: Sequence[int] | None = None, **kwargs):
    """Build the registered model ``name``; ``kwargs`` go to its entry function.

    ``features_only=True`` returns the backbone's trunk instead of the classifier: a
    :class:`~cvlab.models.backbones.features.FeatureExtractor` whose ``forward(x: Tensor[N, C, H, W])`` gives the
    outputs of the stages at ``out_indices`` (indices into the backbone's ``feature_info``, negative from the end;
    None = every stage) as ``list[Tensor[N, C_i, H // r_i, W // r_i]]``, and whose ``feature_info`` describes them.
    It holds only the weights those stages need (no pool, no classifier).
    """
    from cvlab.layers.init import restore_own_inits
    from cvlab.models.backbones.features import Backbone, FeatureExtractor

    _ensure_loaded()
    _check_name(name)
    if out_indices is not None and not features_only:
        raise UserError(f"out_indices={tuple(out_indices)} selects feature stages; it needs features_only=True.")
    model = _MODELS[name](**kwargs)
    restore_own_inits(model)  # the model's own init pass may have overwritten them
    if not features_only:
        return model
    if not isinstance(model, Backbone):
        raise UserError(f"model {name!r} has no feature stages; features_only=True takes a backbone: "
                        f"{', '.join(list_models(task='classification'))}.")
    return FeatureExtractor(model, out_indices)
