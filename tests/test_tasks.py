"""Tasks build themselves: registered by name, from the config and the datamodule; the model and the loss must
belong to the task; a checkpoint names its task and restores it alone."""
from __future__ import annotations

import pytest
import torch

from cvlab.engine import build_datamodule, build_task, run_train
from cvlab.tasks.base import load_task, task_class, task_names
from cvlab.utils.errors import UserError


def test_tasks_are_registered_by_name():
    assert {"classification", "detection", "distillation"} <= set(task_names())
    assert task_class("detection").name == "detection"
    with pytest.raises(UserError, match="unknown task 'detectoin'. Did you mean detection"):
        task_class("detectoin")


def test_a_model_of_another_task_is_refused_before_anything_is_built(train_cfg):
    cfg = train_cfg("task=detection", "data=shapes_det", "data.train_size=4", "data.val_size=2", "data.test_size=2")
    datamodule = build_datamodule(cfg)
    with pytest.raises(UserError, match="model 'resnet18' is a classification model; task=detection takes one of "
                                        "fast_rcnn, faster_rcnn, rcnn, yolov1, yolov1_tiny, yolov2, yolov2_tiny"):
        build_task(cfg, datamodule)


def test_a_loss_of_another_task_is_refused(train_cfg):
    cfg = train_cfg("loss=yolov3")
    with pytest.raises(UserError, match="loss=yolov3 is a detection loss; task=classification cannot use it"):
        build_task(cfg, build_datamodule(cfg))


def test_the_loss_group_reaches_the_classifier_with_what_it_asks_of_the_data(train_cfg):
    cfg = train_cfg("loss=label_smoothing", "loss.label_smoothing=0.3")
    task = build_task(cfg, build_datamodule(cfg))
    assert type(task.criterion).__name__ == "CrossEntropyLoss" and task.criterion.label_smoothing == 0.3
    default = build_task(train_cfg(), build_datamodule(cfg))
    assert default.criterion.label_smoothing == 0.0  # loss=default: the paper's cross-entropy


def test_the_loss_group_reaches_the_detector(train_cfg):
    from cvlab.losses.yolo import YoloV3Loss

    overrides = ("task=detection", "model=yolov3_tiny", "model.width=0.125", "data=shapes_det", "data.image_size=64",
                 "data.train_size=4", "data.val_size=2", "data.test_size=2")
    cfg = train_cfg(*overrides, "loss=yolov3", "loss.ignore_thresh=0.7")
    task = build_task(cfg, build_datamodule(cfg))
    assert isinstance(task.model.loss, YoloV3Loss)
    default = build_task(train_cfg(*overrides), build_datamodule(cfg))
    assert _ignore_thresh(task.model.loss) == 0.7 and _ignore_thresh(default.model.loss) == 0.5


def _ignore_thresh(loss) -> float:
    """The ignore threshold wherever the loss keeps it (on itself or on its target assigner)."""
    for owner in (loss, getattr(loss, "assigner", None)):
        if owner is not None and hasattr(owner, "ignore_thresh"):
            return float(owner.ignore_thresh)
    raise AssertionError(f"{type(loss).__name__} has no ignore_thresh")


def test_a_checkpoint_names_its_registered_task_and_restores_alone(train_cfg, tmp_path):
    metrics, objects = run_train(train_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                           out=tmp_path / "run"))
    path = tmp_path / "run" / "weights" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["cvlab_task"] == "classification"
    stored = checkpoint["hyper_parameters"]
    assert stored["data_info"]["class_counts"] and sum(stored["data_info"]["class_counts"]) == len(
        objects["datamodule"].train_set)
    assert stored["data"]["seed"] == 42  # the seed that cut the splits travels with the data config
    restored = load_task(str(path))
    assert type(restored).__name__ == "ClassificationTask" and restored.data_info == objects["task"].data_info
