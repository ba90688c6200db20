"""Reading the shipped Hydra configs without running anything: config groups and their options, a resolver,
and a check of command-line overrides (:func:`check`) that turns every mistake into one line with the closest valid
names, before anything is built.

Hydra reports unknown options and keys with multi-line errors and no suggestions; this module composes the
config the same way first, so the CLI can answer `model=resnt50` with "did you mean resnet50". What it checks:

- options and keys: an option's yaml holds only the keys that act for it, so any other key is refused, with the
  reason where another option has it (``data.root does not apply to data=digits (it is embedded ...)``); keys that
  name or build an option (``model.name``, ``optimizer._target_``) are refused too;
- the keys of a constructor's node (``trainer``, ``optimizer``): any argument of the ``_target_``'s signature is
  accepted (``trainer.max_steps=2``, handed to Hydra as ``++trainer.max_steps=2``), others get the closest names;
- types, against the constructor's annotation (else the yaml's own value), and ranges
  (:mod:`cvlab.utils.validate`), for every choice of a sweep;
- ``???`` values left unset, and the folder the run will write to.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from cvlab.utils.errors import UserError, suggest
from cvlab.utils.validate import (
    check_annotation,
    check_settings,
    check_writable_folder,
    first_line,
    parameters,
    shown,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The evaluation splits of every dataset (the third, train, is only trained on).
EVAL_SPLITS = ("val", "test")


def check_split(split: str) -> str:
    if split not in EVAL_SPLITS:
        raise UserError(f"split is one of {', '.join(EVAL_SPLITS)}, got {split!r}.{suggest(split, EVAL_SPLITS)}")
    return split


def _run_dir_of(ckpt: str) -> str:
    """runs/<task>/<model>/<time>/weights/best.ckpt -> runs/<task>/<model>/<time>"""
    path = Path(str(ckpt)).expanduser()
    return str(path.parent.parent if path.parent.name == "weights" else path.parent)


if not OmegaConf.has_resolver("cvlab.run_dir_of"):
    OmegaConf.register_new_resolver("cvlab.run_dir_of", _run_dir_of)


def groups() -> list[str]:
    return list(_groups())


def options(group: str) -> list[str]:
    return list(_options(group))


# The shipped configs do not change while cvlab runs: read each folder once.
@functools.lru_cache(maxsize=None)
def _groups() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra",)))


@functools.lru_cache(maxsize=None)
def _options(group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def describe(group: str, option: str) -> str:
    """The first comment line of an option's yaml file."""
    for line in (CONF_DIR / group / f"{option}.yaml").read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def read_option(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False) or {}


def parse(overrides: list[str]):
    """Hydra's own parser; a malformed override becomes a UserError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:  # OverrideParseException and the lexer's errors
        raise UserError(f"cannot read the override: {str(error).splitlines()[0]}") from None


def option_keys(group: str, option: str) -> set[str]:
    """The keys of an option with those of the base configs it extends (``defaults: [base/x@_here_]``)."""
    return set(_keys_of(CONF_DIR / group / f"{option}.yaml"))


@functools.lru_cache(maxsize=None)
def _keys_of(path: Path) -> frozenset[str]:
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    keys = {key for key in spec if key != "defaults"}
    for entry in spec.get("defaults", []):
        if isinstance(entry, str) and entry.endswith("@_here_"):
            keys |= _keys_of(path.parent / f"{entry.removesuffix('@_here_')}.yaml")
    return frozenset(keys)


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=False)


_COMPOSED: dict[tuple, object] = {}


def _compose_groups(config_name: str, group_choices: list[str]):
    """The config with only the group choices applied, composed once per process (composing takes ~0.1 s, and a
    sweep or a fuzz run asks for the same choices many times): read it, :func:`_apply` works on a copy."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    key = (config_name, tuple(group_choices))
    if key not in _COMPOSED:
        try:
            _COMPOSED[key] = compose(config_name, group_choices)
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(first_line(error, 2)) from None
    return _COMPOSED[key]


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _choices(override, key: str, group_names: list[str]) -> list[tuple[Any, str]]:
    """Every ``(value, text)`` an override gives: one, or each choice of a sweep (a group's glob is matched
    against the group's options)."""
    from hydra.core.override_parser.types import Glob

    value = override.value()
    if isinstance(value, Glob):
        if key not in group_names:
            raise UserError(f"{override.input_line}: glob(...) picks options of a config group; {key} is a key.")
        matched = value.filter(options(key))
        if not matched:
            raise UserError(f"{override.input_line} matches no {key} option; `cvlab list {key}` shows them.")
        return [(name, name) for name in matched]
    if not override.is_sweep_override():
        return [(value, "" if value is None and override.is_delete() else override.get_value_element_as_str())]
    try:
        return list(zip(override.sweep_iterator(), override.sweep_string_iterator()))
    except Exception:  # interval(...) and tag(...) are search spaces, not lists
        raise UserError(f"{override.input_line}: cvlab sweeps list their values ({key}=a,b,c or "
                        f"range(start,stop,step)); interval(...) needs a search sweeper.") from None


