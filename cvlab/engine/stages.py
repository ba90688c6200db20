"""The stage runner: a multi-stage method as named stages, run in order, each in its own directory, ending with one
table. A killed pipeline resumes: run it again in the same run directory and the finished stages are skipped.

A :class:`Stage` is a name, a function ``run(context) -> metrics`` (or ``(metrics, output)``: the output, e.g. the
trained task, is what later stages get from ``context.output(name)``), the names of the earlier stages whose outputs
it ``needs``, and its own ``config`` (its data view: a stage may train on other data than the next one).
:func:`run_stages` gives every stage:

- a directory ``<out>/<name>/`` (``context.out_dir``; the stage's ``config.paths.output_dir`` points at it, so a
  ``run_train(context.config)`` writes its weights, results.csv and metrics.json there);
- a record ``<name>/stage.json`` written atomically when the stage returns: its metrics (its row) and a fingerprint
  of its config and ``params``. A stage whose record exists, whose fingerprint still matches and whose needed stages
  were all skipped too is skipped: its row is re-read and its function is not called. Its output is rebuilt only if
  a later stage that runs needs it (``restore``; by default its ``weights/best.ckpt`` restored as a task). A stage
  that runs starts from an empty directory (a killed attempt's files go);
- one row in the final rich table (the ``columns`` the caller names) and in ``<out>/stages.json``.

Distillation (``cvlab distill``) is written on it as teacher -> student -> student_kd. The next multi-stage methods
read like this (sketches, not implementations):

R-CNN (Girshick et al. 2014): proposals, a CNN fine-tuned on warped regions, its features, one SVM per class, and a
box regressor; every stage after the first needs an earlier one's output::

    def extract_features(context):
        cnn = context.output("finetune").model             # restored from finetune/weights/best.ckpt if skipped
        regions = context.output("proposals")
        features = pool5_features(cnn, regions)
        np.save(context.out_dir / "features.npy", features)
        return {"regions": len(features)}, features

    stages = [
        Stage("proposals", selective_search, config=cfg, restore=load_proposals),        # boxes per image
        Stage("finetune", finetune_on_regions, needs=("proposals",), config=region_view(cfg)),  # run_train
        Stage("features", extract_features, needs=("proposals", "finetune"),
              restore=lambda context: np.load(context.out_dir / "features.npy")),
        Stage("svms", fit_class_svms, needs=("features",)),                 # sklearn LinearSVC, hard negatives
        Stage("box_regression", fit_box_ridge, needs=("features", "proposals")),
    ]
    results = run_stages(stages, output_dir(cfg), title="R-CNN",
                         columns=[Column("test/map50", "test mAP@0.5", "{:.4f}")])

EasyEnsemble and BalanceCascade (Liu, Wu & Zhou 2009): T members, each trained on all minority images and a
balanced draw of the majority (the member's data view), then one stage that combines them. EasyEnsemble's members
are independent; BalanceCascade's member t needs member t - 1, whose correctly classified majority images it drops::

    members = [Stage(f"member{t}", train_member, config=balanced_view(cfg, draw=t),
                     needs=(f"member{t - 1}",) if cascade and t else ()) for t in range(T)]
    combine = Stage("ensemble", vote, needs=tuple(member.name for member in members))
    run_stages([*members, combine], output_dir(cfg), columns=[Column("test/f1", "test F1", "{:.4f}")])

Hand-written: the Lightning/Hydra libraries run one fit at a time and have no cached pipeline of fits.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from cvlab.engine.runs import write_json
from cvlab.utils.console import console

RECORD = "stage.json"  # a stage's record: written last, atomically; its presence means the stage finished
SUMMARY = "stages.json"


@dataclass(frozen=True)
class Stage:
    """One named step of a pipeline (see the module docstring).

    Args:
        name: the stage's directory name and row key (letters, digits, ``_``, ``-``).
        run: ``run(context) -> metrics`` or ``(metrics, output)``; metrics is a json-ready dict (the stage's row).
        needs: earlier stages whose outputs ``run`` uses (``context.output(name)``).
        config: the stage's own config (its data view); its ``paths.output_dir`` is set to the stage's directory.
        params: settings outside ``config`` that the result depends on (part of the fingerprint).
        title: the line printed when the stage starts (default: its name).
        label: its row's name in the table (default: its name).
        restore: ``restore(context) -> output`` rebuilds the output of a skipped stage that a later one needs
            (default: the task in ``<stage>/weights/best.ckpt``).
    """

    name: str
    run: Callable[["StageContext"], dict | tuple[dict, Any]]
    needs: tuple[str, ...] = ()
    config: DictConfig | None = None
    params: dict = field(default_factory=dict)
    title: str = ""
    label: str = ""
    restore: Callable[["StageContext"], Any] | None = None


@dataclass
class StageResult:
    name: str
    metrics: dict
    output: Any = None
    skipped: bool = False  # finished in an earlier run: its row was re-read, its function not called

    def row(self) -> dict:
        return {"stage": self.name, **self.metrics}


@dataclass
class StageContext:
    """What a stage's function receives: its directory and config, and the results of the stages before it."""

    name: str
    out_dir: Path
    config: DictConfig | None
    results: dict[str, StageResult]

    def output(self, name: str) -> Any:
        """The output of the earlier stage ``name`` (one of this stage's ``needs``)."""
        return self.results[name].output

    def metrics(self, name: str) -> dict | None:
        """The metrics of the earlier stage ``name``; None when it is not part of this pipeline."""
        result = self.results.get(name)
        return result.metrics if result is not None else None

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "weights" / "best.ckpt"


@dataclass(frozen=True)
class Column:
    """One column of the final table: ``key`` of each stage's metrics, shown under ``header`` through ``format``
    (a format string or a function of the value; a stage without the key shows ``-``), justified ``justify``."""

    key: str
    header: str = ""
    format: str | Callable[[Any], str] = "{}"
    justify: str = "right"

    def cell(self, metrics: dict) -> str:
        value = metrics.get(self.key)
        if value is None:
            return "-"
        return self.format(value) if callable(self.format) else self.format.format(value)


def stage_config(config: DictConfig | None, out_dir: Path) -> DictConfig | None:
    """A copy of ``config`` whose ``paths.output_dir`` is ``out_dir`` (the stage's directory)."""
    if config is None:
        return None
    config = config.copy()
    OmegaConf.set_readonly(config, False)
    OmegaConf.update(config, "paths.output_dir", str(out_dir), force_add=True)
    return config


def fingerprint(config: DictConfig | None, params: dict) -> str:
    """A hash of what a stage's result depends on: its resolved config and ``params``. Where runs are kept
    (``paths``, and the stage's directory within the files it names) is left out, so a moved run still resumes."""
    plain = None
    if config is not None:
        plain = OmegaConf.to_container(stage_config(config, Path(".")), resolve=True)
        plain.pop("paths", None)
    text = json.dumps({"config": plain, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _default_restore(context: StageContext):
    from cvlab.engine.checkpoints import restore_task

    return restore_task(context.best_checkpoint, f"the {context.name} stage's checkpoint", "best.ckpt")


def _check(stages: Sequence[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        if not stage.name or not stage.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"stage name {stage.name!r} must be letters, digits, '_' or '-' (it names a folder)")
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} appears twice")
        missing = [need for need in stage.needs if need not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which do not run before it")
        seen.add(stage.name)


def refuse_resume(cfg: DictConfig, method: str, run_dir: str) -> None:
    """A pipeline of stages continues a killed run by running it again (finished stages are skipped), so
    ``resume=`` is refused for ``method`` (how the user chose it), naming the run directory to give instead."""
    from cvlab.utils.errors import UserError

    if cfg.get("resume"):
        raise UserError(f"{method} resumes a killed run by running it again in the same run directory "
                        f"(hydra.run.dir={run_dir}), not with resume=.")


def refuse_several_devices(cfg: DictConfig, method: str, parts: str, hint: str = "") -> None:
    """A pipeline whose ``parts`` train one after another in one process cannot take a multi-process trainer."""
    from cvlab.utils.errors import UserError

    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if str(devices) != "1" or nodes != 1:
        raise UserError(f"{method} trains its {parts} one after another in one process; trainer.devices={devices} "
                        f"would start several. Use trainer.devices=1{hint}.")


def run_stages(stages: Sequence[Stage], out_dir: Path, columns: Sequence[Column] = (), title: str = "stages",
               ) -> dict[str, StageResult]:
    """Runs ``stages`` in order in ``out_dir`` (see the module docstring), prints one table (a row per stage:
    its label, then ``columns``) and writes ``out_dir/stages.json``; returns {name: StageResult} in stage order."""
    _check(stages)
    out_dir = Path(out_dir)
    results: dict[str, StageResult] = {}
    contexts: dict[str, StageContext] = {}
    for position, stage in enumerate(stages, 1):
        directory = out_dir / stage.name
        context = StageContext(stage.name, directory, stage_config(stage.config, directory), results)
        contexts[stage.name] = context
        heading = f"[bold]{position}/{len(stages)} {stage.title or stage.name}"
        key = fingerprint(stage.config, stage.params)
        record = _read_record(directory / RECORD)
        fresh = record is not None and record.get("fingerprint") == key
        console.rule(heading)
        if fresh and all(results[need].skipped for need in stage.needs):
            console.print(f"finished earlier ({stage.name}/{RECORD}): skipped", style="dim", highlight=False)
            results[stage.name] = StageResult(stage.name, record["metrics"], skipped=True)
            continue
        if record is not None:
            why = "its config changed" if not fresh else "a stage it needs ran again"
            console.print(f"finished earlier, but {why}: running it again", style="dim", highlight=False)
        for need in stage.needs:  # outputs of skipped stages are rebuilt only when a stage that runs needs them
            needed = results[need]
            if needed.skipped and needed.output is None:
                restore = next(s for s in stages if s.name == need).restore or _default_restore
                needed.output = restore(contexts[need])
        if directory.exists():
            shutil.rmtree(directory)  # a killed or outdated attempt: the stage starts clean
        directory.mkdir(parents=True)
        returned = stage.run(context)
        metrics, output = returned if isinstance(returned, tuple) else (returned, None)
        write_json(directory / RECORD, {"stage": stage.name, "fingerprint": key, "metrics": metrics,
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        results[stage.name] = StageResult(stage.name, metrics, output)

    labels = {stage.name: stage.label or stage.name for stage in stages}
    write_json(out_dir / SUMMARY, {"title": title, "stages": [
        {**result.row(), "dir": name, "skipped": result.skipped} for name, result in results.items()]})
    console.print(stages_table(results, labels, columns, title))
    return results


def stages_table(results: dict[str, StageResult], labels: dict[str, str], columns: Sequence[Column], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("")
    for column in columns:
        table.add_column(column.header or column.key, justify=column.justify)
    for name, result in results.items():
        table.add_row(labels[name], *(column.cell(result.metrics) for column in columns))
    return table
