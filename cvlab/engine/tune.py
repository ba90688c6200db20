"""Search: `cvlab tune`, Optuna over any train settings, written in Hydra's sweep grammar.

Hydra's own override parser reads the search space from the command line:

==========================================  ===================================================================
override                                    Optuna distribution
==========================================  ===================================================================
``key=interval(low,high)``                  ``FloatDistribution(low, high)``; ``IntDistribution`` for a setting
                                            whose value is an integer (``data.batch_size``), or tagged ``int``
``key=tag(log,interval(low,high))``         the same on a log scale (``log=True``)
``key=a,b,c`` or ``key=choice(a,b,c)``      ``CategoricalDistribution((a, b, c))``
``key=range(start,stop[,step])``            ``CategoricalDistribution`` of its values
``group=choice(a,b)``, ``group=a,b``        the group's options as categories (``glob(res*)``: those it matches)
==========================================  ===================================================================

Every other override applies to every trial. A trial is a training run (:func:`~cvlab.engine.training.run_train`)
in ``<tune dir>/<trial number>/``, with its own weights, results.csv, metrics.json and ``.hydra/`` record. Its
objective is the metric the best checkpoint is chosen by (:func:`main_metric`: the task's main metric), scored by
the best checkpoint on val. A median pruner, told that metric after every validation epoch by
:class:`~cvlab.callbacks.pruning.OptunaPruning`, stops trials that fall behind the others at the same epoch.

The study lives in ``<tune dir>/study.db`` (sqlite), so a killed search continues where it stopped:
``cvlab tune tune.dir=<tune dir> [tune.trials=N]`` keeps the finished trials, marks a trial that was running as
failed and runs its parameters again, numbers on, and counts ``tune.trials`` over both runs.

It ends with a leaderboard (printed, and leaderboard.csv), the best trial's config as a ready config (best.yaml:
``cvlab train --config-dir <tune dir> --config-name best``), the parameters' importance (fANOVA, importance.png),
and tune.json (the best trial, the counts of completed / pruned / failed trials, epochs and wall time).

Optuna does the search and the pruning. Written here: the grammar's translation into Optuna's distributions, the
study's bookkeeping across runs of one search, and the report.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from cvlab.callbacks.finite import NonFiniteError
from cvlab.callbacks.pruning import OptunaPruning
from cvlab.engine.runs import json_ready, output_dir, quiet_lightning, say_run_dir, write_json
from cvlab.engine.training import run_train
from cvlab.utils import config
from cvlab.utils.console import console
from cvlab.utils.errors import UserError
from cvlab.utils.validate import check_choice, check_number, first_line

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "none")
STUDY_FILE = "study.db"
STUDY_NAME = "cvlab-tune"
BEST_CONFIG = "best"  # <tune dir>/best.yaml, a primary config: --config-name best
INTERVAL_TAGS = ("log", "int")
# The search itself, handed to Hydra as one list (its run mode takes no sweep); the other tune.* settings may change
# when a search is continued.
SPACE_KEY = "tune.space"
HOW_TO_SEARCH = ("key=interval(low,high), key=tag(log,interval(low,high)), key=a,b,c, key=choice(a,b) or "
                 "key=range(start,stop[,step]), e.g. optimizer.lr='tag(log,interval(1e-4,1e-1))' "
                 "optimizer=choice(adamw,sgd)")
STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
STATES = ("complete", "pruned", "failed", "interrupted")


# ------------------------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class Dimension:
    """One searched setting.

    Attributes:
        name: the Optuna parameter: the override's key (``optimizer.lr``) or group (``optimizer``).
        key: how a trial's override of it begins (``optimizer.lr``; ``++optimizer.amsgrad`` for a constructor
            argument that the yaml lacks).
        line: the override as given (``optimizer.lr=tag(log,interval(1e-4,1e-1))``).
        distribution: what Optuna samples.
        spellings: a categorical dimension's choices as Hydra writes them (``'a b'`` for a string with a space).
    """

    name: str
    key: str
    line: str
    distribution: Any
    spellings: tuple[str, ...] = ()

    def spell(self, value) -> str:
        """``value`` as the value of an override."""
        if isinstance(self.distribution, CategoricalDistribution):
            return self.spellings[self.distribution.choices.index(value)]
        return str(int(value)) if isinstance(self.distribution, IntDistribution) else repr(float(value))

    def override(self, value) -> str:
        return f"{self.key}={self.spell(value)}"

    def ends(self) -> list:
        """The values checked before a search starts: an interval's two ends, every choice."""
        if isinstance(self.distribution, CategoricalDistribution):
            return list(self.distribution.choices)
        return [self.distribution.low, self.distribution.high]

    def grid(self) -> list:
        """Every value, for the grid sampler."""
        if isinstance(self.distribution, CategoricalDistribution):
            return list(self.distribution.choices)
        if isinstance(self.distribution, IntDistribution):
            return list(range(self.distribution.low, self.distribution.high + 1, self.distribution.step))
        raise UserError(f"tune.sampler=grid takes listed values, and {self.line} is continuous; list them "
                        f"({self.name}=a,b,c) or give range(start,stop,step).")

    def suggest(self, trial: optuna.trial.Trial):
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, log=d.log)
        return trial.suggest_float(self.name, d.low, d.high, log=d.log)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [dimension.name for dimension in self.dimensions]

    def suggest(self, trial: optuna.trial.Trial) -> dict:
        return {dimension.name: dimension.suggest(trial) for dimension in self.dimensions}

    def overrides(self, params: dict) -> list[str]:
        """A trial's overrides for its parameters ``params`` ({name: value})."""
        return [dimension.override(params[dimension.name]) for dimension in self.dimensions]

    def bounds(self) -> list[str]:
        """One sweep per dimension over its :meth:`Dimension.ends`, for :func:`cvlab.utils.config.check`."""
        return [f"{d.key}={','.join(d.spell(value) for value in d.ends())}" for d in self.dimensions]

    def grid(self) -> dict[str, list]:
        return {dimension.name: dimension.grid() for dimension in self.dimensions}


