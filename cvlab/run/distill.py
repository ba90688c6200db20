"""`cvlab distill teacher=resnet50 student=mobilenetv2`: the two steps of knowledge distillation, plus the baseline.

1. Net-T: train the teacher (``run_train`` with the teacher's config), or load it with ``teacher.ckpt=PATH``.
2. The student alone on hard labels (``distill.baseline``), then the student taught by the frozen teacher at
   temperature T (``run_train`` with ``DistillationTask``); same data, budget and seed for both.

Every stage is an ordinary training run in its own folder of the distillation run (teacher/, student/,
student_kd/: weights/, results.csv, metrics.json, plots). The run ends with one table (teacher / student alone /
student with KD: accuracy, parameters, FLOPs, CPU latency per image), printed and written to distill.json; the
run's metrics.json holds the distilled student's metrics (the sweep leaderboard ranks by them) and the other two
stages' accuracy.
"""
from __future__ import annotations

import copy
import functools
import statistics
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.run.common import output_dir, quiet_lightning, run_guarded, say_run_dir, to_plain, write_json
from cvlab.utils.console import console
from cvlab.utils.errors import UserError

STAGES = ("teacher", "student", "student_kd")
LATENCY_WARMUP = 5
LATENCY_THREADS = 1  # per-image latency of one core: comparable across machines, little disturbed by other jobs


@functools.lru_cache(maxsize=8)
def _checkpoint_model_name(path: str) -> str | None:
    """The architecture a cvlab checkpoint holds (None when the file is missing or not a cvlab checkpoint)."""
    import torch

    try:
        checkpoint = torch.load(Path(path).expanduser(), map_location="cpu", mmap=True, weights_only=False)
        return str(checkpoint["hyper_parameters"]["model"]["name"])
    except Exception:  # any unreadable file: run_distill reports it properly, this only names the run directory
        return None


def distill_pair(teacher: str, student: str, teacher_ckpt: str | None, kind: str) -> str:
    """The run directory's name, <teacher>-to-<student>, as they will really be (a checkpoint names its own
    architecture; born-again distillation gives the student the teacher's)."""
    if teacher_ckpt:
        teacher = _checkpoint_model_name(str(teacher_ckpt)) or teacher
    return f"{teacher}-to-{teacher if kind == 'self' else student}"


if not OmegaConf.has_resolver("cvlab.distill_pair"):
    OmegaConf.register_new_resolver("cvlab.distill_pair", distill_pair)


def settings_of(cfg: DictConfig):
    from cvlab.tasks.distillation import DistillationSettings

    node = cfg.distill
    return DistillationSettings(kind=str(node.kind), temperature=float(node.temperature), alpha=float(node.alpha),
                                hint_weight=float(node.hint_weight), hint_layers=to_plain(node.hint_layers))


def _model_node(node) -> dict:
    """A teacher/student config as a plain model config (``ckpt`` says where weights come from, not what to build)."""
    return {key: value for key, value in to_plain(node).items() if key != "ckpt"}


def _data_node(cfg: DictConfig, stage: str) -> dict:
    """The stage's data: the run's data, cut to distill.train_fraction and, for semi-supervised distillation, to
    the labeled images (teacher, baseline) or with the other labels hidden (the distilled student)."""
    node = to_plain(cfg.data)
    semi = cfg.distill.kind == "semi_supervised"
    if cfg.distill.train_fraction >= 1 and not semi:
        return node
    return {**node, "_target_": "cvlab.tasks.distillation.LabelBudgetDataModule",
            "train_fraction": float(cfg.distill.train_fraction),
            "labeled_fraction": float(cfg.distill.labeled_fraction) if semi else 1.0,
            "unlabeled": "hide" if semi and stage == "student_kd" else "drop"}


