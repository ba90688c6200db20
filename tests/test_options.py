"""Every option of every config group composes, and the trainable ones train one step on digits and visibly take
effect (the right layer, optimizer, schedule, sampler or loss is in place)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.run.train import run_train
from cvlab.utils.config import check_overrides, groups, options

ONE_STEP = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "~callbacks.model_checkpoint",
            "~callbacks.last_checkpoint", "trainer.enable_checkpointing=false"]

# What each option must put into the model / trainer.
LAYER_OF = {
    ("norm", "bn"): "BatchNorm2d", ("norm", "ln"): "GroupNorm", ("norm", "in"): "GroupNorm",
    ("norm", "gn"): "GroupNorm", ("norm", "sn"): "SwitchableNorm2d",
    ("activation", "sigmoid"): "Sigmoid", ("activation", "tanh"): "Tanh", ("activation", "relu"): "ReLU",
    ("activation", "leaky_relu"): "LeakyReLU", ("activation", "elu"): "ELU", ("activation", "prelu"): "PReLU",
    ("activation", "swish"): "Swish", ("activation", "mish"): "Mish", ("activation", "gelu"): "GELU",
    ("activation", "gelu_tanh"): "GELU",
    ("attention", "se"): "SqueezeExcite", ("attention", "sk"): "SelectiveKernel", ("attention", "cbam"): "CBAM",
    ("attention", "nonlocal"): "NonLocal", ("attention", "self_attention"): "SelfAttention2d",
    ("attention", "danet"): "DualAttention",
}
TRAINABLE_GROUPS = ("norm", "activation", "init", "attention", "optimizer", "scheduler", "loss", "sampler", "logger")
CASES = [(group, option) for group in TRAINABLE_GROUPS for option in options(group)]


def _module_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_trains_one_step_and_takes_effect(train_cfg, tmp_path, group, option):
    cfg = train_cfg(f"{group}={option}", *ONE_STEP)
    metrics, built = run_train(cfg)
    task, trainer = built["task"], built["trainer"]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    types = _module_types(task.model)
    if (group, option) in LAYER_OF:
        assert LAYER_OF[group, option] in types
    if group == "norm" and option not in ("bn", "default"):
        assert "BatchNorm2d" not in types
    if group == "norm" and option == "none":
        assert not types & {"BatchNorm2d", "GroupNorm", "SwitchableNorm2d"}
    if group == "activation" and option not in ("relu", "default"):
        assert "ReLU" not in types
    if group == "optimizer":
        expected = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad",
                    "adadelta": "Adadelta", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW"}[option]
        optimizer = trainer.optimizers[0]
        assert type(optimizer).__name__ == expected
        assert optimizer.param_groups[0].get("nesterov", False) == (option == "nesterov")
        assert optimizer.param_groups[0].get("momentum", 0) == (0.9 if option in ("momentum", "nesterov") else
                                                                optimizer.param_groups[0].get("momentum", 0))
    if group == "scheduler":
        configs = trainer.lr_scheduler_configs
        assert (len(configs) == 0) == (option == "none")
        if configs:
            expected = {"step": "StepLR", "cosine": "WarmupCosineLR", "onecycle": "OneCycleLR",
                        "warmup_cosine": "WarmupCosineLR"}[option]
            assert type(configs[0].scheduler).__name__ == expected
    if group == "sampler":
        sampler = built["datamodule"].train_dataloader().sampler
        assert type(sampler).__name__ == {"none": "EpochShuffleSampler", "class_balanced": "ClassBalancedSampler"}[option]
    if group == "loss":
        assert task.criterion.label_smoothing == (0.1 if option == "label_smoothing" else 0.0)
    if group == "init" and option == "zeros":
        conv = next(m for m in task.model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.abs().max() < 1e-2  # one small step away from all zeros


@pytest.mark.parametrize("group", [g for g in groups() if g not in TRAINABLE_GROUPS + ("model", "paths")])
def test_every_option_of_the_other_groups_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option in ("imagefolder", "coco", "voc", "yolo"):
            overrides.append("data.root=/somewhere")
        if group == "task":
            overrides.append("data=" + {"classification": "digits", "detection": "shapes_det"}.get(option, "digits"))
        cfg = check_overrides("train", overrides)
        if group not in ("experiment", "debug", "sweep"):
            assert cfg[group] is not None


def test_each_task_sets_its_default_training_length():
    """trainer.max_epochs follows the task (task/*.yaml `epochs`) unless given; configs without a task fall back."""
    from cvlab.cli import complete_task
    from cvlab.utils.config import compose

    assert compose("train", []).trainer.max_epochs == 6
    detection = compose("train", complete_task(["model=yolov3_tiny"]))
    assert (detection.task.name, detection.data.name, detection.trainer.max_epochs) == ("detection", "shapes_det", 12)
    assert compose("train", complete_task(["model=yolov3_tiny", "trainer.max_epochs=3"])).trainer.max_epochs == 3
    assert compose("train", complete_task(["model=yolov3_tiny", "trainer=gpu"])).trainer.max_epochs == 12
    assert compose("eval", ["ckpt=x.ckpt"]).trainer.max_epochs == 6