def is_search(override) -> bool:
    """A sweep of Hydra's grammar (interval, choice, range, a,b,c, glob) over a setting or a group."""
    return override.is_sweep_override() and not override.is_hydra_override()


def parse_space(lines: Sequence[str], cfg: DictConfig | None = None) -> SearchSpace:
    """The search space of sweep overrides ``lines`` (see the module docstring). ``cfg``, the composed config,
    tells which settings hold integers (an interval over one is an ``IntDistribution``). Raises UserError."""
    group_names = config.groups()
    dimensions = []
    for override in config.parse(list(lines)):
        name, line = override.key_or_group, override.input_line
        if not is_search(override) or override.is_delete():
            raise UserError(f"{line} searches nothing; a search is {HOW_TO_SEARCH}.")
        if override.is_interval_sweep():
            if name in group_names:
                raise UserError(f"{line}: interval(...) ranges over numbers, and {name} is a config group; search "
                                f"its options with {name}=choice(a,b) or {name}=a,b (`cvlab list {name}`).")
            distribution = _interval(override, _holds_int(cfg, name))
            dimensions.append(Dimension(name, override.get_key_element(), line, distribution))
        else:
            if getattr(override.value(), "tags", None):
                raise UserError(f"{line}: tags ({' and '.join(INTERVAL_TAGS)}) apply to an interval.")
            choices, spellings = _choices(override, name, group_names)
            dimensions.append(Dimension(name, override.get_key_element(), line, CategoricalDistribution(choices),
                                        tuple(spellings)))
    names = [dimension.name for dimension in dimensions]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"{twice[0]} is searched twice; give it once.")
    return SearchSpace(tuple(dimensions))


def _holds_int(cfg: DictConfig | None, key: str) -> bool:
    value = None if cfg is None else OmegaConf.select(cfg, key, default=None, throw_on_missing=False,
                                                      throw_on_resolution_failure=False)
    return isinstance(value, int) and not isinstance(value, bool)


def _interval(override, holds_int: bool):
    sweep, line = override.value(), override.input_line
    tags = set(sweep.tags)
    if tags - set(INTERVAL_TAGS):
        raise UserError(f"{line}: an interval's tags are {' and '.join(INTERVAL_TAGS)}; "
                        f"got {', '.join(sorted(tags - set(INTERVAL_TAGS)))}.")
    log = "log" in tags
    try:
        if holds_int or "int" in tags:
            if not (float(sweep.start).is_integer() and float(sweep.end).is_integer()):
                raise UserError(f"{line}: {override.key_or_group} is an integer setting; give whole-number bounds.")
            return IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    except ValueError as error:  # Optuna checks the bounds: low <= high, low > 0 on a log scale
        raise UserError(f"{line}: {first_line(error)}") from None