def stage_config(cfg: DictConfig, stage: str, model: dict) -> DictConfig:
    """A train config for one stage: the run's groups, ``model``, the stage's data and folder."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("teacher", "student", "distill"):
        plain.pop(key)
    plain.update(model=model, data=_data_node(cfg, stage), resume=None)
    plain["paths"]["output_dir"] = str(output_dir(cfg) / stage)
    if stage == "student_kd":
        plain["task"]["_target_"] = "cvlab.tasks.distillation.DistillationTask"
    return OmegaConf.create(plain)


def load_teacher(path: str, info: dict, data_name: str):
    """The teacher task of a cvlab checkpoint, checked against the data (classes and input size must agree)."""
    from cvlab.run.eval import restore_task
    from cvlab.tasks.classification import ClassificationTask

    ckpt = Path(str(path)).expanduser()
    task = restore_task(ckpt, "teacher.ckpt", "best.ckpt")
    if not isinstance(task, ClassificationTask):
        raise UserError(f"teacher.ckpt {str(ckpt)!r} holds a {type(task).__name__}; a teacher must be a classifier.")
    trained = task.hparams.data_info
    keys = ("num_classes", "in_chans", "image_size")
    if any(trained[key] != info[key] for key in keys) or list(trained["class_names"]) != list(info["class_names"]):
        raise UserError(f"teacher.ckpt was trained on {_shape(trained)} but data {data_name!r} has {_shape(info)}; "
                        "teacher and student must agree on classes and input size.")
    return task


def _shape(info: dict) -> str:
    return f"{info['num_classes']} classes at {info['in_chans']}x{info['image_size']}x{info['image_size']}"


def check_hint_layers(teacher_model: dict | None, teacher, student_model: dict, cfg: DictConfig, info: dict) -> None:
    """Resolves the FitNets layers on the two architectures before any training, so a wrong name costs nothing."""
    from cvlab.tasks.base import build_model
    from cvlab.tasks.distillation import hint_layer

    def build(model: dict):
        return build_model(model, to_plain(cfg.norm), to_plain(cfg.activation), to_plain(cfg.attention),
                           {"name": "default"}, num_classes=info["num_classes"], in_chans=info["in_chans"],
                           img_size=info["image_size"])

    layers = cfg.distill.hint_layers
    size = (info["in_chans"], info["image_size"])
    hint_layer(teacher if teacher is not None else build(teacher_model), layers.teacher, *size, role="teacher")
    hint_layer(build(student_model), layers.student, *size, role="student")


def cpu_profile(model, in_chans: int, image_size: int, runs: int) -> dict:
    """Parameters, FLOPs (one image) and CPU latency per image: the median of ``runs`` timed batch-1 forward passes
    on LATENCY_THREADS threads, after LATENCY_WARMUP untimed ones."""
    import torch

    from cvlab.run.info import describe_model

    model = copy.deepcopy(model).cpu()
    params, flops, _ = describe_model(model, in_chans, image_size)  # leaves the copy in eval mode
    image = torch.zeros(1, in_chans, image_size, image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.inference_mode():
            for _ in range(LATENCY_WARMUP):
                model(image)
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                model(image)
                timings.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {"params": params, "flops": flops, "cpu_latency_ms": statistics.median(timings) * 1e3}


def validate_loaded_teacher(task, cfg: DictConfig, datamodule, out: Path, ckpt: str) -> dict:
    """Stage 1 for a given checkpoint: the teacher's scores on this run's validation split, in teacher/metrics.json."""
    from cvlab.run.eval import validate_task

    metrics = validate_task(task, datamodule, cfg.trainer, out)
    metrics.update(params=sum(p.numel() for p in task.model.parameters()))
    write_json(out / "metrics.json", {**metrics, "ckpt": str(Path(ckpt).expanduser())})
    return metrics


def run_distill(cfg: DictConfig) -> tuple[dict, dict]:
    """Runs the stages per ``cfg`` (see the module docstring); returns (the distilled student's metrics plus the
    other stages' accuracy, {"teacher", "student", "student_kd": the tasks, "table": the rows})."""
    from hydra.utils import instantiate

    from cvlab.run.train import build_datamodule, run_train
    from cvlab.tasks.distillation import AttachTeacher

    quiet_lightning()
    out = output_dir(cfg)
    say_run_dir(out, "start")
    settings = settings_of(cfg)
    teacher_model = _model_node(cfg.teacher)
    ckpt = cfg.teacher.ckpt

    # Everything that can be wrong is checked before the first step of training.
    teacher_data = build_datamodule(stage_config(cfg, "teacher", teacher_model))
    info = teacher_data.info
    loaded = load_teacher(ckpt, info, cfg.data.name) if ckpt else None
    if loaded is not None:
        teacher_model = dict(loaded.hparams.model)
    student_model = dict(teacher_model) if settings.kind == "self" else _model_node(cfg.student)
    instantiate(stage_config(cfg, "student_kd", student_model).data, sampler=cfg.sampler.name, seed=cfg.seed)
    if settings.kind == "feature":
        check_hint_layers(teacher_model, loaded.model if loaded else None, student_model, cfg, info)

    tasks, results = {}, {}
    console.rule(f"[bold]1/3 teacher: {teacher_model['name']}" + (f" (from {ckpt})" if loaded else ""))
    if loaded is None:
        results["teacher"], objects = run_train(stage_config(cfg, "teacher", teacher_model))
        tasks["teacher"] = objects["task"]  # holds the best checkpoint's weights (run_train validated it)
    else:
        tasks["teacher"] = loaded
        results["teacher"] = validate_loaded_teacher(loaded, cfg, teacher_data, out / "teacher", ckpt)
    if cfg.distill.baseline:
        console.rule(f"[bold]2/3 student alone (hard labels): {student_model['name']}")
        results["student"], objects = run_train(stage_config(cfg, "student", student_model))
        tasks["student"] = objects["task"]
    console.rule(f"[bold]3/3 student with KD ({settings.kind}, T={settings.temperature:g}, alpha={settings.alpha:g})")
    results["student_kd"], objects = run_train(stage_config(cfg, "student_kd", student_model),
                                               extra_callbacks=[AttachTeacher(tasks["teacher"].model, settings)])
    tasks["student_kd"] = objects["task"]

    table = comparison(cfg, tasks, results, info)
    gain = (results["student_kd"]["val/acc"] - results["student"]["val/acc"]) if "student" in results else None
    write_json(out / "distill.json", {
        "kind": settings.kind, "temperature": settings.temperature, "alpha": settings.alpha,
        "train_fraction": float(cfg.distill.train_fraction),
        **({"labeled_fraction": float(cfg.distill.labeled_fraction)} if settings.kind == "semi_supervised" else {}),
        "data": str(cfg.data.name), "seed": int(cfg.seed), "teacher_ckpt": str(ckpt) if ckpt else None,
        "rows": table, "kd_gain": gain,
        "latency": {"batch": 1, "threads": LATENCY_THREADS, "runs": int(cfg.distill.latency_runs),
                    "warmup": LATENCY_WARMUP, "statistic": "median"},
    })
    metrics = {**results["student_kd"], **{f"{stage}/val/acc": results[stage]["val/acc"] for stage in results
                                           if stage != "student_kd"}}
    if gain is not None:
        metrics["kd_gain"] = gain
    write_json(out / "metrics.json", metrics)
    print_comparison(table, gain, settings)
    say_run_dir(out, "end")
    return metrics, {**tasks, "table": table}


def comparison(cfg: DictConfig, tasks: dict, results: dict, info: dict) -> list[dict]:
    """One row per stage: its model, accuracy and cost. Both students share one architecture, profiled once."""
    runs = int(cfg.distill.latency_runs)
    profiles = {}
    rows = []
    for stage in STAGES:
        if stage not in tasks:
            continue
        model = tasks[stage].model
        name = tasks[stage].hparams.model["name"]
        key = "teacher" if stage == "teacher" else "student"
        if key not in profiles:
            profiles[key] = cpu_profile(model, info["in_chans"], info["image_size"], runs)
        rows.append({"stage": stage, "model": name, "val/acc": results[stage]["val/acc"],
                     "val/f1": results[stage].get("val/f1"), **profiles[key], "run_dir": stage})
    return rows


def print_comparison(rows: list[dict], gain: float | None, settings) -> None:
    from rich.table import Table

    labels = {"teacher": "teacher", "student": "student alone", "student_kd": "student with KD"}
    table = Table(title=f"knowledge distillation ({settings.kind}, T={settings.temperature:g}, "
                        f"alpha={settings.alpha:g})", title_justify="left")
    for column in ("", "model", "val/acc", "params", "MFLOPs", "CPU ms/image"):
        table.add_column(column, justify="left" if column in ("", "model") else "right")
    for row in rows:
        table.add_row(labels[row["stage"]], row["model"], f"{row['val/acc']:.4f}", f"{row['params']:,}",
                      f"{row['flops'] / 1e6:.2f}", f"{row['cpu_latency_ms']:.3f}")
    console.print(table)
    if gain is not None:
        console.print(f"KD gain over the student alone: {gain * 100:+.2f} accuracy points", highlight=False)
    console.print(f"CPU latency: median of batch-1 forward passes on {LATENCY_THREADS} thread(s); FLOPs count a "
                  "multiply-add as 2.", style="dim")


@hydra.main(version_base="1.3", config_path="../conf", config_name="distill")
def main(cfg: DictConfig):
    OmegaConf.set_readonly(cfg, False)
    return run_guarded(run_distill, cfg)


if __name__ == "__main__":
    main()
