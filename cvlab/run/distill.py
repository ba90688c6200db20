"""`cvlab distill teacher=resnet50 student=mobilenetv2`: knowledge distillation as stages of the engine's stage
runner (:func:`cvlab.engine.run_stages`), each an ordinary training run in its own folder of the distillation run
(weights/, results.csv, metrics.json, plots):

1. ``teacher``: Net-T, trained with the teacher's config, or loaded with ``teacher.ckpt=PATH`` and scored on this
   run's val and test splits.
2. ``student`` (``distill.baseline``): the student alone on hard labels.
3. ``student_kd``: the student taught by the frozen teacher at temperature T (the registered ``distillation``
   task); same data, budget and seed as the baseline, so both start from the same weights.

Everything that can be wrong (data, budget, teacher checkpoint, hint layers) is checked before the first step of
training. The run ends with one table (teacher / student alone / student with KD: test and val accuracy of the
best-on-val checkpoint, parameters, FLOPs, CPU latency per image), printed and written to distill.json with the KD
gain on test; the run's metrics.json holds the distilled student's metrics (the sweep leaderboard ranks by them)
and the other stages' accuracy. A killed run resumes: run the same command again with
``hydra.run.dir=<its run directory>`` and the stages that finished are skipped.
"""
from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import (
    LATENCY_THREADS,
    LATENCY_WARMUP,
    SPLITS,
    Column,
    Stage,
    build_datamodule,
    cpu_profile,
    distillation,
    evaluate_checkpoint,
    list_models,
    output_dir,
    quiet_lightning,
    refuse_resume,
    resamples_embeddings,
    restore_task,
    run_guarded,
    run_stages,
    run_train,
    say_run_dir,
    to_plain,
    write_json,
)
from cvlab.engine.checkpoints import read_checkpoint
from cvlab.utils.console import console
from cvlab.utils.errors import UserError

# The figures of each stage that distill.json keeps (its stage.json keeps them all).
ROW_KEYS = ("model", "test/acc", "val/acc", "test/f1", "val/f1", "params", "flops", "cpu_latency_ms")
COLUMNS = (
    Column("model", "model", justify="left"),
    Column("test/acc", "test acc", "{:.4f}"),
    Column("val/acc", "val acc", "{:.4f}"),
    Column("params", "params", "{:,}"),
    Column("flops", "MFLOPs", lambda flops: f"{flops / 1e6:.2f}"),
    Column("cpu_latency_ms", "CPU ms/image", "{:.3f}"),
)
PROFILE_KEYS = ("params", "flops", "cpu_latency_ms")


@functools.lru_cache(maxsize=8)
def _checkpoint_model_name(path: str) -> str | None:
    """The registered architecture a cvlab checkpoint holds (None when the file is missing, not a cvlab checkpoint
    or names no registered model: it becomes part of the run directory's name)."""
    try:
        checkpoint = read_checkpoint(Path(path).expanduser(), mmap=True)  # read safely; the tensors stay on disk
        name = checkpoint["hyper_parameters"]["model"]["name"]
    except (UserError, KeyError, TypeError):  # run_distill reports an unreadable file; this only names the run
        return None
    return name if name in list_models() else None


def distill_pair(teacher: str, student: str, teacher_ckpt: str | None, kind: str) -> str:
    """The run directory's name, <teacher>-to-<student>, as they will really be (a checkpoint names its own
    architecture; born-again distillation gives the student the teacher's)."""
    if teacher_ckpt:
        teacher = _checkpoint_model_name(str(teacher_ckpt)) or teacher
    return f"{teacher}-to-{teacher if kind == 'self' else student}"


if not OmegaConf.has_resolver("cvlab.distill_pair"):
    OmegaConf.register_new_resolver("cvlab.distill_pair", distill_pair)


def model_node(node) -> dict:
    """A teacher/student config as a plain model config (``ckpt`` says where weights come from, not what to build)."""
    return {key: value for key, value in to_plain(node).items() if key != "ckpt"}