def _choices(override, name: str, group_names: list[str]) -> tuple[list, list[str]]:
    """A categorical dimension's choices (python values) and their Hydra spellings."""
    from hydra.core.override_parser.types import Glob, QuotedString

    if isinstance(override.value(), Glob):
        if name not in group_names:
            raise UserError(f"{override.input_line}: glob(...) picks options of a config group; {name} is a key.")
        matched = override.value().filter(config.options(name))
        if not matched:
            raise UserError(f"{override.input_line} matches no {name} option; `cvlab list {name}` shows them.")
        return matched, matched
    values = [value.text if isinstance(value, QuotedString) else value for value in override.sweep_iterator()]
    if not values:
        raise UserError(f"{override.input_line} gives no value to search.")
    if any(isinstance(value, (list, dict)) for value in values):
        raise UserError(f"{override.input_line}: the choices of a search are single values (numbers, strings, "
                        "true/false, null), not lists or dicts.")
    return values, list(override.sweep_string_iterator())


# ---------------------------------------------------------------------------------- the command line, checked


def _key(line: str) -> str:
    return line.lstrip("+~").partition("=")[0]


def _is_tune_key(line: str) -> bool:
    return _key(line) == "tune" or _key(line).startswith("tune.")


def _given(lines: Sequence[str], key: str):
    """The value that ``lines`` give ``key`` (parsed), or None."""
    line = next((line for line in lines if _key(line) == key), None)
    return None if line is None else config.parse([line])[0].value()


def _quoted(text: str) -> str:
    """``text`` as a quoted string of Hydra's override grammar."""
    return "'" + text.replace("'", "\\'") + "'"


def check_tune_settings(node: DictConfig) -> None:
    """The ``tune:`` node's settings (UserError naming the bad one)."""
    check_number("tune.trials", node.trials, 1, integer=True)
    check_choice("tune.sampler", node.sampler, SAMPLERS)
    check_choice("tune.pruner", node.pruner, PRUNERS)
    check_number("tune.seed", node.seed, 0, 2**32 - 1, integer=True)
    check_number("tune.startup_trials", node.startup_trials, 0, integer=True)
    check_number("tune.min_epochs", node.min_epochs, 1, integer=True)
    if node.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CmaEsSampler is built on it)
        except ImportError:
            raise UserError("tune.sampler=cmaes needs the cmaes package: pip install cmaes") from None


def _check_one_process(cfg: DictConfig) -> None:
    """Trials train one after another inside the tune's process: a trial of several processes (DDP) would start
    each of them on the whole search's command."""
    devices = OmegaConf.select(cfg, "trainer.devices")
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one or OmegaConf.select(cfg, "trainer.num_nodes", default=1) not in (None, 1):
        raise UserError(f"cvlab tune trains its trials one after another in its own process, each on one device; "
                        f"trainer.devices={devices} asks for more. Tune with trainer.devices=1, then train the best "
                        "config on more: cvlab train --config-dir <tune dir> --config-name best trainer=ddp")


def tune_overrides(overrides: Sequence[str]) -> list[str]:
    """What `cvlab tune` hands to Hydra for the command line's ``overrides``: the other overrides as
    :func:`cvlab.utils.config.check` spells them, and the search as ``tune.space=[...]`` (Hydra's run mode takes no
    sweep). Everything is checked first: each override, the tune settings, and every searched setting at both ends
    of its interval and at each of its choices.

    With ``tune.dir=<tune dir>`` the search and the overrides of that tune are taken up again, with the tune.*
    settings given now (``tune.trials=30``), in its directory (``hydra.run.dir``). Raises UserError."""
    searches, others = _split_search(overrides)
    resume = _given(others, "tune.dir")
    if resume is None:
        return _checked(searches, others)
    resume = str(resume)
    stored = _stored_overrides(Path(resume).expanduser())
    if searches or any(not _is_tune_key(line) for line in others):
        # The command given again: it must be the same search.
        if not searches or sorted(_search_of(_checked(searches, others))) != sorted(_search_of(stored)):
            settings = [line for line in stored if not _is_tune_key(line)]
            raise UserError(f"tune.dir={resume} continues its own search, {' '.join(_stored_space(stored))} with "
                            f"{' '.join(settings) or 'no other override'}: give only tune.* settings with it "
                            "(tune.trials=...), or start a new tune without tune.dir.")
    changed = {_key(line) for line in others}
    kept = [line for line in stored if _key(line) not in changed and _key(line) != SPACE_KEY]
    return [*_checked(_stored_space(stored), [*kept, *others]), f"hydra.run.dir={_quoted(resume)}"]


