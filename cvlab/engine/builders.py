"""Builders shared by train, eval, predict, distill and info: the datamodule, the task and the trainer from their
config groups."""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.engine.runs import output_dir
from cvlab.tasks.base import BaseTask, task_class, to_plain


def build_datamodule(cfg: DictConfig):
    """The datamodule of ``cfg.data`` with the run's sampler, set up (the data is read and checked now, before
    anything is built): ``data.seed`` cuts its splits (the run's seed unless given), the run's seed orders the
    training."""
    datamodule = instantiate_data(cfg.data, sampler=to_plain(cfg.get("sampler")), seed=cfg.data.get("seed", cfg.seed))
    datamodule.seed_order(cfg.seed)
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


def inference_device(setting: str = "auto"):
    """The ``torch.device`` a read-only pass runs on: ``setting`` as given (cpu, cuda, cuda:1, ...), or for
    ``auto`` a GPU when there is one (`cvlab predict` and `cvlab generate`'s ``device=``, an ensemble's members)."""
    import torch

    return torch.device(setting if setting != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def build_task(cfg: DictConfig, datamodule) -> BaseTask:
    """The registered task ``cfg.task.name``, built from the config and the (set up) datamodule."""
    return task_class(str(cfg.task.name)).from_config(cfg, datamodule)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiates every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


# Loggers whose package comes in an extra of cvlab: {key in the logger group: (module, extra)}.
LOGGER_EXTRAS = {"mlflow": ("mlflow", "mlflow")}


def build_loggers(cfg: DictConfig) -> list:
    """The loggers of the ``logger`` group (``logger=[csv,tensorboard,mlflow]`` merges three options, each keyed by
    its name); one whose package is not installed is a UserError naming the extra that brings it."""
    import importlib.util

    from cvlab.utils.errors import UserError

    for name in cfg.get("logger") or {}:
        module, extra = LOGGER_EXTRAS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(f"logger={name} needs the {module} package: pip install 'cvlab[{extra}]'")
    return instantiate_dict(cfg.get("logger"))


def lightning_trainer_config(trainer_cfg: DictConfig) -> dict:
    """``trainer_cfg`` resolved, as the Lightning Trainer takes it: without the trainer keys that are cvlab's
    (:data:`~cvlab.tasks.base.EXECUTION_KEYS`: compile, channels_last, which the task reads), and with synchronised
    BatchNorm off on the CPU, where torch has none (``trainer=ddp trainer.accelerator=cpu``; a note says so)."""
    import torch
    from omegaconf import OmegaConf

    from cvlab.tasks.base import EXECUTION_KEYS

    trainer = OmegaConf.to_container(trainer_cfg, resolve=True)
    for key in EXECUTION_KEYS:
        trainer.pop(key, None)
    accelerator = str(trainer.get("accelerator", "auto"))
    if trainer.get("sync_batchnorm") and (accelerator == "cpu" or (accelerator == "auto"
                                                                   and not torch.cuda.is_available())):
        trainer["sync_batchnorm"] = False
        _note_on_main_process("trainer.sync_batchnorm is off on the CPU: torch synchronises BatchNorm on GPUs only, so "
                              "each process normalises its own batch (a norm that is not BatchNorm, e.g. norm=gn, "
                              "trains as one process with the global batch would)")
    return trainer


def _note_on_main_process(message: str) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    from cvlab.utils.console import console

    if rank_zero_only.rank == 0:
        console.print(message, style="dim", highlight=False)


def build_trainer(cfg: DictConfig, extra_callbacks=()):
    """The trainer of ``cfg.trainer`` (:func:`lightning_trainer_config`) with the run's loggers and callbacks;
    checkpoints are written atomically (:class:`~cvlab.callbacks.checkpoint.AtomicCheckpointIO`) unless
    ``trainer.plugins`` brings its own writer."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.plugins.io import CheckpointIO

    from cvlab.callbacks.checkpoint import AtomicCheckpointIO

    loggers = build_loggers(cfg)
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks)
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger; results.csv records lr anyway
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = instantiate(cfg.trainer.get("plugins"), _convert_="all") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return instantiate(lightning_trainer_config(cfg.trainer), callbacks=callbacks, logger=loggers or False,
                       plugins=plugins, default_root_dir=str(output_dir(cfg)), enable_model_summary=False)


def quiet_trainer(trainer_cfg: DictConfig, out):
    """A trainer for one evaluation pass: no logger, callbacks, summary or progress bar."""
    from hydra.utils import instantiate

    return instantiate(lightning_trainer_config(trainer_cfg), logger=False, callbacks=[], enable_model_summary=False,
                       enable_progress_bar=False, default_root_dir=str(out))


def checkpoint_datamodule(task: BaseTask, data_cfg: DictConfig | None, seed: int):
    """The data to evaluate a restored ``task`` on, set up: ``data_cfg`` when given (with ``seed``), else the
    checkpoint's own data config and seed (so its splits are the ones the training run cut), with what the model
    reads beside the images (:meth:`~cvlab.tasks.base.BaseTask.attach_inputs`). Refuses data whose classes or
    channels differ from the checkpoint's."""
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
    task.attach_inputs(datamodule)
    return datamodule
