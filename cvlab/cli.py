"""The `cvlab` command. Each command forwards its `key=value` arguments to a Hydra entry point (so `-m`,
`--cfg job` and `hydra.run.dir=` work), after checking them against the shipped configs and their values against
their ranges (:func:`check`), so that a mistake costs one line and exit code 2 instead of a traceback. They pass
unchanged, except that a Trainer or optimizer argument the yaml does not list is added for Hydra
(`trainer.max_steps=2` reaches it as `++trainer.max_steps=2`).

Heavy imports (torch, Lightning) happen inside the commands: `cvlab --help` stays fast.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(
    name="cvlab",
    help="Computer-vision experiment runner: every method of the curriculum as a Hydra option.\n\n"
    "Examples: cvlab train | cvlab train model=resnet50 norm=gn activation=mish | "
    "cvlab sweep optimizer=sgd,adam norm=bn,gn | cvlab list model",
    add_completion=False,
    no_args_is_help=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["--help"]}
# Hydra flags that take a value, so the value is not mistaken for an override.
HYDRA_VALUED_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun"}


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides, expect_value = [], [], False
    for arg in args:
        if expect_value:
            flags.append(arg)
            expect_value = False
        elif arg.startswith("-") and "=" not in arg:
            flags.append(arg)
            expect_value = arg in HYDRA_VALUED_FLAGS
        else:
            overrides.append(arg)
    return flags, overrides


def _choice(overrides: list[str], group: str) -> str | None:
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == group:
            return value
    return None


def _models_of(task: str) -> list[str]:
    from cvlab.utils import config

    return [name for name in config.options("model")
            if config.read_option("model", name).get("task", "classification") == task]


def complete_task(overrides: list[str], announce: bool = False) -> list[str]:
    """`model=yolov3` alone selects the detection task and its default data; explicit task=/data= win. A task=
    without model= takes the task's ``default_model`` where its yaml names one (task=anomaly: the autoencoder). With
    ``announce``, what was filled in is printed as one line; a model of another task than task= is refused."""
    from cvlab.utils import config
    from cvlab.utils.console import console, fail

    model = _choice(overrides, "model")
    given = f"model={model}"
    extra = []
    if model is None:
        chosen = _choice(overrides, "task")
        model = config.read_option("task", chosen).get("default_model") if chosen in config.options("task") else None
        given, extra = f"task={chosen}", [f"model={model}"] if model else []
    if model is None or "," in model or model not in config.options("model"):
        return overrides
    model_task = config.read_option("model", model).get("task", "classification")
    task = _choice(overrides, "task")
    if task is None:
        task = model_task
        if task != "classification":
            extra.append(f"task={task}")
    elif "," not in task and task in config.options("task") and task != model_task:
        fail(f"model {model!r} is a {model_task} model; task={task} takes one of {', '.join(_models_of(task))}.")
    if _choice(overrides, "data") is None and task in config.options("task") and task != "classification":
        extra.append(f"data={config.read_option('task', task)['default_data']}")
    if task in config.options("task"):
        extra += _leave_out_unused_groups(overrides, task)
    if extra and announce:
        console.print(f"{given}: {' '.join(extra)} (give task=/data= to choose otherwise)", style="dim",
                      highlight=False)
    return extra + overrides


def _leave_out_unused_groups(overrides: list[str], task: str) -> list[str]:
    """``~group`` for each of train.yaml's groups that ``task`` does not read (its yaml's ``unused_groups``: a GAN's
    two optimisers replace ``optimizer``); one given anyway is refused, with the task's reason."""
    from cvlab.utils import config
    from cvlab.utils.console import fail

    unused = config.read_option("task", task).get("unused_groups") or {}
    left_out = [f"~{group}" for group in unused]
    for override in overrides:
        group = override.lstrip("+~").partition("=")[0].partition(".")[0]
        if group in unused and override not in left_out:  # a study's cells come with the ~group already
            fail(f"task={task} does not read {group}: {unused[group]}; drop {override}.")
    return [option for option in left_out if option not in overrides]


# `cvlab distill teacher=resnet50 student=mobilenetv2`: the two model slots of distill.yaml (`model@teacher`).
DISTILL_SLOTS = ("teacher", "student")


def distill_overrides(overrides: list[str]) -> list[str]:
    """`teacher=NAME` / `student=NAME` choose a model for that slot: Hydra spells it `model@teacher=NAME`."""
    return [f"model@{o.lstrip('+')}" if o.lstrip("+").partition("=")[0] in DISTILL_SLOTS else o for o in overrides]