def _split_search(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    parsed = config.parse(list(overrides))
    return ([o.input_line for o in parsed if is_search(o)], [o.input_line for o in parsed if not is_search(o)])


def _search_of(lines: Sequence[str]) -> list[str]:
    """What makes a search what it is: its space and the overrides of every trial (the other tune.* settings
    only say how long and how it searches)."""
    return [line for line in lines if not _is_tune_key(line) or _key(line) == SPACE_KEY]


def _stored_overrides(tune_dir: Path) -> list[str]:
    record = tune_dir / ".hydra" / "overrides.yaml"
    if not (tune_dir / STUDY_FILE).is_file() or not record.is_file():
        raise UserError(f"tune.dir={tune_dir} holds no tune ({STUDY_FILE} and .hydra/overrides.yaml); tunes are in "
                        "runs/<task>/tunes/<time>/.")
    return [str(line) for line in OmegaConf.load(record)]


def _stored_space(stored: list[str]) -> list[str]:
    line = next((line for line in stored if _key(line) == SPACE_KEY), None)
    if line is None:
        raise UserError(f"the tune's .hydra/overrides.yaml has no {SPACE_KEY}: it was not written by cvlab tune.")
    return [str(search) for search in config.parse([line])[0].value()]


def _checked(searches: list[str], others: list[str]) -> list[str]:
    if not searches:
        raise UserError(f"cvlab tune needs a search space: {HOW_TO_SEARCH}.")
    if _given(others, SPACE_KEY) is not None:
        raise UserError(f"{SPACE_KEY} is written by cvlab tune from the searched settings; give them as "
                        f"{HOW_TO_SEARCH}.")
    base = config.check("tune", others)
    check_tune_settings(base.cfg.tune)
    _check_one_process(base.cfg)
    space = parse_space(searches, base.cfg)
    if base.cfg.tune.sampler == "grid":
        space.grid()
    given = {_key(line): line for line in others}
    for dimension in space.dimensions:
        if dimension.name in given:
            raise UserError(f"{dimension.name} is both searched ({dimension.line}) and set ({given[dimension.name]}); "
                            "give one of them.")
    spelled = config.check("tune", [*others, *space.bounds()]).overrides
    # A searched constructor argument that the yaml lacks is force-added, as check spells it (++key).
    keys = [line.partition("=")[0] for line in spelled[len(others):]]
    lines = [f"{key}={dimension.line.partition('=')[2]}" for key, dimension in zip(keys, space.dimensions)]
    return [*spelled[:len(others)], f"{SPACE_KEY}=[{','.join(map(_quoted, lines))}]"]


# -------------------------------------------------------------------------------------------------- the study


def main_metric(cfg: DictConfig) -> tuple[str, str]:
    """The metric the best checkpoint is chosen by, and ``max`` or ``min``: the ``model_checkpoint`` callback's
    monitor and mode, which are the task's main metric (``task.monitor``, ``task.mode``) unless overridden."""
    checkpoint = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if checkpoint is not None and checkpoint.get("monitor"):
        return str(checkpoint.monitor), str(checkpoint.get("mode", "min"))
    return str(cfg.task.monitor), str(cfg.task.mode)


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards tune.trials: it completed, was pruned, or its training diverged (a result);
    not one that a kill or an error stopped (it runs again)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def state_of(trial: FrozenTrial) -> str:
    """complete, pruned, failed (its training diverged), interrupted (a kill or an error stopped it: it runs again),
    running or waiting."""
    return "interrupted" if trial.state == TrialState.FAIL and not counted(trial) else STATE_NAMES[trial.state]


def make_sampler(settings: DictConfig, space: SearchSpace, seed: int):
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler}
    return samplers[settings.sampler](seed=seed)


def make_pruner(settings: DictConfig):
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are epochs, counted from 0: a trial trains min_epochs epochs before it can be pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=int(settings.startup_trials),
                                       n_warmup_steps=int(settings.min_epochs) - 1)


