"""Every option of every config group composes, and the trainable ones train one step on digits and visibly take
effect (the right layer, optimizer, schedule, sampler or loss is in place)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cvlab.cli import complete_task
from cvlab.engine import run_train
from cvlab.utils.config import CONF_DIR, check_overrides, groups, options, read_option

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
# Options made for another task (a detector's loss) are tested with their task.
CASES = [(group, option) for group in TRAINABLE_GROUPS for option in options(group)
         if read_option(group, option).get("task", "classification") == "classification"]


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
        # SGD and RMSprop have a momentum setting (0 unless the option sets it); the adaptive methods have none.
        expected_momentum = {"momentum": 0.9, "nesterov": 0.9, "sgd": 0, "rmsprop": 0}.get(option)
        assert optimizer.param_groups[0].get("momentum") == expected_momentum
    if group == "scheduler":
        configs = trainer.lr_scheduler_configs
        assert (len(configs) == 0) == (option == "none")
        if configs:
            expected = {"step": "StepLR", "cosine": "WarmupCosineLR", "onecycle": "OneCycleLR",
                        "warmup_cosine": "WarmupCosineLR"}[option]
            assert type(configs[0].scheduler).__name__ == expected
    if group == "sampler":
        datamodule = built["datamodule"]
        sampler = datamodule.train_dataloader().sampler
        expected = {"none": "EpochShuffleSampler", "class_balanced": "ClassBalancedSampler"}.get(option)
        if expected is None:  # imbalanced-learn's: the training set is resampled, the loader shuffles it
            assert type(sampler).__name__ == "EpochShuffleSampler" and len(sampler) == len(datamodule.train_set)
            assert datamodule.resampled_labels is not None
            assert sorted(Counter(datamodule.resampled_labels).values()) != sorted(datamodule.info.class_counts)
        else:
            assert type(sampler).__name__ == expected
    if group == "loss":
        expected = {"weighted_ce": "WeightedCrossEntropy", "focal": "FocalLoss", "ohem": "OHEMCrossEntropy",
                    "class_balanced": "ClassBalancedLoss", "logit_adjusted": "LogitAdjustedLoss"}
        assert type(task.criterion).__name__ == expected.get(option, "CrossEntropyLoss")
        if option in ("ce", "default", "label_smoothing"):
            assert task.criterion.label_smoothing == (0.1 if option == "label_smoothing" else 0.0)
    if group == "init" and option == "zeros":
        conv = next(m for m in task.model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.abs().max() < 1e-2  # one small step away from all zeros


def _compose_with_choices(overrides: list[str]):
    """The train config with Hydra's own node, whose runtime.choices say which option each group got."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _assert_contains(values: dict, expected: dict, where: str) -> None:
    """Every leaf of ``expected`` has the same value in ``values`` (which may hold more keys)."""
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_contains(values[key], value, f"{where}.{key}")
        else:
            assert values[key] == value, f"{where}.{key}"


@pytest.mark.parametrize("group", [g for g in groups() if g not in TRAINABLE_GROUPS + ("model", "paths")])
def test_every_option_of_the_other_groups_composes_and_takes_effect(group, tmp_path, monkeypatch):
    # trainer=gpu and trainer=ddp are checked against the machine: pretend it has GPUs.
    monkeypatch.setattr("cvlab.utils.validate.cuda_devices", lambda: 8)
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option in ("imagefolder", "coco", "voc", "yolo", "masks", "voc_seg", "coco_seg"):
            overrides.append(f"data.root={tmp_path}")  # a folder that exists (nothing is read when checking)
        base = read_option("data", option)["defaults"][0] if group == "data" else ""
        if base.startswith("base/detection"):
            overrides.append("model=yolov3_tiny")  # detection data needs a detection model (and its task)
        if base.startswith("base/segmentation"):
            overrides.append("model=bisenet")
        if group == "task":
            overrides.append("data=" + {"classification": "digits", "detection": "shapes_det",
                                        "segmentation": "shapes_seg"}.get(option, "digits"))
        if group == "recipe":
            overrides.append("model=yolov3_tiny")  # the recipes are detection's
        cfg = check_overrides("train", complete_task(overrides))
        composed = _compose_with_choices(overrides)
        assert composed.hydra.runtime.choices[group] == option
        if group not in ("experiment", "debug", "sweep", "recipe"):
            assert cfg[group] is not None
            continue
        # A global option: every group it overrides and every value it sets must be in the composed config.
        spec = read_option(group, option)
        for entry in spec.get("defaults", []):
            ((key, value),) = entry.items()
            assert composed.hydra.runtime.choices[key.removeprefix("override /")] == value, (option, key)
        composed_values = OmegaConf.to_container(composed, enum_to_str=True)
        _assert_contains(composed_values, {key: value for key, value in spec.items() if key != "defaults"}, option)


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
    # A model's own length (model/*.yaml `epochs`) comes before its task's; trainer.max_epochs before both.
    own = complete_task(["model=yolov3_tiny", "+model.epochs=30"])
    assert compose("train", own).trainer.max_epochs == 30
    assert compose("train", [*own, "trainer.max_epochs=2"]).trainer.max_epochs == 2


def test_each_task_sets_its_default_batch_size():
    """data.batch_size follows the task (task/*.yaml `batch_size`) where it has one: GANs train on batches of 16."""
    from cvlab.cli import complete_task
    from cvlab.utils.config import compose

    assert compose("train", []).data.batch_size == 64
    gan = compose("train", complete_task(["model=stylegan2"]))
    assert (gan.data.name, gan.data.batch_size, gan.trainer.max_epochs) == ("digits32", 16, 20)
    assert compose("train", complete_task(["model=stylegan2", "data.batch_size=8"])).data.batch_size == 8
