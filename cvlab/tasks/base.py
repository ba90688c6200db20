"""What every task shares: it builds itself from the config and the datamodule (:meth:`BaseTask.from_config`),
declares the config groups it reads, builds its model from the model/norm/activation/attention/init groups and its
optimizers from theirs, and saves checkpoints that restore the whole task on their own.

Tasks are registered by name (``@register_task("detection")``); a checkpoint names its task by that name, so
restoring one never imports a module the file names. :func:`load_task` reads a checkpoint without running anything
in it and refuses stored configs that name anything but cvlab's, torch.optim's or torch's loss classes
(:mod:`cvlab.utils.safety`).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cvlab.data.base import DataInfo
from cvlab.utils.errors import UserError, suggest
from cvlab.utils.safety import CheckpointError, RefusedCheckpoint, check_config, read_checkpoint
from cvlab.utils.schedules import PLAN_KEYS

# Keys of a model config that describe it rather than parameterise its constructor (adam_lr: the AdamW rate of the
# model's own recipe, read by conf/optimizer/adamw.yaml; pipeline: the stages that train it, R-CNN's; epochs: its
# default trainer.max_epochs, read by conf/trainer/default.yaml; ema, mosaic, mixup, close_mosaic: its recipe's
# weight EMA and multi-image augmentation, the defaults of task.ema (conf/task/detection.yaml) and data.mosaic /
# data.mixup / data.close_mosaic).
MODEL_META_KEYS = ("name", "task", "multiscale", "adam_lr", "pipeline", "epochs", "ema", "mosaic", "mixup",
                   "close_mosaic", "norm_bias_decay")
# Keys of the trainer group that are cvlab's, not Lightning Trainer arguments: how a task runs its network
# (:meth:`BaseTask.set_execution`). The engine's trainer builder leaves them out.
EXECUTION_KEYS = ("compile", "channels_last")
CHANNELS_LAST_CHOICES = (True, False, "auto")

_TASKS: dict[str, type["BaseTask"]] = {}


def register_task(name: str):
    """Class decorator: registers a task under ``name`` (the ``task=`` option and the checkpoint's ``cvlab_task``)."""

    def wrap(cls: type["BaseTask"]) -> type["BaseTask"]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return wrap


def task_names() -> list[str]:
    import cvlab.tasks  # noqa: F401  (importing the package registers every task module)

    return sorted(_TASKS)


def task_class(name: str) -> type["BaseTask"]:
    """The registered task ``name``; a UserError with the close names otherwise."""
    names = task_names()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}.{suggest(name, names)} Tasks: {', '.join(names)}.")
    return _TASKS[name]


def to_plain(cfg) -> Any:
    """A config node as plain python (dicts, lists, scalars), resolved; None stays None."""
    if cfg is None or not OmegaConf.is_config(cfg):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)


def build_model(model: dict, norm: dict, activation: dict, attention: dict, init: dict, **data_kwargs) -> nn.Module:
    """Creates ``model["name"]`` with its config kwargs, the data's sizes and the chosen layer factories, then
    applies the ``init`` scheme (``default`` keeps the model's own, paper initialisation)."""
    from cvlab.layers.activation import get_act_layer
    from cvlab.layers.attention import get_attn_layer
    from cvlab.layers.init import get_init
    from cvlab.layers.norm import get_norm_layer
    from cvlab.models import create_model

    kwargs = {k: v for k, v in model.items() if k not in MODEL_META_KEYS}
    net = create_model(
        model["name"],
        norm_layer=get_norm_layer(**norm),
        act_layer=get_act_layer(**activation),
        attn_layer=get_attn_layer(**attention),
        **data_kwargs,
        **kwargs,
    )
    init_fn = get_init(**init)
    if init_fn is not None:
        init_fn(net)
    return net


def is_convolutional(net: nn.Module) -> bool:
    """Whether most of ``net``'s parameters are 2-D convolution weights (a CNN; a ViT's patch embedding is not)."""
    conv = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
    return 2 * conv > sum(p.numel() for p in net.parameters())