def open_study(out: Path, settings: DictConfig, space: SearchSpace, monitor: str, mode: str) -> optuna.Study:
    """The study in ``out/study.db``, new or continued (the same space and metric, else UserError). A trial that a
    killed run left running is marked failed, and each failed trial that no diverged training explains is queued
    once to run again with its parameters. The sampler's seed moves on with the trials already run, so a continued
    search does not draw the first run's points again. (One search runs in a tune directory at a time: a trial found
    running was left so by a killed run.)"""
    direction = "maximize" if mode == "max" else "minimize"
    study = optuna.create_study(storage=f"sqlite:///{(out / STUDY_FILE).resolve()}", study_name=STUDY_NAME,
                                direction=direction, load_if_exists=True, pruner=make_pruner(settings))
    search = {"space": [dimension.line for dimension in space.dimensions], "monitor": monitor,
              "direction": direction}
    if not study.user_attrs:
        for key, value in search.items():
            study.set_user_attr(key, value)
    elif {key: study.user_attrs.get(key) for key in search} != search:
        raise UserError(f"{out / STUDY_FILE} holds another search ({' '.join(study.user_attrs.get('space', []))}, "
                        f"{study.user_attrs.get('monitor')}): continue that one with tune.dir={out} and tune.* "
                        "settings only, or start a new tune.")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    queued = {trial.user_attrs.get("rerun_of") for trial in trials}
    for trial in trials:
        if (trial.state == TrialState.FAIL and not counted(trial) and trial.number not in queued
                and set(trial.params) == set(space.names)):
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
            console.print(f"trial {trial.number} did not finish: its parameters run again as a new trial",
                          highlight=False)
    study.sampler = make_sampler(settings, space, int(settings.seed) + len(trials))
    return study


def compose_trial(overrides: list[str], out: Path) -> DictConfig:
    """A trial's train config (train.yaml with ``overrides``) writing to ``out``, recorded in ``out/.hydra/`` as
    Hydra records a run. Composed with Hydra's compose API inside the running `cvlab tune` app, whose search path is
    cvlab's configs (:func:`cvlab.utils.config.compose` starts a Hydra of its own, which a running app refuses)."""
    from hydra import compose

    cfg = compose(config_name="train", overrides=overrides)
    OmegaConf.set_readonly(cfg, False)
    cfg.paths.output_dir = str(out)
    record = out / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), record / "overrides.yaml")
    return cfg


def _epochs(trial: FrozenTrial) -> int:
    """Epochs a trial trained: its metrics say for a finished one; a pruned one, its last reported epoch + 1."""
    metrics = trial.user_attrs.get("metrics", {})
    if "epochs" in metrics:
        return int(metrics["epochs"])
    return max(trial.intermediate_values) + 1 if trial.intermediate_values else 0


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _epochs_text(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _say_trial(monitor: str, direction: str):
    behind = "below" if direction == "maximize" else "above"

    def say(study: optuna.Study, trial: FrozenTrial) -> None:
        params = " ".join(f"{name}={_shown(value)}" for name, value in trial.params.items())
        if trial.state == TrialState.COMPLETE:
            told = f"{monitor} {trial.value:.4f} in {_epochs_text(_epochs(trial))}"
        elif trial.state == TrialState.PRUNED:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            told = (f"pruned after {_epochs_text(_epochs(trial))}: {monitor} {last:.4f} {behind} the median of the "
                    "trials before it at that epoch")
        else:
            told = f"failed: {trial.user_attrs.get('error', 'stopped')}"
        console.print(f"[bold]trial {trial.number}[/] ({params}): {told}", highlight=False)

    return say


def run_tune(cfg: DictConfig, overrides: Sequence[str]) -> tuple[dict, dict]:
    """Runs the search ``cfg.tune`` describes in ``paths.output_dir`` (see the module docstring); ``overrides`` are
    the command line's as Hydra got them, of which those that are not tune.* apply to every trial. Returns (the best
    trial's metrics, {} when no trial completed; {"study", "rows": the leaderboard})."""
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of its own (_say_trial)
    out = output_dir(cfg)
    say_run_dir(out, "start")
    settings = cfg.tune
    space = parse_space([str(line) for line in settings.space], cfg)
    monitor, mode = main_metric(cfg)
    base = [line for line in overrides if not _is_tune_key(line)]
    study = open_study(out, settings, space, monitor, mode)
    done = sum(counted(trial) for trial in study.get_trials(deepcopy=False))
    remaining = int(settings.trials) - done
    console.print(f"tune: {remaining if remaining > 0 else 0} trial(s) to run ({done} done, tune.trials="
                  f"{settings.trials}); {settings.sampler} sampler, {settings.pruner} pruner, {monitor} "
                  f"({study.direction.name.lower()})", highlight=False)

    def objective(trial: optuna.trial.Trial) -> float:
        params = space.suggest(trial)
        trial_dir = out / str(trial.number)
        trial_cfg = compose_trial([*base, *space.overrides(params)], trial_dir)
        try:
            metrics, _ = run_train(trial_cfg, extra_callbacks=[OptunaPruning(trial, monitor)])
        except NonFiniteError as error:
            trial.set_user_attr("error", str(error))
            return math.nan  # Optuna records the trial as failed
        trial.set_user_attr("metrics", json_ready(metrics))
        return metrics[monitor]

    started = time.perf_counter()
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[_say_trial(monitor, study.direction.name.lower())])
    wall_time = time.perf_counter() - started
    return report(study, out, space, base, monitor, cfg, wall_time)


