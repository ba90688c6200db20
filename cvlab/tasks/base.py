"""What every task module shares: building the model from its config and the norm/activation/attention/init groups,
the optimizer and scheduler from theirs, and a checkpoint that restores the whole task on its own."""
from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from cvlab.utils.schedules import PLAN_KEYS

# Keys of a model config that describe it rather than parameterise its constructor.
MODEL_META_KEYS = ("name", "task", "multiscale")


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


class BaseTask(pl.LightningModule):
    """Holds the group configs (plain dicts) as hyper-parameters, so ``load_from_checkpoint(path)`` alone rebuilds it."""

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

    def build_model(self, **data_kwargs) -> nn.Module:
        hp = self.hparams
        return build_model(
            hp.model,
            hp.norm or {"name": "default"},
            hp.activation or {"name": "default"},
            hp.attention or {"name": "none"},
            hp.init or {"name": "default"},
            **data_kwargs,
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.data_info["class_names"])

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        plan = self.hparams.scheduler or {}
        if not plan.get("scheduler"):
            return optimizer
        make_scheduler = instantiate(plan["scheduler"])
        wanted = inspect.signature(make_scheduler.func).parameters
        if "total_steps" in wanted and make_scheduler.keywords.get("total_steps") is None:
            make_scheduler.keywords["total_steps"] = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": make_scheduler(optimizer), "interval": plan.get("interval", "epoch")},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cvlab_task"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resume may raise trainer.max_epochs: keep the freshly planned schedule length, restore only progress.
        for state in checkpoint.get("lr_schedulers", []):
            for key in PLAN_KEYS:
                state.pop(key, None)


def load_task(path: str, map_location: str | torch.device = "cpu") -> BaseTask:
    """Restores any cvlab task from its checkpoint alone (the checkpoint names its own class)."""
    from hydra.utils import get_class

    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    task_class = get_class(checkpoint["cvlab_task"])
    return task_class.load_from_checkpoint(path, map_location=map_location)