def data_view(cfg: DictConfig, stage: str) -> dict:
    """The stage's data: the run's data, cut to distill.train_fraction and, for semi-supervised distillation, to
    the labeled images (teacher, baseline) or with the other labels hidden (the distilled student)."""
    node = to_plain(cfg.data)
    semi = cfg.distill.kind == "semi_supervised"
    if cfg.distill.train_fraction >= 1 and not semi:
        return node
    return {**node, "_target_": "cvlab.data.budget.LabelBudgetDataModule",
            "train_fraction": float(cfg.distill.train_fraction),
            "labeled_fraction": float(cfg.distill.labeled_fraction) if semi else 1.0,
            "unlabeled": "hide" if semi and stage == "student_kd" else "drop"}


def stage_config(cfg: DictConfig, stage: str, model: dict) -> DictConfig:
    """A train config for one stage: the run's groups, ``model`` and the stage's data; the distilled student's
    task is the registered ``distillation`` task. (The stage runner points ``paths.output_dir`` at its folder.)"""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("teacher", "student", "distill"):
        plain.pop(key)
    plain.update(model=model, data=data_view(cfg, stage), resume=None)
    if stage == "student_kd":
        plain["task"]["name"] = "distillation"
    return OmegaConf.create(plain)


def run_distill(cfg: DictConfig) -> tuple[dict, dict]:
    """Runs the stages per ``cfg`` (see the module docstring); returns (the distilled student's metrics plus the
    other stages' accuracy, {"teacher", "student", "student_kd": the tasks (None for a stage skipped on a rerun
    whose output no later stage needed), "table": the rows})."""
    quiet_lightning()
    out = output_dir(cfg)
    refuse_resume(cfg, "cvlab distill", "runs/distillation/<pair>/<time>")
    if cfg.get("strategy") is not None and cfg.strategy.name != "none":
        raise UserError(f"strategy={cfg.strategy.name} is a method of cvlab train (an ensemble of members); cvlab "
                        "distill trains one teacher and one student. Leave strategy=none.")
    if resamples_embeddings(cfg):
        raise UserError(f"sampler={cfg.sampler.name} sampler.space=features re-trains a classifier's head on "
                        "resampled embeddings, a method of cvlab train; cvlab distill trains its stages on images: "
                        "use sampler.space=pixels.")
    say_run_dir(out, "start")
    settings = distillation.DistillationSettings.from_config(cfg.distill)
    runs = int(cfg.distill.latency_runs)
    ckpt = str(Path(str(cfg.teacher.ckpt)).expanduser()) if cfg.teacher.ckpt else None

    # Everything that can be wrong is checked before the first step of training.
    distillation.check_data(cfg.data)
    teacher_model = model_node(cfg.teacher)
    teacher_data = build_datamodule(stage_config(cfg, "teacher", teacher_model))
    info = teacher_data.info
    loaded = None
    if ckpt:
        loaded = distillation.check_teacher(restore_task(Path(ckpt), "teacher.ckpt", "best.ckpt"), info,
                                            str(cfg.data.name), ckpt)
        teacher_model = dict(loaded.hparams.model)
    student_model = dict(teacher_model) if settings.kind == "self" else model_node(cfg.student)
    configs = {"teacher": stage_config(cfg, "teacher", teacher_model),
               "student": stage_config(cfg, "student", student_model),
               "student_kd": stage_config(cfg, "student_kd", student_model)}
    if configs["student_kd"].data != configs["teacher"].data:  # semi-supervised: the distilled student's own view
        build_datamodule(configs["student_kd"])
    if settings.kind == "feature":
        groups = {group: to_plain(cfg[group]) for group in ("norm", "activation", "attention")}
        distillation.check_hint_layers(loaded.model if loaded else teacher_model, student_model, groups, info,
                                       settings.hint_layers)

    def with_profile(metrics: dict, task, same_as: dict | None = None) -> dict:
        """The stage's row: its metrics, its model and what the model costs (``same_as``: a row of the same
        architecture, whose profile it shares)."""
        profile = ({key: same_as[key] for key in PROFILE_KEYS} if same_as
                   else cpu_profile(task.model, info.in_chans, info.image_size, runs))
        return {**metrics, "model": str(task.hparams.model["name"]), **profile}

    def train(context, extra_callbacks=(), same_as=None):
        metrics, objects = run_train(context.config, extra_callbacks=extra_callbacks)
        task = objects["task"]  # holds the best checkpoint's weights (run_train scored them)
        return with_profile(metrics, task, same_as), task

    def score_loaded_teacher(context):
        metrics = {}
        for split in SPLITS:
            metrics.update(evaluate_checkpoint(loaded, teacher_data, cfg.trainer, context.out_dir, split))
        metrics.update(params=sum(p.numel() for p in loaded.model.parameters()))
        write_json(context.out_dir / "metrics.json", {**metrics, "ckpt": ckpt})
        return with_profile(metrics, loaded), loaded

    def distil(context):
        teacher = context.output("teacher")
        return train(context, [distillation.AttachTeacher(teacher.model, settings)], same_as=context.metrics("student"))

    stages = [Stage("teacher", score_loaded_teacher if loaded else train, config=configs["teacher"],
                    params={"ckpt": ckpt} if loaded else {}, label="teacher",
                    title=f"teacher: {teacher_model['name']}" + (f" (from {ckpt})" if loaded else ""),
                    restore=(lambda _context: loaded) if loaded else None)]
    if cfg.distill.baseline:
        stages.append(Stage("student", train, config=configs["student"], label="student alone",
                            title=f"student alone (hard labels): {student_model['name']}"))
    stages.append(Stage("student_kd", distil, needs=("teacher",), config=configs["student_kd"],
                        params=asdict(settings), label="student with KD",
                        title=f"student with KD ({settings.kind}, T={settings.temperature:g}, "
                              f"alpha={settings.alpha:g})"))
    results = run_stages(stages, out, COLUMNS, title=f"knowledge distillation ({settings.kind}, "
                                                     f"T={settings.temperature:g}, alpha={settings.alpha:g})")

    rows = [{"stage": name, **{key: result.metrics.get(key) for key in ROW_KEYS}, "run_dir": name}
            for name, result in results.items()]
    kd = results["student_kd"].metrics
    gain = kd["test/acc"] - results["student"].metrics["test/acc"] if "student" in results else None
    write_json(out / "distill.json", {
        "kind": settings.kind, "temperature": settings.temperature, "alpha": settings.alpha,
        "train_fraction": float(cfg.distill.train_fraction),
        **({"labeled_fraction": float(cfg.distill.labeled_fraction)} if settings.kind == "semi_supervised" else {}),
        "data": str(cfg.data.name), "seed": int(cfg.seed), "teacher_ckpt": ckpt,
        "rows": rows, "kd_gain": gain, "kd_gain_split": "test",
        "latency": {"batch": 1, "threads": LATENCY_THREADS, "runs": runs, "warmup": LATENCY_WARMUP,
                    "statistic": "median"},
    })
    metrics = {**kd, **{f"{name}/{split}/acc": result.metrics[f"{split}/acc"] for name, result in results.items()
                        if name != "student_kd" for split in SPLITS}}
    if gain is not None:
        metrics["kd_gain"] = gain
    write_json(out / "metrics.json", metrics)
    if gain is not None:
        console.print(f"KD gain over the student alone: {gain * 100:+.2f} test accuracy points", highlight=False)
    console.print(f"CPU latency: median of batch-1 forward passes on {LATENCY_THREADS} thread(s); FLOPs count a "
                  "multiply-add as 2.", style="dim")
    say_run_dir(out, "end")
    return metrics, {**{name: result.output for name, result in results.items()}, "table": rows}


@hydra.main(version_base="1.3", config_path="../conf", config_name="distill")
def main(cfg: DictConfig):
    OmegaConf.set_readonly(cfg, False)
    return run_guarded(run_distill, cfg)


if __name__ == "__main__":
    main()