# ------------------------------------------------------------------------------------------------- the report


def _test_key(monitor: str) -> str:
    return "test/" + monitor.partition("/")[2] if monitor.startswith("val/") else monitor


def leaderboard(study: optuna.Study, space: SearchSpace, monitor: str) -> list[dict]:
    """One row per trial: completed ones ranked best first, then pruned ones (by the metric of their last epoch),
    then failed and interrupted ones."""
    test_key = _test_key(monitor)
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        value = trial.value if trial.state == TrialState.COMPLETE else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        state = state_of(trial)
        # An interrupted trial is marked so when the search continues: its end is not known.
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start and state != "interrupted" else None
        rows.append({"trial": trial.number, **{name: trial.params.get(name) for name in space.names},
                     monitor: value, test_key: trial.user_attrs.get("metrics", {}).get(test_key),
                     "state": state, "epochs": _epochs(trial),
                     "time_s": round(seconds, 1) if seconds is not None else None})
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda row: (order.get(row["state"], 2), sign * row[monitor] if row[monitor] is not None
                               and not math.isnan(row[monitor]) else math.inf, row["trial"]))
    for position, row in enumerate(rows, 1):
        row["rank"] = position if row["state"] == "complete" else ""
    return rows


def write_leaderboard(rows: list[dict], path: Path, monitor: str, direction: str) -> None:
    from rich.table import Table

    columns = ["rank", *(key for key in rows[0] if key != "rank")]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    better = "higher" if direction == "maximize" else "lower"
    table = Table(title=f"tune leaderboard ({monitor} of the best checkpoint on val, {better} is better; a pruned "
                        "trial's is its last epoch's)", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in rows:
        table.add_row(*("" if row[column] is None else _shown(row[column]) for column in columns))
    console.print(table)
    console.print(f"[bold]leaderboard:[/] {path}", highlight=False)


def experiment_config(overrides: Sequence[str]) -> dict:
    """``overrides`` as a primary config extending train.yaml: group choices in its defaults list
    (``override optimizer: sgd``), settings as values; a deleted setting (``~callbacks.progress_bar``) is null,
    which the callbacks and logger groups skip."""
    groups = config.groups()
    defaults: list = ["train"]
    values = OmegaConf.create({})
    for override in config.parse(list(overrides)):
        value = None if override.is_delete() else override.value()
        if override.key_or_group in groups:
            defaults.append({f"override {override.key_or_group}": value})
        else:
            OmegaConf.update(values, override.key_or_group, value, merge=False, force_add=True)
    return {"defaults": [*defaults, "_self_"], **OmegaConf.to_container(values)}


def write_best_config(path: Path, trial: FrozenTrial, overrides: Sequence[str], monitor: str) -> str:
    """best.yaml for the best trial; returns the command that trains it again."""
    command = f"cvlab train --config-dir {path.parent} --config-name {path.stem}"
    test_key = _test_key(monitor)
    test = trial.user_attrs.get("metrics", {}).get(test_key)
    header = (f"# @package _global_\n"
              f"# The best trial of the tune {path.parent}: trial {trial.number}, {monitor} {trial.value:.4f}"
              f"{f', {test_key} {test:.4f}' if test is not None else ''}.\n"
              f"# Train it again: {command} [key=value ...]\n")
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(experiment_config(overrides))))
    return command


