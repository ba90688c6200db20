"""Training and evaluation runs: fit, choose the best checkpoint on the validation split, report it on the test
split; evaluate a checkpoint on one split; write the run's json, plots and tables."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from cvlab.engine.builders import build_datamodule, build_task, build_trainer, quiet_trainer
from cvlab.engine.checkpoints import check_checkpoint
from cvlab.engine.runs import output_dir, quiet_lightning, say_run_dir, write_json
from cvlab.utils.console import config_tree, console, split_metrics_table


def _floats(scores: dict) -> dict:
    return {key: float(value) for key, value in scores.items()}


def evaluate(trainer, task, datamodule, split: str, ckpt_path: str | None = None) -> dict:
    """One pass of ``task`` over ``split`` (val or test) of ``datamodule``: {"<split>/<metric>": float}."""
    run = trainer.validate if split == "val" else trainer.test
    return _floats(run(task, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0])


# Multi-stage methods that `cvlab train` runs instead of one fit, by the name in a model config's ``pipeline``
# (``model=rcnn``: :mod:`cvlab.engine.rcnn`), a ``strategy`` option's name (``strategy=easy_ensemble``:
# :mod:`cvlab.engine.ensembles`) or, for ``sampler.space=features``, :data:`FEATURE_PIPELINE`
# (:mod:`cvlab.engine.feature_resampling`); each registers itself with :func:`register_pipeline`.
PIPELINES: dict[str, Callable[[DictConfig], tuple[dict, dict]]] = {}
FEATURE_PIPELINE = "feature_resampling"


def register_pipeline(name: str):
    """Function decorator: ``run(cfg) -> (metrics, objects)`` is what `cvlab train` runs for a model whose config
    has ``pipeline: {name: <name>, ...}``."""

    def wrap(run: Callable[[DictConfig], tuple[dict, dict]]):
        if name in PIPELINES:
            raise ValueError(f"pipeline {name!r} is registered twice")
        PIPELINES[name] = run
        return run

    return wrap


def resamples_embeddings(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s sampler resamples embeddings (``sampler.space=features``), a pipeline of `cvlab train`."""
    from cvlab.data.imbalance import resamples_features
    from cvlab.utils.plugins import plain_config

    return resamples_features(plain_config(cfg.get("sampler")))


def pipeline_of(cfg: DictConfig) -> tuple[str, str] | None:
    """The multi-stage method ``cfg`` runs instead of one fit, as ``(setting, name)``: its model's
    ``model.pipeline.name``, its ``strategy`` (``strategy.name`` other than none) or a sampler that resamples
    embeddings (``sampler.space=features``: :mod:`cvlab.engine.feature_resampling`); None for one fit."""
    from cvlab.utils.errors import UserError

    strategy = cfg.get("strategy")
    strategy = str(strategy.get("name", "none")) if strategy is not None else "none"
    if cfg.model.get("pipeline"):
        if strategy != "none":
            raise UserError(f"model={cfg.model.name} is a pipeline of its own; strategy={strategy} ensembles single "
                            "classifiers. Leave strategy=none.")
        return "model.pipeline.name", str(cfg.model.pipeline.get("name"))
    if strategy != "none":
        return "strategy", strategy
    return ("sampler.space", FEATURE_PIPELINE) if resamples_embeddings(cfg) else None


def run_pipeline(cfg: DictConfig, extra_callbacks=()) -> tuple[dict, dict]:
    """Runs the registered pipeline that ``cfg`` names (:func:`pipeline_of`; its stages are their own fits)."""
    from cvlab.utils.errors import UserError, suggest

    setting, name = pipeline_of(cfg)
    if name not in PIPELINES:
        raise UserError(f"{setting}={name!r} is no pipeline.{suggest(name, PIPELINES)} Pipelines: "
                        f"{', '.join(sorted(PIPELINES))}.")
    if extra_callbacks:
        chosen = {"strategy": f"strategy={name}", "sampler.space": "sampler.space=features"}.get(
            setting, f"model={cfg.model.name}")
        raise UserError(f"{chosen} trains as separate stages ({name}), which take no extra training callbacks "
                        "(cvlab tune prunes single fits only).")
    return PIPELINES[name](cfg)


