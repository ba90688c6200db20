"""`cvlab train`: compose the groups, fit, validate the best checkpoint, write metrics.json and plots."""
from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.run.common import (
    instantiate_dict,
    output_dir,
    quiet_lightning,
    run_guarded,
    say_run_dir,
    to_plain,
    write_json,
)
from cvlab.utils.console import class_ap_table, config_tree, console, metrics_table
from cvlab.utils.errors import UserError, missing_checkpoint


def build_datamodule(cfg: DictConfig):
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, sampler=cfg.sampler.name, seed=cfg.seed)
    datamodule.info  # noqa: B018  (loads and checks the data now, before anything is built)
    return datamodule


def build_task(cfg: DictConfig, data_info: dict, train_set=None):
    """The task of ``cfg``; ``model.anchors=auto`` becomes k-means anchors of ``train_set``'s boxes (stored as such)."""
    from hydra.utils import get_class

    task_class = get_class(cfg.task._target_)
    groups = ("model", "optimizer", "scheduler", "loss", "norm", "activation", "attention", "init", "data")
    configs = {group: to_plain(cfg.get(group)) for group in groups}
    if configs["model"].get("anchors") == "auto":
        from cvlab.run.anchors import auto_anchors

        if train_set is None:
            raise UserError("model.anchors=auto needs the training set to cluster; give the anchors as a list")
        configs["model"]["anchors"] = auto_anchors(configs["model"], train_set, data_info, cfg.seed)
    return task_class(data_info=data_info, **configs)


def build_trainer(cfg: DictConfig, extra_callbacks=()):
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor

    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks)
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger; results.csv records lr anyway
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       default_root_dir=str(output_dir(cfg)), enable_model_summary=False)


def run_train(cfg: DictConfig, extra_callbacks=()) -> tuple[dict, dict]:
    """Trains per ``cfg``; returns (final metrics, {"task", "datamodule", "trainer"})."""
    import pytorch_lightning as pl

    quiet_lightning()
    out = output_dir(cfg)
    say_run_dir(out, "start")
    if cfg.resume and not Path(str(cfg.resume)).expanduser().is_file():
        raise missing_checkpoint("resume checkpoint", cfg.resume, "last.ckpt")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    console.print(config_tree(cfg))
    task = build_task(cfg, datamodule.info, getattr(datamodule, "train_set", None))
    trainer = build_trainer(cfg, extra_callbacks)

    started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(Path(str(cfg.resume)).expanduser()) if cfg.resume else None)
    train_time = time.perf_counter() - started

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    scores = trainer.validate(task, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    metrics = {key: float(value) for key, value in scores.items()}
    metrics.update(epochs=trainer.current_epoch, train_time_s=round(train_time, 2),
                   params=sum(p.numel() for p in task.model.parameters()))
    if trainer.is_global_zero:
        finish_run(task, out, "metrics.json", metrics, title=f"{cfg.model.name} on {cfg.data.name} (best checkpoint)",
                   extra={"best_ckpt": best})
    return metrics, {"task": task, "datamodule": datamodule, "trainer": trainer}


def finish_run(task, out: Path, json_name: str, metrics: dict, title: str, extra: dict | None = None) -> None:
    """The end of a train or eval run: ``json_name`` (the metrics, ``extra`` and detection's per-class AP), the
    plots, the tables on the console and the run directory."""
    report = getattr(task, "report", {})
    per_class = {key: report[key] for key in ("ap50_per_class", "ap_per_class") if key in report}
    write_json(out / json_name, {**metrics, **(extra or {}), **per_class})
    write_run_plots(task, out)
    console.print(metrics_table(metrics, title=title))
    if per_class:
        console.print(class_ap_table(per_class["ap50_per_class"], per_class["ap_per_class"]))
    say_run_dir(out, "end")


def write_run_plots(task, out: Path) -> None:
    from cvlab.utils.plots import plot_confusion_matrix, plot_curves, plot_pr_curves

    plot_curves(out / "results.csv", out / "curves.png")
    confusion = getattr(task, "confusion", None)
    if confusion is not None:
        plot_confusion_matrix(confusion.compute().cpu().numpy(), task.class_names, out / "confusion_matrix.png")
    report = getattr(task, "report", {})
    if report.get("pr_curves"):
        plot_pr_curves(report["pr_curves"], out / "pr_curves.png")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    OmegaConf.set_readonly(cfg, False)
    return run_guarded(run_train, cfg)


if __name__ == "__main__":
    main()