def _values(override, key: str, group_names: list[str]) -> list:
    return [value for value, _ in _choices(override, key, group_names)]


def _concrete(override, text: str) -> str:
    """The override with one value (its Hydra spelling ``text``); a bare delete stays bare."""
    if override.is_delete() and not text:
        return override.get_key_element()
    return f"{override.get_key_element()}={text}"


def _check_type(key: str, old, new) -> None:
    if old is None or new is None or isinstance(old, (dict, list)):
        return
    if isinstance(old, bool):
        ok = isinstance(new, bool)
        expected = "true or false"
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
        expected = "an integer"
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
        expected = "a number"
    else:
        return
    if not ok:
        raise UserError(f"{key} expects {expected}, got {shown(new)}.")


# Groups whose node is the keyword arguments of a constructor named by its _target_: any parameter of that
# constructor is a valid key even where the yaml does not list it (`trainer.max_steps=2`), except those cvlab
# passes itself, refused with the way to set them.
SIGNATURE_GROUPS = {
    "trainer": {
        "logger": "loggers are chosen with logger=NAME (`cvlab list logger`)",
        "callbacks": "callbacks are chosen with the callbacks group (`cvlab list callbacks`, +callbacks.NAME=...)",
        "default_root_dir": "it is the run directory: move it with paths.runs=... or hydra.run.dir=...",
        "enable_model_summary": "cvlab prints its own model table (`cvlab info model=NAME`)",
    },
    "optimizer": {"params": "the task passes the model's parameters"},
}
# Keys that name what an option is; a different value is a different option.
IDENTITY_KEYS = ("name", "task", "source")
# Detection augmentation settings that only act when data.augment is true.
AUGMENTATION_KEYS = ("hflip", "scale", "translate", "color_jitter")
_META = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _select(cfg, key: str, default=None):
    # An interpolation that only Hydra's run can resolve (${hydra:...}) reads as unset here.
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False, throw_on_resolution_failure=False)


