"""Builders shared by train, eval, predict, distill and info: the datamodule, the task and the trainer from their
config groups."""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.engine.runs import output_dir
from cvlab.tasks.base import BaseTask, task_class, to_plain


def build_datamodule(cfg: DictConfig):
    """The datamodule of ``cfg.data`` with the run's sampler and seed, set up (the data is read and checked now,
    before anything is built)."""
    datamodule = instantiate_data(cfg.data, sampler=to_plain(cfg.get("sampler")), seed=cfg.seed)
    datamodule.setup()
    return datamodule


def instantiate_data(data_cfg, **kwargs):
    """``hydra.utils.instantiate`` of a data config; a UserError raised while building it stays one (Hydra wraps
    constructor errors in its own exception)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from cvlab.utils.errors import UserError

    try:
        return instantiate(data_cfg, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def build_task(cfg: DictConfig, datamodule) -> BaseTask:
    """The registered task ``cfg.task.name``, built from the config and the (set up) datamodule."""
    return task_class(str(cfg.task.name)).from_config(cfg, datamodule)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiates every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


def build_trainer(cfg: DictConfig, extra_callbacks=()):
    """The trainer of ``cfg.trainer`` with the run's loggers and callbacks; checkpoints are written atomically
    (:class:`~cvlab.callbacks.checkpoint.AtomicCheckpointIO`) unless ``trainer.plugins`` brings its own writer."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.plugins.io import CheckpointIO

    from cvlab.callbacks.checkpoint import AtomicCheckpointIO

    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks)
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger; results.csv records lr anyway
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = instantiate(cfg.trainer.get("plugins"), _convert_="all") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                       default_root_dir=str(output_dir(cfg)), enable_model_summary=False)


def quiet_trainer(trainer_cfg: DictConfig, out):
    """A trainer for one evaluation pass: no logger, callbacks, summary or progress bar."""
    from hydra.utils import instantiate

    return instantiate(trainer_cfg, logger=False, callbacks=[], enable_model_summary=False,
                       enable_progress_bar=False, default_root_dir=str(out))


def checkpoint_datamodule(task: BaseTask, data_cfg: DictConfig | None, seed: int):
    """The data to evaluate a restored ``task`` on, set up: ``data_cfg`` when given (with ``seed``), else the
    checkpoint's own data config and seed (so its splits are the ones the training run cut). Refuses data whose
    classes or channels differ from the checkpoint's."""
    from omegaconf import OmegaConf

    from cvlab.utils.errors import UserError

    if data_cfg is None:
        stored = dict(task.hparams.data or {})
        seed = stored.pop("seed", seed)
        data_cfg = OmegaConf.create(stored)
    datamodule = instantiate_data(data_cfg, seed=seed)
    datamodule.setup()
    info, expected = datamodule.info, task.data_info
    if info.num_classes != expected.num_classes or info.in_chans != expected.in_chans:
        raise UserError(f"data {data_cfg.name!r} has {info.num_classes} classes x {info.in_chans} channels but the "
                        f"checkpoint was trained on {expected.num_classes} x {expected.in_chans}.")
    return datamodule