def run_train(cfg: DictConfig, extra_callbacks=()) -> tuple[dict, dict]:
    """Trains per ``cfg``; the best checkpoint on val is then scored on val and test. Returns (final metrics,
    {"task", "datamodule", "trainer"}); the task holds the best checkpoint's weights. A model whose config names a
    ``pipeline`` (R-CNN), or a ``strategy`` (EasyEnsemble, BalanceCascade), runs that pipeline's stages instead
    (:func:`run_pipeline`)."""
    import pytorch_lightning as pl

    if pipeline_of(cfg):
        return run_pipeline(cfg, extra_callbacks)
    quiet_lightning()
    out = output_dir(cfg)
    say_run_dir(out, "start")
    resume = Path(str(cfg.resume)).expanduser() if cfg.resume else None
    if resume is not None:
        say_resume(resume, out)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    console.print(config_tree(cfg))
    task = build_task(cfg, datamodule)
    trainer = build_trainer(cfg, extra_callbacks)
    if trainer.is_global_zero and datamodule.write_split_files(out / "splits"):
        console.print(f"split file lists: {out / 'splits'}/{{train,val,test}}.txt", highlight=False)

    started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    train_time = time.perf_counter() - started

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    strip_best_checkpoint(trainer)
    metrics = evaluate(trainer, task, datamodule, "val", ckpt_path=best or None)  # scores the stripped file
    metrics.update(evaluate(trainer, task, datamodule, "test"))  # the weights validate() just loaded
    metrics.update(epochs=trainer.current_epoch, train_time_s=round(train_time, 2),
                   params=sum(p.numel() for p in task.model.parameters()))
    for logger in trainer.loggers:  # the two evaluations logged val/ and test/; the rest of metrics.json joins them
        logger.log_metrics({key: metrics[key] for key in ("epochs", "train_time_s", "params")}, trainer.global_step)
        logger.finalize("success")
    if trainer.is_global_zero:
        finish_run(task, out, "metrics.json", metrics, title=f"{cfg.model.name} on {cfg.data.name} (best checkpoint "
                   "on val)", extra={"best_ckpt": best})
    return metrics, {"task": task, "datamodule": datamodule, "trainer": trainer}


def strip_best_checkpoint(trainer) -> None:
    """Once fitting is over the best checkpoint is final: it keeps only the weights and what restoring the task
    needs (:func:`~cvlab.callbacks.checkpoint.keep_weights_only`); last.ckpt keeps the state a resume needs. A
    checkpoint callback without a monitor names the latest file as its best, which stays whole."""
    from cvlab.callbacks.checkpoint import keep_weights_only

    callback = trainer.checkpoint_callback
    if callback is None or not callback.monitor or not callback.best_model_path:
        return
    if trainer.is_global_zero:
        keep_weights_only(Path(callback.best_model_path), callback.monitor, callback.mode, callback.best_model_score,
                          records=trainer.lightning_module.checkpoint_records)
    trainer.strategy.barrier("best checkpoint stripped")  # other ranks read it next


def say_resume(ckpt: Path, out: Path) -> None:
    """One line on where a resumed run writes (a UserError if ``ckpt`` is not a file or not a cvlab checkpoint, or
    holds only weights)."""
    check_checkpoint(ckpt, "resume checkpoint", "last.ckpt", resume=True)
    if ckpt.resolve().is_relative_to(out.resolve()):
        console.print(f"resuming {ckpt}: continuing in its run directory (results.csv, best.ckpt and its score carry "
                      "on)", highlight=False)
    else:
        console.print(f"resuming {ckpt}: writing to {out}, outside the checkpoint's run directory (best.ckpt and its "
                      "score are carried over, results.csv starts anew)", highlight=False)


def evaluate_checkpoint(task, datamodule, trainer_cfg: DictConfig, out: Path, split: str) -> dict:
    """One quiet pass of a restored ``task`` over ``split`` of ``datamodule``."""
    return evaluate(quiet_trainer(trainer_cfg, out), task, datamodule, split)


def finish_run(task, out: Path, json_name: str, metrics: dict, title: str, extra: dict | None = None) -> None:
    """The end of a train or eval run: the task's report (plots, its tables, per-class figures), ``json_name``
    (the metrics, ``extra`` and the per-class figures), the metrics table and the run directory."""
    out.mkdir(parents=True, exist_ok=True)
    per_class = task.report(out)
    write_json(out / json_name, {**metrics, **(extra or {}), **per_class})
    console.print(split_metrics_table(metrics, title=title))
    say_run_dir(out, "end")
