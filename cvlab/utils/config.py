"""Reading the shipped Hydra configs without running anything: config groups and their options, a resolver,
and a check of command-line overrides that turns every mistake into one line with the closest valid names.

Hydra reports unknown options and keys with multi-line errors and no suggestions; this module composes the
config the same way first, so the CLI can answer `model=resnt50` with "did you mean resnet50".
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from cvlab.utils.errors import UserError, suggest

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
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra",))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise UserError(f"cannot read the override: {str(error).splitlines()[0]}") from None


def _values(override) -> list:
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def _first_values(parsed) -> list[str]:
    """One concrete override per parsed one (the first choice of a sweep), for a trial composition."""
    concrete = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            concrete.append(f"{key}={next(override.sweep_string_iterator())}")
        elif override.is_delete() and override.value() is None:
            concrete.append(key)
        else:
            concrete.append(f"{key}={override.get_value_element_as_str()}")
    return concrete


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=False)


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
        raise UserError(f"{key} expects {expected}, got {new!r}.")


def check_overrides(config_name: str, overrides: list[str]):
    """Validates overrides against the shipped configs; returns the composed config (first sweep choice).

    Raises UserError naming the bad option/key/value and the closest valid ones.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parsed = parse(overrides)
    group_names = groups()
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra":
            continue
        if key in group_names and not override.is_delete():
            for value in _values(override):
                if value is not None and str(value) not in options(key):
                    raise UserError(f"unknown {key} option {str(value)!r}.{suggest(str(value), options(key))} "
                                    f"`cvlab list {key}` shows all {len(options(key))}.")
    try:
        group_choices = [o for o in _first_values(parsed)
                         if "=" in o and o.split("=")[0].lstrip("+~").split("@")[0] in group_names]
        base = compose(config_name, group_choices)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_first_line(error)) from None
    for override in parsed:
        key = override.key_or_group
        if key in group_names or key.startswith("hydra") or override.is_add() or override.is_force_add():
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        if node is None or not hasattr(node, "keys") or leaf not in node.keys():
            siblings = [f"{parent}.{k}" if parent else k for k in (node.keys() if hasattr(node, "keys") else [])]
            candidates = list(dict.fromkeys(siblings + ([] if parent else group_names)))
            raise UserError(f"unknown key {key!r}.{suggest(key, candidates)} Use +{key}=... to add a new key, "
                            f"or `cvlab train --cfg job` to see every key.")
        for value in _values(override):
            _check_type(key, OmegaConf.select(base, key), value)
    try:
        return compose(config_name, _first_values(parsed))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_first_line(error)) from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