def _mentions_distill(overrides: list[str]) -> bool:
    heads = {o.lstrip("+~").partition("=")[0].split(".")[0] for o in overrides}
    return bool(heads & {"distill", *DISTILL_SLOTS, *(f"model@{slot}" for slot in DISTILL_SLOTS)})


def check(config_name: str, overrides: list[str]):
    """The CLI's checking function: :func:`cvlab.utils.config.check` (keys, types, ranges, every sweep choice),
    with a mistake printed as one line and exit code 2. Returns what it found good (the composed config and the
    overrides spelled for Hydra)."""
    from cvlab.utils.config import check as check_config
    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError

    try:
        return check_config(config_name, overrides)
    except UserError as error:
        fail(str(error))


def run_here(config_name: str, overrides: list[str], command: str) -> None:
    """Checks the overrides and runs ``cvlab.run.<command>.run_<command>(cfg)`` in this process, without Hydra's
    run directory (commands that only print); a UserError becomes one line and exit 2."""
    import importlib

    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError

    cfg = check(config_name, overrides).cfg
    runner = getattr(importlib.import_module(f"cvlab.run.{command}"), f"run_{command}")
    try:
        runner(cfg)
    except UserError as error:
        fail(str(error))


def launch(command: str, config_name: str, entry: str, args: list[str], multirun: bool = False) -> None:
    """Checks the overrides, then hands the whole argument list to the Hydra entry ``cvlab.run.<entry>.main``."""
    import importlib

    flags, overrides = _split(args)
    if config_name == "train":
        overrides = complete_task(overrides, announce=True)
    elif config_name == "distill":
        overrides = distill_overrides(overrides)
    overrides = check(config_name, overrides).overrides
    # Hydra hands jobs to a launcher only in a multirun: `cvlab train launcher=slurm` is a sweep of one job.
    multirun = multirun or _choice(overrides, "launcher") not in (None, "local")
    if multirun and not {"-m", "--multirun"} & set(flags):
        flags.insert(0, "--multirun")
    module = importlib.import_module(f"cvlab.run.{entry}")
    sys.argv = [f"cvlab {command}", *flags, *overrides]
    module.main()


@app.command(context_settings=PASS_THROUGH)
def train(ctx: typer.Context) -> None:
    """Train a model: cvlab train [group=option ...] [key=value ...]

    Examples: cvlab train | cvlab train model=resnet50 data=shapes trainer.max_epochs=5 |
    cvlab train resume=runs/.../weights/last.ckpt trainer.max_epochs=20 | cvlab train --cfg job
    """
    launch("train", "train", "train", ctx.args)


def _require_checkpoint(command: str, overrides: list[str]) -> None:
    """No ckpt=, or one that does not exist, is answered in one line before Hydra makes a run directory."""
    from pathlib import Path

    from cvlab.utils.console import fail
    from cvlab.utils.errors import missing_checkpoint

    ckpt = _choice(overrides, "ckpt")
    if ckpt is None:
        fail(f"{command} needs a checkpoint: cvlab {command} ckpt=runs/<task>/<model>/<time>/weights/best.ckpt")
    if not Path(ckpt).expanduser().is_file():
        fail(str(missing_checkpoint("checkpoint", ckpt)))


