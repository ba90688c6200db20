"""Plug-in configs: a ``_target_`` config built with the values its caller has on offer.

A sampler or a loss says what it needs through its signature (``labels``, ``class_counts``, ``num_classes``,
``seed``, ...). Its caller offers everything it knows, and the plug-in receives exactly the values it names, so one
``sampler=`` or ``loss=`` option works for every task that can supply its inputs::

    instantiate_plugin({"_target_": "cvlab.data.samplers.ClassBalancedSampler", "name": "class_balanced"},
                       labels=[0, 1, 1], num_samples=3, seed=0)   # -> ClassBalancedSampler(labels=[0, 1, 1], seed=0)

The config's own keys are Hydra's (``hydra.utils.instantiate``: nested ``_target_`` nodes, ``_partial_``...) and win
over an offered value of the same name. The offered values themselves never pass through OmegaConf: they can be
large (a label per image) or not config types (tensors).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from cvlab.utils.errors import UserError

# Keys of a plug-in config that describe it (its display name, the task it belongs to) rather than parameterise it.
PLUGIN_META_KEYS = ("name", "task")


def plain_config(cfg: Any) -> dict | None:
    """``cfg`` (an OmegaConf node or a mapping) as a plain dict, resolved; None stays None."""
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _label(cfg: Mapping) -> str:
    return str(cfg.get("name") or cfg["_target_"])


def _signature(cfg: Mapping) -> inspect.Signature:
    from hydra.utils import get_object

    try:
        return inspect.signature(get_object(cfg["_target_"]))
    except Exception as error:  # hydra wraps every import failure in its own exception types
        raise UserError(f"plug-in {_label(cfg)}: cannot import {cfg['_target_']!r} "
                        f"({str(error).splitlines()[0]})") from None


def missing_arguments(cfg: Mapping | None, available: Iterable[str] = ()) -> list[str]:
    """The required parameters of ``cfg``'s target that neither the config nor ``available`` supplies
    (``[]`` for a config without ``_target_``)."""
    if not cfg or not cfg.get("_target_"):
        return []
    supplied = set(cfg) | set(available)
    return [name for name, parameter in _signature(cfg).parameters.items()
            if parameter.default is inspect.Parameter.empty and name not in supplied
            and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]


def instantiate_plugin(cfg: Mapping | None, **available: Any) -> Any | None:
    """Instantiates the ``_target_`` config ``cfg`` with those ``available`` values its target's signature accepts
    (all of them for a target taking ``**kwargs``); the config's own keys, less :data:`PLUGIN_META_KEYS`, come
    first. Returns None for a config without ``_target_`` (the caller's default).

    A required parameter that nobody supplies is a :class:`UserError` naming it and what was on offer.
    """
    from hydra.utils import instantiate

    cfg = plain_config(cfg)
    if not cfg or not cfg.get("_target_"):
        return None
    own = {key: value for key, value in cfg.items() if key not in PLUGIN_META_KEYS}
    parameters = _signature(cfg).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    offered = {key: value for key, value in available.items()
               if key not in own and (takes_any or key in parameters)}
    missing = missing_arguments(own, offered)
    if missing:
        raise UserError(f"{_label(cfg)} needs {', '.join(missing)}, which is not available here "
                        f"(available: {', '.join(sorted(available)) or 'nothing'}).")
    # Hydra builds the config's part (nested targets included); the offered values are bound afterwards.
    return instantiate(own, _partial_=True)(**offered)