def _has(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = _select(cfg, parent) if parent else cfg
    return node is not None and hasattr(node, "keys") and leaf in node.keys()


_PARAMETERS: dict[str, dict] = {}


def _target_parameters(target: str) -> dict:
    """The keyword parameters of the class or function ``target`` names ({} when it cannot be imported)."""
    if target not in _PARAMETERS:
        from hydra.utils import get_object

        try:
            _PARAMETERS[target] = parameters(get_object(target))
        except Exception:  # a config's own _target_ that does not import is reported when it is built
            _PARAMETERS[target] = {}
    return _PARAMETERS[target]


def _parameters_of(cfg, group: str) -> tuple[dict, str]:
    """The constructor parameters a group's node is passed to, and the constructor's name for messages."""
    node = _select(cfg, group)
    if node is None or not hasattr(node, "keys"):
        return {}, ""
    if "_target_" in node:
        target = str(node._target_)
        return _target_parameters(target), target
    return {}, ""


def _why_absent(key: str, option: str, option_keys_: set[str]) -> str:
    """Why data option ``option`` (with keys ``option_keys_``) has no ``key`` that other data options have."""
    if key in ("root", "download") and "root" not in option_keys_:
        return "it is embedded: nothing is read from disk or downloaded"
    if key == "download":
        return "it reads its files from data.root; only torchvision's sets download"
    if key in ("val_fraction", "test_fraction") and "train_size" in option_keys_:
        return "it draws its three splits from the seed; data.train_size / val_size / test_size size them"
    if key == "test_fraction":
        return "its official test split is the test set"
    if key in ("train_size", "val_size", "test_size", "n_objects"):
        return "its images are read from files; only drawn data is sized"
    if key in ("train_split", "val_split", "test_split") and "root" not in option_keys_:
        return "it draws its three splits from the seed"
    if key == "class_names":
        return "its classes are named by the data itself"
    return ""


def _unknown_key(key: str, cfg, group_names: list[str]) -> UserError:
    parent, _, leaf = key.rpartition(".")
    if parent in ("data", "sampler") and _select(cfg, f"{parent}.name"):
        option = str(_select(cfg, f"{parent}.name"))
        owners = [o for o in options(parent) if leaf in option_keys(parent, o)]
        if owners and option in options(parent):
            reason = _why_absent(leaf, option, option_keys(parent, option)) if parent == "data" else ""
            return UserError(f"{parent}.{leaf} does not apply to {parent}={option}{f' ({reason})' if reason else ''}; "
                             f"it is a setting of {parent}={', '.join(owners)}.")
    node = _select(cfg, parent) if parent else cfg
    siblings = [f"{parent}.{k}" if parent else k for k in (node.keys() if hasattr(node, "keys") else [])]
    group = key.partition(".")[0]
    if group in SIGNATURE_GROUPS:
        parameters, _ = _parameters_of(cfg, group)
        siblings += [f"{group}.{name}" for name in parameters if name not in SIGNATURE_GROUPS[group]]
    candidates = list(dict.fromkeys(siblings + ([] if parent else group_names)))
    return UserError(f"unknown key {key!r}.{suggest(key, candidates)} `cvlab train --cfg job` shows every key.")


def _refuse_fixed(key: str, cfg, group_names: list[str]) -> None:
    """Keys an option fixes: its _target_ & co, and what names it (``model.name``: choose ``model=`` instead)."""
    parent, _, leaf = key.rpartition(".")
    head = key.partition(".")[0]
    if leaf in _META and _has(cfg, key):
        raise UserError(f"{key} is fixed by the {head} option; choose another one: {head}=NAME "
                        f"(`cvlab list {head}`).")
    node = _select(cfg, parent) if parent else None
    if leaf in IDENTITY_KEYS and parent and "." not in parent and hasattr(node, "keys") and "name" in node:
        group = parent if parent in group_names else "model"
        raise UserError(f"{key} names the option itself; choose another one with {parent}=NAME "
                        f"(`cvlab list {group}`).")


def _check_key(override, cfg, group_names: list[str]) -> str:
    """Checks a key=value override's key; returns how Hydra must be given it (a constructor argument the yaml
    lacks is force-added: ``++trainer.max_steps=2``)."""
    key = override.key_or_group
    _refuse_fixed(key, cfg, group_names)
    if override.is_delete():
        if not _has(cfg, key):
            raise _unknown_key(key, cfg, group_names)
        return override.input_line
    group, _, leaf = key.partition(".")
    if _has(cfg, key) and not override.is_add():
        return override.input_line
    if group in SIGNATURE_GROUPS and leaf and "." not in leaf:
        reserved = SIGNATURE_GROUPS[group]
        parameters, owner = _parameters_of(cfg, group)
        if leaf in reserved:
            raise UserError(f"{key} is not set here: {reserved[leaf]}.")
        if leaf in parameters:
            line = override.input_line.lstrip("+")
            return line if _has(cfg, key) else f"++{line}"
        if parameters:
            valid = [f"{group}.{name}" for name in parameters if name not in reserved]
            raise UserError(f"unknown key {key!r}: {owner} takes no argument {leaf!r}.{suggest(key, valid)}")
    if group in ("data", "model", "teacher", "student") or not (override.is_add() or override.is_force_add()):
        if _has(cfg, key):
            return override.input_line
        raise _unknown_key(key, cfg, group_names)
    return override.input_line


def _check_value(key: str, cfg, value) -> None:
    """The value's type: against the annotation of the constructor parameter it goes to, else against the yaml's
    own value."""
    import inspect

    group, _, leaf = key.partition(".")
    parameters = _parameters_of(cfg, group)[0] if leaf and "." not in leaf else {}
    annotation = parameters[leaf].annotation if leaf in parameters else inspect.Parameter.empty
    if annotation is not inspect.Parameter.empty:
        check_annotation(key, value, annotation)
    elif _has(cfg, key):
        _check_type(key, _select(cfg, key), value)


def _apply(composed, lines: list[str]):
    """A copy of a composed config with key=value overrides applied exactly as Hydra applies them after composing
    (its own function)."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    cfg = copy.deepcopy(composed)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(parse(lines), cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(first_line(error, 2)) from None
    return cfg


class Checked(NamedTuple):
    """What :func:`check` found good: the composed config (a sweep's first choices) and the overrides spelled for
    Hydra (a constructor argument that the yaml lacks gets ``++``)."""

    cfg: DictConfig
    overrides: list[str]


def check(config_name: str, overrides: list[str]) -> Checked:
    """Validates overrides against the shipped configs, and the settings they make against
    :mod:`cvlab.utils.validate` for every choice of a sweep, before anything is built.

    Raises UserError naming the bad option/key/value and the closest valid ones.
    """
    parsed = parse(overrides)
    group_names = groups()
    group_overrides, key_overrides = [], []
    for override in parsed:
        key = override.key_or_group
        if _is_hydra(key):
            continue
        if key in group_names:
            if not override.is_delete():
                for value in _values(override, key, group_names):
                    for option in value if isinstance(value, list) else [value]:  # logger=[csv,mlflow]: several
                        if option is not None and str(option) not in options(key):
                            raise UserError(f"unknown {key} option {str(option)!r}."
                                            f"{suggest(str(option), options(key))} "
                                            f"`cvlab list {key}` shows all {len(options(key))}.")
            group_overrides.append(override)
        else:
            key_overrides.append(override)
    group_choices = [[_concrete(o, text) for _, text in _choices(o, o.key_or_group, group_names)]
                     for o in group_overrides]
    group_lines = [choices[0] for choices in group_choices]
    base = _compose_groups(config_name, group_lines)

    spelled, key_choices = {}, []
    for override in key_overrides:
        spelled[id(override)] = line = _check_key(override, base, group_names)
        respelled = override if line == override.input_line else _reparse(line)
        choices = _choices(respelled, respelled.key_or_group, group_names)
        for value, _ in choices:
            if not override.is_delete():
                _check_value(override.key_or_group, base, value)
        key_choices.append([_concrete(respelled, text) for _, text in choices])
    key_lines = [choices[0] for choices in key_choices]
    cfg = _apply(base, key_lines)
    _check_complete(cfg)
    _check_augmentation(cfg, key_overrides)
    _check_close_mosaic(cfg, key_overrides)
    _check_sample_pairing(cfg)
    check_settings(cfg)
    # Every other choice of a sweep, one sweep at a time, the others at their first choice.
    for position, choices in enumerate(key_choices):
        for line in choices[1:]:
            lines = [*key_lines[:position], line, *key_lines[position + 1:]]
            check_settings(_apply(_compose_groups(config_name, group_lines), lines))
    for position, choices in enumerate(group_choices):
        for line in choices[1:]:
            lines = [*group_lines[:position], line, *group_lines[position + 1:]]
            check_settings(_apply(_compose_groups(config_name, lines), key_lines))
    _check_run_folder(cfg, config_name, parsed)
    return Checked(cfg, [spelled.get(id(o), o.input_line) for o in parsed])


def check_overrides(config_name: str, overrides: list[str]):
    """:func:`check`'s composed config."""
    return check(config_name, overrides).cfg


def _reparse(line: str):
    return parse([line])[0]


def _check_complete(cfg) -> None:
    """A ``???`` left in the config (``data.root`` of a file source) is named before anything is built."""
    missing = [key for key in _missing_keys(cfg) if not _is_hydra(key)]
    if missing:
        group = missing[0].partition(".")[0]
        option = f" (data={_select(cfg, 'data.name')} needs it)" if group == "data" else ""
        raise UserError(f"{missing[0]} has no value{option}; give {missing[0]}=...")


def _missing_keys(node, prefix: str = ""):
    """The ``???`` keys below ``node``, without resolving interpolations (``${hydra:...}`` cannot be, here)."""
    for key in node.keys():
        child = node._get_node(key)
        if child._is_missing():
            yield f"{prefix}{key}"
        elif isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_none():
            yield from _missing_keys(child, f"{prefix}{key}.")


def _check_augmentation(cfg, key_overrides) -> None:
    if _select(cfg, "data.augment") is not False:
        return
    for override in key_overrides:
        group, _, leaf = override.key_or_group.partition(".")
        if group == "data" and leaf in AUGMENTATION_KEYS and not override.is_delete():
            raise UserError(f"data.{leaf} acts only with data.augment=true (data={_select(cfg, 'data.name')} has "
                            "it false).")


def _check_close_mosaic(cfg, key_overrides) -> None:
    """A ``data.close_mosaic`` the user gave, in a run with neither mosaic nor mixup, is refused: it would change
    nothing (a model's own default, YOLOv6's 15, stays quiet)."""
    given = any(o.key_or_group in ("data.close_mosaic", "model.close_mosaic") and not o.is_delete()
                for o in key_overrides)
    if not given or not _select(cfg, "data.close_mosaic") or _select(cfg, "data.mosaic") or _select(cfg, "data.mixup"):
        return
    raise UserError(f"data.close_mosaic={_select(cfg, 'data.close_mosaic')} acts only with mosaic or mixup, and this "
                    "run has data.mosaic=0 data.mixup=0; set one above 0 or leave data.close_mosaic out")


def _check_sample_pairing(cfg) -> None:
    """SamplePairing that would never pair in this run (its schedule starts at or after the last epoch) is refused:
    the paper's 100 plain epochs first suit CIFAR's long schedule, not a 6-epoch run, and the run would train as if
    the option were not given."""
    if _select(cfg, "data.sample_pairing") is not True:
        return
    start, epochs = _select(cfg, "data.pairing_start"), _select(cfg, "trainer.max_epochs")
    if isinstance(start, int) and isinstance(epochs, int) and start >= epochs:
        raise UserError(f"data.sample_pairing=true never pairs here: it starts at epoch data.pairing_start={start} "
                        f"and the run trains trainer.max_epochs={epochs}; give data.pairing_start below {epochs} "
                        "(e.g. data.pairing_start=1).")


def _check_run_folder(cfg, config_name: str, parsed) -> None:
    """The folder the run will write to can be written: ``paths.runs``, or the checkpoint's run folder for eval and
    predict (unless hydra.run.dir moves it)."""
    if any(o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") for o in parsed):
        return
    if config_name in ("eval", "predict"):
        ckpt = _select(cfg, "ckpt")
        if ckpt is not None:
            check_writable_folder(f"the run folder of ckpt={ckpt} (where {config_name} writes; or give "
                                  "hydra.run.dir=...)", _run_dir_of(str(ckpt)))
    elif _select(cfg, "paths.runs") is not None:
        check_writable_folder("paths.runs", _select(cfg, "paths.runs"))