@app.command(name="eval", context_settings=PASS_THROUGH)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate a checkpoint: cvlab eval ckpt=runs/.../weights/best.ckpt [split=test|val] [data=...]; writes eval.json.

    The split defaults to test, the split a training run reports; the checkpoint re-creates it from its own data
    config and seed."""
    from cvlab.utils.config import check_split
    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError

    overrides = _split(ctx.args)[1]
    try:
        check_split(_choice(overrides, "split") or "test")
    except UserError as error:
        fail(str(error))
    _require_checkpoint("eval", overrides)
    launch("eval", "eval", "eval", ctx.args)


@app.command(context_settings=PASS_THROUGH)
def predict(ctx: typer.Context) -> None:
    """Run a checkpoint on images: cvlab predict ckpt=runs/.../weights/best.ckpt source=DIR|FILE [conf=0.25]

    Writes runs/<task>/<model>/<time>/predict/<time>/: a drawn copy of each image (detection: boxes, classes,
    scores above conf; classification: the best class; segmentation: the class mask over it, and masks/: palette
    PNGs of class indices at the image's size) and predictions.json (detection: COCO results format, boxes
    [x, y, w, h] in original pixels; classification: the top_k classes with probabilities; segmentation: each
    class's share of the pixels).
    Examples: cvlab predict ckpt=runs/detection/yolov3/<time>/weights/best.ckpt source=images/ conf=0.4 |
    cvlab predict ckpt=runs/.../weights/best.onnx source=images/  (an export, through onnxruntime and its sidecar)
    """
    from pathlib import Path

    from cvlab.utils.console import fail

    _, overrides = _split(ctx.args)
    _require_checkpoint("predict", overrides)
    source = _choice(overrides, "source")
    if source is None:
        fail("predict needs images: cvlab predict ckpt=... source=FOLDER_OR_IMAGE")
    if not Path(source).expanduser().exists():
        fail(f"source {source!r} does not exist; give an image file or a folder of images.")
    launch("predict", "predict", "predict", ctx.args)


@app.command(context_settings=PASS_THROUGH)
def generate(ctx: typer.Context) -> None:
    """Sample a generation checkpoint: cvlab generate ckpt=runs/generation/.../weights/best.ckpt [n=64] [seed=1]
    [truncation=0.7] [truncation_cutoff=N] [label=CLASS]

    Writes runs/generation/<model>/<time>/generate/<time>/: n PNGs at the model's resolution (images/), grid.png and
    generate.json, from the generator's EMA. Latents and noise are drawn from the seed: the same seed gives the same
    images. truncation (psi, the style models): 1 = none, 0 = the average image; label fixes one class (index or name)
    of a conditional model, else the classes come in turn.
    Example: cvlab generate ckpt=runs/generation/stylegan2/<time>/weights/best.ckpt n=64 truncation=0.7 seed=1
    """
    overrides = _split(ctx.args)[1]
    _require_checkpoint("generate", overrides)
    launch("generate", "generate", "generate", ctx.args)


@app.command(context_settings=PASS_THROUGH)
def export(ctx: typer.Context) -> None:
    """Export a checkpoint's network, checked against it: cvlab export ckpt=runs/.../weights/best.ckpt
    [format=onnx|torchscript] [out=PATH] [images=4]

    Writes the graph (default: weights/best.onnx or weights/best_torchscript.pt) and its sidecar json (input size,
    normalisation, class names, outputs, box format), after running it (onnxruntime, or the reloaded TorchScript
    module) on validation images beside the checkpoint: every output within 1e-4, boxes within 1e-3 px, else
    exit 1 and nothing written. The onnx format needs pip install 'cvlab[export]'.
    """
    overrides = _split(ctx.args)[1]
    _require_checkpoint("export", overrides)
    run_here("export", overrides, "export")


@app.command(context_settings=PASS_THROUGH)
def sweep(ctx: typer.Context) -> None:
    """Grid over comma-separated options, then a leaderboard: cvlab sweep optimizer=sgd,adam norm=bn,gn

    Overrides of distill.*, teacher or student sweep distillations: cvlab sweep distill.temperature=1,2,4,8
    """
    config = "distill" if _mentions_distill(_split(ctx.args)[1]) else "train"
    launch("sweep", config, config, ctx.args, multirun=True)


@app.command(context_settings=PASS_THROUGH)
def study(ctx: typer.Context) -> None:
    """Controlled comparison: every setting x seed, then mean ± std, Welch p-values and ranks.

    cvlab study norm=bn,gn,sn seeds=5 [model=... data=... any train override]. Each comma-separated override is an
    axis; every combination of their values (a setting) runs once per seed (seed, seed+1, ...) as its own
    `cvlab train` run in runs/<task>/studies/<time>/<cell>/. Every cell has the same data split (data.seed, default
    the first seed) and budget; the seed varies only the initialisation and the data order. Overrides of distill.*,
    teacher or student study distillations: cvlab study distill.temperature=1,4 teacher=resnet50 student=mobilenetv2.

    The end: one table (per setting: mean ± std of the main metric on val and of the test metrics, Welch's t-test
    p-value against study.baseline=VALUE[/VALUE...] (default: the first setting), the rank by val), study.csv,
    cells.csv and study.png (each seed, mean ± 95 % CI).

    Resuming: the same command again continues the latest study with the same settings and overrides, skipping
    its finished cells (a larger seeds=N adds cells); study.dir=runs/<task>/studies/<time> continues that study;
    study.resume=false starts a new one.
    """
    from cvlab.run.study import run_study_command
    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError

    flags, overrides = _split(ctx.args)
    if flags:
        fail(f"cvlab study takes overrides only (key=value), not {' '.join(flags)}; each cell is one cvlab train run.")
    command = "distill" if _mentions_distill(overrides) else "train"
    overrides = distill_overrides(overrides) if command == "distill" else complete_task(overrides, announce=True)
    try:
        run_study_command(command, overrides)
    except UserError as error:
        fail(str(error))


@app.command(context_settings=PASS_THROUGH)
def tune(ctx: typer.Context) -> None:
    """Optuna search over any train settings, in Hydra's sweep grammar; resumable.

    cvlab tune optimizer.lr="tag(log,interval(1e-4,1e-1))" optimizer.weight_decay="interval(0,0.1)"
    optimizer=choice(adamw,sgd) tune.trials=20 [any train override]. interval(low,high) is searched as a float (an
    int for an integer setting), tag(log,...) on a log scale; key=a,b,c, choice(...) and range(...) as categories.
    tune.sampler=tpe|random|grid|cmaes; a median pruner stops trials behind at the same epoch (tune.pruner=none).

    Writes runs/<task>/tunes/<time>/: study.db, one run per trial (<n>/), leaderboard.csv, best.yaml (cvlab train
    --config-dir <tune dir> --config-name best), importance.png, tune.json. A killed search continues with
    cvlab tune tune.dir=runs/<task>/tunes/<time> [tune.trials=N].
    """
    from cvlab.engine.tune import tune_overrides
    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError

    flags, overrides = _split(ctx.args)
    try:
        overrides = tune_overrides(complete_task(overrides, announce=True))
    except UserError as error:
        fail(str(error))
    launch("tune", "tune", "tune", [*flags, *overrides])


@app.command(context_settings=PASS_THROUGH)
def distill(ctx: typer.Context) -> None:
    """Knowledge distillation: train (or load) a teacher, then a student with and without its soft targets.

    Examples: cvlab distill teacher=resnet50 student=mobilenetv2 | cvlab distill distill.temperature=8 |
    cvlab distill teacher.ckpt=runs/.../weights/best.ckpt distill.kind=semi_supervised distill.labeled_fraction=0.1
    """
    launch("distill", "distill", "distill", ctx.args)


@app.command(name="list")
def list_options(
    group: Optional[str] = typer.Argument(None, help="a config group, e.g. model; all groups if omitted"),
) -> None:
    """Every option of every config group (or of one group), with a one-line description."""
    from rich.markup import escape
    from rich.table import Table

    from cvlab.utils import config
    from cvlab.utils.console import console, fail

    names = config.groups()
    if group is not None and group not in names:
        fail(f"unknown group {group!r}.{config.suggest(group, names)} Groups: {', '.join(names)}.")
    for name in [group] if group else names:
        table = Table(title=f"{name}", title_justify="left", show_header=False)
        table.add_column("option", style="cyan")
        table.add_column("description")
        for option in config.options(name):
            table.add_row(option, escape(config.describe(name, option)))  # a yaml comment is text, not markup
        console.print(table)


@app.command(context_settings=PASS_THROUGH)
def info(ctx: typer.Context) -> None:
    """Parameters (exact), FLOPs at the data's input size and a per-stage table: cvlab info model=resnet50 [data=...]"""
    run_here("train", complete_task(_split(ctx.args)[1]), "info")


@app.command(context_settings=PASS_THROUGH)
def anchors(ctx: typer.Context) -> None:
    """Anchors for a dataset: cvlab anchors data=... [model=yolov3] [n=9]

    k-means over the training boxes' sizes with distance 1 - IoU (YOLOv2's dimension clusters); prints the anchors
    and their mean best IoU beside the model's own. n defaults to the model's number of anchors (yolov2: 5,
    yolov3: 9, yolov3_tiny: 6); boxes are measured at data.image_size. Train with the result via
    model.anchors=[[w,h],...] or let training cluster: model.anchors=auto.
    Examples: cvlab anchors | cvlab anchors data=coco data.root=~/data/coco model=yolov2
    """
    run_here("anchors", _split(ctx.args)[1], "anchors")


@app.command()
def smoke(
    models: Optional[list[str]] = typer.Argument(None, help="model names (default: every registered model)"),
    steps: int = typer.Option(2, help="training and validation batches per model"),
) -> None:
    """Every registered model runs a few training and validation steps on tiny embedded data; a table says which
    passed."""
    from cvlab.engine import model_task
    from cvlab.run.smoke import run_smoke
    from cvlab.utils.console import fail
    from cvlab.utils.errors import UserError
    from cvlab.utils.validate import check_number

    try:  # before any model runs: a misspelt name would fail deep inside, with a traceback
        for name in models or []:
            model_task(name)
        check_number("--steps", steps, 1, integer=True)
    except UserError as error:
        fail(str(error))
    failed = run_smoke(models or None, steps)
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