def param_importances(study: optuna.Study, seed: int) -> tuple[dict[str, float], str]:
    """fANOVA importance of each parameter for the objective over the completed trials, and why there is none
    (fewer than two completed trials, or Optuna could not fit it)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2:
        return {}, f"importance needs 2 completed trials, the study has {len(completed)}"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except (ValueError, RuntimeError) as error:
        return {}, f"fANOVA could not rank the parameters ({first_line(error)})"


def plot_importance(importances: dict[str, float], path: Path, monitor: str) -> None:
    """A horizontal bar per parameter, the most important on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.45 * len(names)))
    ax.barh(names, [importances[name] for name in names], color="tab:blue")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"importance for {monitor} (fANOVA, sums to 1)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(study: optuna.Study, out: Path, space: SearchSpace, base: list[str], monitor: str, cfg: DictConfig,
           wall_time: float) -> tuple[dict, dict]:
    direction = study.direction.name.lower()
    trials = study.get_trials(deepcopy=False)
    rows = leaderboard(study, space, monitor)
    if rows:
        write_leaderboard(rows, out / "leaderboard.csv", monitor, direction)
    states = [state_of(trial) for trial in trials if trial.state != TrialState.WAITING]
    counts = {state: states.count(state) for state in STATES}
    # What pruning saved: the epochs that the completed and pruned trials trained, and would have without it.
    epochs = sum(_epochs(trial) for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED))
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    budget = max_epochs * (counts["complete"] + counts["pruned"]) \
        if isinstance(max_epochs, int) and max_epochs > 0 else None
    trials_time = sum(row["time_s"] or 0 for row in rows)
    summary = {"monitor": monitor, "direction": direction, "sampler": str(cfg.tune.sampler),
               "pruner": str(cfg.tune.pruner), "trials": len(states), **counts, "epochs": epochs,
               "epochs_without_pruning": budget, "wall_time_s": round(wall_time, 1),
               "trials_time_s": round(trials_time, 1)}
    best_metrics = {}
    if counts["complete"]:
        best = study.best_trial
        best_metrics = dict(best.user_attrs.get("metrics", {}))
        command = write_best_config(out / f"{BEST_CONFIG}.yaml", best, [*base, *space.overrides(best.params)],
                                    monitor)
        summary["best"] = {"trial": best.number, "search": best.params, "metrics": best_metrics}
        test_key = _test_key(monitor)
        test = f", {test_key} {best_metrics[test_key]:.4f}" if test_key in best_metrics else ""
        console.print(f"[bold]best trial {best.number}:[/] {monitor} {best.value:.4f}{test} with "
                      + " ".join(f"{name}={_shown(value)}" for name, value in best.params.items()), highlight=False)
        console.print(f"[bold]best config:[/] {out / BEST_CONFIG}.yaml; train it again: {command}", highlight=False,
                      soft_wrap=True)
    else:
        console.print("no trial completed: no best.yaml", highlight=False)
    importances, why_none = param_importances(study, int(cfg.tune.seed))
    summary["importance"] = importances
    if importances:
        plot_importance(importances, out / "importance.png", monitor)
        console.print(f"[bold]importance:[/] {out / 'importance.png'} ("
                      + ", ".join(f"{name} {value:.2f}" for name, value in importances.items()) + ")",
                      highlight=False)
    else:
        console.print(f"no importance.png: {why_none}", highlight=False)
    write_json(out / "tune.json", summary)
    interrupted = f", {counts['interrupted']} interrupted (run again)" if counts["interrupted"] else ""
    pruned_epochs = f"; {epochs} epochs trained of {budget} without pruning" if budget else ""
    console.print(f"{len(states)} trials: {counts['complete']} completed, {counts['pruned']} pruned, "
                  f"{counts['failed']} failed{interrupted}{pruned_epochs}; wall time {wall_time:.1f} s this run "
                  f"({trials_time:.1f} s of trials in all)", highlight=False)
    say_run_dir(out, "end")
    return best_metrics, {"study": study, "rows": rows}