def channels_last_images(value: Any) -> Any:
    """A batch of images ``Tensor[N, C, H, W]`` (floating point) in the channels-last memory format; anything else
    (labels, targets) as it is."""
    if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class BaseTask(pl.LightningModule):
    """Holds the group configs (plain dicts) as hyper-parameters, so a checkpoint alone rebuilds it.

    Subclasses set ``groups`` (the config groups they read) and ``optimizer_groups`` (one optimizer per group; a GAN
    reads two), and override :meth:`resolve` for settings that depend on the data, :meth:`report` for their tables
    and plots, and :meth:`predict_images` for ``cvlab predict``.
    """

    name: ClassVar[str] = ""
    # The registered task of the models this task trains ("" = its own name; distillation trains classifiers).
    model_task: ClassVar[str] = ""
    groups: ClassVar[tuple[str, ...]] = ("model", "optimizer", "scheduler", "loss", "norm", "activation", "attention",
                                         "init", "data")
    optimizer_groups: ClassVar[tuple[str, ...]] = ("optimizer",)
    # Top-level checkpoint entries the task writes in on_save_checkpoint that a finished run's best.ckpt keeps.
    checkpoint_records: ClassVar[tuple[str, ...]] = ()
    # Whether `cvlab eval` and `cvlab predict` of a checkpoint run the inference model in its deployed form, fused by
    # its modules' fuse hooks as `cvlab export` writes it (:func:`cvlab.engine.checkpoints.restore_for_inference`).
    # Off: the network is evaluated as it trained (a task turns it on where the fused form is the one users deploy).
    fused_inference: ClassVar[bool] = False

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        loss: dict | None = None,
        norm: dict | None = None,
        activation: dict | None = None,
        attention: dict | None = None,
        init: dict | None = None,
        data_info: dict | None = None,
        data: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if data_info is None:
            raise ValueError("a task needs the data's DataInfo (data_info=DataInfo.as_dict()); build it with "
                             "Task.from_config(cfg, datamodule)")
        self.data_info = DataInfo.from_dict(data_info)
        self.set_execution()

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg, datamodule) -> "BaseTask":
        """The task of ``cfg`` for ``datamodule`` (set up): reads ``cls.groups``, checks that the model and loss
        belong to this task, resolves data-dependent settings (:meth:`resolve`)."""
        configs = {group: to_plain(cfg.get(group)) for group in cls.groups}
        cls.check_model(configs["model"]["name"])
        cls.check_plugin("loss", configs.get("loss"))
        if configs.get("data") is not None:
            # data.seed cuts the splits: a checkpoint re-creates the same test split from its own data config.
            configs["data"] = {"seed": int(cfg.seed), **configs["data"]}
        configs = cls.resolve(configs, datamodule, int(cfg.seed))
        task = cls(data_info=datamodule.info.as_dict(), **configs)
        trainer = cfg.get("trainer") or {}
        task.set_execution(**{key: trainer[key] for key in EXECUTION_KEYS if key in trainer})
        return task

    @classmethod
    def models(cls) -> list[str]:
        from cvlab.models import list_models

        return list_models(task=cls.model_task or cls.name)

    @classmethod
    def check_model(cls, name: str) -> None:
        from cvlab.models import model_task

        if model_task(name) != (cls.model_task or cls.name):
            raise UserError(f"model {name!r} is a {model_task(name)} model; task={cls.name} takes one of "
                            f"{', '.join(cls.models())}.")

    @classmethod
    def check_plugin(cls, group: str, cfg: dict | None) -> None:
        """A loss/sampler option that names its task (``task:`` in its yaml) must name this one."""
        if cfg and cfg.get("task") and cfg["task"] != (cls.model_task or cls.name):
            raise UserError(f"{group}={cfg.get('name', cfg.get('_target_'))} is a {cfg['task']} {group}; "
                            f"task={cls.name} cannot use it (`cvlab list {group}` shows the options).")

    @classmethod
    def resolve(cls, configs: dict, datamodule, seed: int) -> dict:
        """Settings that depend on the data, made concrete before the task is built (stored so in checkpoints)."""
        return configs

    def attach_inputs(self, datamodule) -> None:
        """Gives a datamodule built for a restored task (``cvlab eval``) what the model reads beside the images,
        as :meth:`resolve` did for training (R-CNN's proposals); nothing by default."""

    def build_model(self, **kwargs) -> nn.Module:
        hp = self.hparams
        return build_model(
            hp.model,
            hp.norm or {"name": "default"},
            hp.activation or {"name": "default"},
            hp.attention or {"name": "none"},
            hp.init or {"name": "default"},
            **kwargs,
        )

    def build_plugin(self, cfg: dict | None, **available):
        """A loss config instantiated with what it asks of the data (``num_classes``, ``class_counts``, ...);
        None for the default."""
        from cvlab.utils.plugins import instantiate_plugin

        return instantiate_plugin(cfg, **available)

    @property
    def class_names(self) -> list[str]:
        return list(self.data_info.class_names)

    @property
    def inference_model(self) -> nn.Module:
        """The network that evaluation, ``cvlab predict`` and ``cvlab export`` run: the model, unless the task keeps
        another copy of it for that (detection's weight EMA)."""
        return self.model

    # ------------------------------------------------------------------------------------------ execution
    def set_execution(self, compile: bool = False, channels_last: bool | str = "auto") -> None:
        """How the network runs in training and evaluation (``trainer.compile``, ``trainer.channels_last``; not
        hyper-parameters: a checkpoint restores the same weights either way).

        - ``compile``: ``torch.compile`` of the network in place (``nn.Module.compile``, so its state_dict keys,
          and the checkpoints, stay those of the eager network).
        - ``channels_last``: the network's weights, and the images it is given, in the channels-last memory
          format, which GPU convolutions (cuDNN, tensor cores) run fastest in. ``auto``: on for a convolutional network
          (most of its parameters in 2-D convolutions) on a GPU; true/false force it on any device.
        """
        if channels_last not in CHANNELS_LAST_CHOICES:
            raise UserError(f"trainer.channels_last is true, false or auto, got {channels_last!r}.")
        self._compile_network = bool(compile)
        self._channels_last = channels_last
        self._uses_channels_last = False
        self._network_compiled = False

    def configure_model(self) -> None:
        """Lightning's hook before the strategy moves the task to its device and wraps it (DDP): applies
        :meth:`set_execution`. Lightning calls it for every fit, validate and test; each part acts once."""
        device = self.trainer.strategy.root_device
        wanted = self._channels_last
        use = is_convolutional(self.model) and device.type == "cuda" if wanted == "auto" else bool(wanted)
        if use and not self._uses_channels_last:
            self.to(memory_format=torch.channels_last)
            # The images too, however the network is called (training, evaluation, predict; a separate inference
            # copy, detection's weight EMA, as well).
            for network in {id(net): net for net in (self.model, self.inference_model)}.values():
                network.register_forward_pre_hook(lambda network, inputs: tuple(map(channels_last_images, inputs)))
            self._uses_channels_last = True
        if self._compile_network and not self._network_compiled:
            self.model.compile()
            self._network_compiled = True

    # ------------------------------------------------------------------------------------------ optimisation
    def no_weight_decay_names(self) -> set[str]:
        """The task's parameter names the optimiser trains at weight decay 0: the model's ``no_weight_decay()``
        names (timm's hook: a set of the model's parameter names; YOLOv7's implicit layers, as its train.py's
        ``pg0``). A task may add its own."""
        hook = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in hook()} if hook is not None else set()

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's param groups: every trainable parameter in the first, at the optimizer option's settings,
        except :meth:`no_weight_decay_names`, which go in a second group, ``no_weight_decay``, at weight decay 0.
        Parameters that take no gradient (a weight EMA's copy, a frozen teacher) are in neither."""
        exempt = self.no_weight_decay_names()
        named = dict(self.named_parameters())
        unknown = sorted(exempt - set(named))
        if unknown:
            raise ValueError(f"{type(self.model).__name__}.no_weight_decay() names parameters it has not: {unknown}")
        trainable = {name: p for name, p in named.items() if p.requires_grad}
        groups = [{"params": [p for name, p in trainable.items() if name not in exempt]}]
        if exempt_trainable := sorted(exempt & trainable.keys()):
            groups.append({"name": "no_weight_decay", "params": [trainable[name] for name in exempt_trainable],
                           "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.optimizer_param_groups())
        plan = self.hparams.scheduler or {}
        if not plan.get("scheduler"):
            self._warn_about_training(optimizer)
            return optimizer
        make_scheduler = instantiate(plan["scheduler"])
        wanted = inspect.signature(make_scheduler.func).parameters
        if "total_steps" in wanted and make_scheduler.keywords.get("total_steps") is None:
            make_scheduler.keywords["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = make_scheduler(optimizer)  # sets each group's initial_lr, which the model's warnings read
        self._warn_about_training(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": plan.get("interval", "epoch")},
        }

    def _warn_about_training(self, optimizer: torch.optim.Optimizer) -> None:
        """Prints the model's own warnings about this optimiser (a model may know settings that train it poorly,
        e.g. ViT above its recipes' Adam rate), and one about per-channel norms on 1×1 maps (``norm=in`` on small
        images), once, on the main process."""
        if not self.trainer.is_global_zero:
            return
        from cvlab.layers.norm import single_pixel_instance_norms
        from cvlab.utils.console import print_warning

        model_warnings = getattr(self.model, "training_warnings", None)
        for line in model_warnings(optimizer) if model_warnings is not None else ():
            print_warning(line)
        info = self.data_info
        # two images: GroupNorm refuses a single value per group
        images = torch.zeros(2, info.in_chans, info.image_size, info.image_size, device=self.device)
        degenerate = single_pixel_instance_norms(self.model, images)
        if degenerate:
            shown = ", ".join(degenerate[:3]) + (f" and {len(degenerate) - 3} more" if len(degenerate) > 3 else "")
            print_warning(f"{shown}: per-channel norm layers that see 1×1 maps at data.image_size={info.image_size}; "
                          "a norm there outputs its bias alone, so the model cannot learn. Use norm=bn, gn or ln "
                          "there, or a larger data.image_size.")

    # ------------------------------------------------------------------------------------------ val and test
    # Validation (checkpoint selection) and test (the reported figures) are the same pass over a split: a task
    # defines _evaluate_batch(batch, batch_idx, split) and _log_evaluation(split), and these hooks route both to them.
    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # ------------------------------------------------------------------------------------------ reporting
    def on_test_end(self) -> None:
        """Computes every metric that still holds updates (a confusion matrix), on every process. :meth:`report`
        runs on the main process alone, where a torchmetrics compute would wait forever for the others to
        synchronise; after this it reads torchmetrics' cached, synchronised result."""
        from torchmetrics import Metric

        for metric in self.modules():
            if isinstance(metric, Metric) and metric.update_count:
                metric.compute()

    def report(self, out: Path) -> dict:
        """Writes the task's plots into ``out`` and prints its tables after the final evaluation; returns the
        per-class figures to store beside the metrics (json-ready)."""
        from cvlab.utils.plots import plot_curves

        plot_curves(out / "results.csv", out / "curves.png")
        return {}

    @classmethod
    def predict_images(cls, runner, paths: list[Path], names: list[Path], out: Path,
                       settings: dict) -> tuple[list[dict], dict[str, int], str, str]:
        """``cvlab predict``: runs each image through ``runner``, writes a drawn copy of it at ``out / name`` and
        returns (json records, count per class, what the counts count, the table's title).

        ``runner`` is a checkpoint's task or an exported graph behind one interface
        (:class:`cvlab.engine.export.CheckpointRunner`): ``info``, ``data``, ``transform``, ``postprocess`` and
        ``runner(batch) -> predict_step's output``; so a graph's predictions are drawn and saved by this same code."""
        raise UserError(f"cvlab predict does not support {cls.name} checkpoints yet.")

    def generate_images(self, out: Path, n: int, seed: int, **settings) -> dict:
        """``cvlab generate``: writes ``n`` images generated from ``seed`` into ``out`` and returns their json record;
        only a generation task has a generator."""
        raise UserError(f"cvlab generate samples a generation checkpoint; this one holds a {self.name} task.")

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def hyper_parameter_names(cls) -> set[str]:
        """The names a checkpoint's hyper-parameters may hold: the named arguments of every ``__init__`` from this
        class up to BaseTask (subclasses pass theirs on with ``*args, **kwargs``)."""
        names = set()
        for klass in cls.__mro__:
            if issubclass(klass, BaseTask) and "__init__" in vars(klass):
                names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        return names

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cvlab_task"] = self.name

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning's own reads (a resume, validate(ckpt_path=...)) end here too: a checkpoint of another task is one
        # line, not a state_dict mismatch.
        if "cvlab_task" in checkpoint and registered_task_name(checkpoint["cvlab_task"]) != self.name:
            path = getattr(self._trainer, "ckpt_path", None)
            raise UserError(f"checkpoint {str(path)!r} holds a {checkpoint['cvlab_task']!r} task; this run's task "
                            f"is {self.name}.")
        # A resume may raise trainer.max_epochs: keep the freshly planned schedule length, restore only progress.
        for state in checkpoint.get("lr_schedulers", []):
            for key in PLAN_KEYS:
                state.pop(key, None)


def registered_task_name(stored: Any) -> str | None:
    """The registered task that a checkpoint's ``cvlab_task`` names, or None; nothing is imported by that name.

    Checkpoints written before tasks were registered by name hold "cvlab.tasks.<module>.<Class>": such a name counts
    only as the exact qualified name of a registered class."""
    if not isinstance(stored, str):
        return None
    if stored in task_names():
        return stored
    return {f"{cls.__module__}.{cls.__qualname__}": name for name, cls in _TASKS.items()}.get(stored)


def checked_task_class(checkpoint: dict) -> type[BaseTask]:
    """The task class that ``checkpoint`` (read by :func:`cvlab.utils.safety.read_checkpoint`) restores, once
    everything the task would be built from has been checked: its ``cvlab_task`` is a registered task, its
    hyper-parameters are that task's arguments, every stored config is data whose targets are on the allowlist
    (:func:`cvlab.utils.safety.check_config`), and its model and loss belong to the task.

    Raises a :class:`~cvlab.utils.safety.CheckpointError` (a RefusedCheckpoint for what cvlab refuses to build)."""
    stored = checkpoint.get("cvlab_task")
    if stored is None:
        raise CheckpointError("it names no cvlab task (no cvlab_task entry: it was not written by a cvlab run).")
    name = registered_task_name(stored)
    if name is None:
        raise RefusedCheckpoint(f"it names the task {stored!r}, which is no registered task ({', '.join(task_names())}"
                                "); nothing was imported.")
    cls = _TASKS[name]
    hparams = checkpoint["hyper_parameters"]
    unknown = sorted(map(str, set(hparams) - cls.hyper_parameter_names()))
    if unknown:
        raise RefusedCheckpoint(f"its hyper-parameters hold {', '.join(unknown)}, which a {name} task does not take.")
    for group, cfg in hparams.items():
        if group == "data_info":  # the data's description, read by DataInfo.from_dict, never instantiated
            continue
        if cfg is not None and not isinstance(cfg, dict):
            raise CheckpointError(f"its {group} config is a {type(cfg).__name__}, not a config.")
        check_config(cfg, group)
    model = hparams.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise CheckpointError("its hyper-parameters name no model.")
    try:
        cls.check_model(model["name"])
        cls.check_plugin("loss", hparams.get("loss"))
    except UserError as error:
        raise RefusedCheckpoint(str(error).rstrip(".") + ".") from None
    return cls


def load_task(path: str | Path, map_location: str | torch.device = "cpu") -> BaseTask:
    """Restores any cvlab task from its checkpoint alone (the checkpoint names its registered task).

    The file is read once, without running anything in it (:func:`cvlab.utils.safety.read_checkpoint`), checked
    (:func:`checked_task_class`), and the task is built from exactly what was checked. Raises a
    :class:`~cvlab.utils.safety.CheckpointError` for a file that is refused.
    """
    checkpoint = read_checkpoint(path, map_location)
    task = checked_task_class(checkpoint)(**checkpoint["hyper_parameters"])
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])
    weights = next(iter(checkpoint["state_dict"].values()), None)
    return task.to(weights.device) if weights is not None else task
