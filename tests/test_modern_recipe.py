"""The modern YOLO recipe (issue 15): the weight EMA (its ramped decay, updated after every optimiser step, the weights
evaluated, exported and held by best.ckpt), the fitness the best checkpoint is chosen by, the per-model mosaic / mixup
/ EMA defaults, and `recipe=modern` (mosaic, EMA, cosine schedule, CIoU) for any YOLO, each piece taking effect or a
setting given beside it winning. Tiny detectors (width 1/8, 64 px, a few images)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import complete_box_iou_loss

from conftest import FAST
from cvlab.cli import complete_task
from cvlab.engine import build_datamodule, build_task, run_train
from cvlab.engine.export import CheckpointRunner
from cvlab.engine.tune import main_metric
from cvlab.losses.yolo import YoloV1Loss
from cvlab.losses.yolov6 import YoloV6Loss
from cvlab.metrics.detection import fitness
from cvlab.tasks.base import load_task
from cvlab.tasks.detection import DetectionSettings
from cvlab.tasks.ema import WeightEMA, ema_decay
from cvlab.utils.config import check, compose
from cvlab.utils.errors import UserError

TINY = ["model.width=0.125", "data=shapes_det", "data.image_size=64", "data.train_size=8", "data.val_size=4",
        "data.batch_size=2", "data.num_workers=0"]
# One small model of each YOLO family, with its paper's box loss.
PAPER_BOX_LOSS = {"yolov1_tiny": "mse", "yolov2_tiny": "mse", "yolov3_tiny": "mse", "yolov4_tiny": "ciou",
                  "yolov5n": "ciou", "yolov6n": "siou", "yolov7_tiny": "ciou"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def detection_cfg(train_cfg, *overrides: str):
    """The composed train config of a detection model, as `cvlab train` completes it (task=detection)."""
    return train_cfg(*complete_task([*TINY, *overrides]))


# ---------------------------------------------------------------------------------------------------- EMA
def test_ema_decay_ramps_from_a_copy_to_its_asymptote():
    assert ema_decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))  # ~0.0005: nearly a copy
    assert ema_decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))  # 0.632
    assert ema_decay(100_000) == pytest.approx(0.9999, abs=1e-12)
    assert ema_decay(10, decay=0.5, tau=5.0) == pytest.approx(0.5 * (1 - math.exp(-2)))


def test_weight_ema_follows_the_ramped_recursion_and_copies_the_buffers():
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(live, decay=0.9, tau=2.0)
    assert not any(p.requires_grad for p in ema.module.parameters())
    expected = None
    for k in range(1, 6):
        with torch.no_grad():  # the live weights after an optimiser step
            for p in live.parameters():
                p.copy_(torch.randn_like(p))
            live[1].running_mean.fill_(float(k))
        ema.update_parameters(live)
        current = [p.detach().clone() for p in live.parameters()]
        d = ema_decay(k, 0.9, 2.0)
        expected = current if expected is None else [d * e + (1 - d) * w for e, w in zip(expected, current)]
        for averaged, wanted in zip(ema.module.parameters(), expected):
            torch.testing.assert_close(averaged, wanted)
        torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), float(k)))  # copied, not averaged
    assert int(ema.n_averaged) == 5
    assert not torch.allclose(ema.module[0].weight, live[0].weight)  # the average lags the live weights
    with pytest.raises(ValueError, match="decay in"):
        WeightEMA(live, decay=1.0)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """yolov3_tiny trained one epoch of 4 batches, 2 per optimiser step, with the EMA's ramp shortened to 1 step so
    that the average visibly lags: (run directory, metrics, objects)."""
    out = tmp_path_factory.mktemp("ema") / "run"
    steps = ["trainer.limit_train_batches=4", "++trainer.accumulate_grad_batches=2"]
    cfg = compose("train", [*FAST, *complete_task([*TINY, "model=yolov3_tiny", "task.ema=true", "task.ema_tau=1.0",
                                                   *steps, f"paths.output_dir={out}"])])
    metrics, objects = run_train(cfg)
    return out, metrics, objects


def test_the_ema_updates_after_every_optimiser_step_and_best_ckpt_holds_it(ema_run):
    run, metrics, _ = ema_run
    best = torch.load(run / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
    state = best["state_dict"]
    assert best["global_step"] == 2 and int(state["ema.n_averaged"]) == 2  # 4 batches, 2 a step: 2 updates
    live = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    averaged = {key.removeprefix("ema.module."): value for key, value in state.items()
                if key.startswith("ema.module.")}
    assert averaged.keys() == live.keys()
    moved = [key for key, value in live.items() if value.is_floating_point() and not torch.equal(value, averaged[key])]
    assert moved  # the second update averaged: the EMA is not the live weights
    assert best["best_score"]["monitor"] == "val/fitness"

    restored = load_task(run / "weights" / "best.ckpt")
    assert restored.inference_model is restored.ema.module
    for key, value in restored.inference_model.state_dict().items():
        torch.testing.assert_close(value, averaged[key])
    assert CheckpointRunner(restored, torch.device("cpu")).postprocess is restored.ema.module.postprocess


def test_evaluation_runs_the_ema_and_training_the_live_weights(ema_run):
    _, _, objects = ema_run
    task = objects["task"].cpu()
    ran = []
    hooks = [task.ema.module.register_forward_hook(lambda *_: ran.append("ema")),
             task.model.register_forward_hook(lambda *_: ran.append("live"))]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]), labels=torch.tensor([1]))] * 2
    try:
        with torch.no_grad():
            task.eval()
            task(images)
            task.train()
            task(images, targets)
    finally:
        task.eval()
        for hook in hooks:
            hook.remove()
    assert ran == ["ema", "live"]


def test_ema_settings_reach_the_average(train_cfg):
    cfg = detection_cfg(train_cfg, "model=yolov3_tiny", "task.ema=true", "task.ema_decay=0.5", "task.ema_tau=3.0")
    task = build_task(cfg, build_datamodule(cfg))
    assert (task.ema.decay, task.ema.tau) == (0.5, 3.0)
    assert not any(p.requires_grad for p in task.ema.parameters())  # the optimiser never steps the average


def test_ema_settings_are_checked():
    with pytest.raises(UserError, match=r"task.ema_decay must be a number in \[0, 1\)"):
        DetectionSettings.from_dict({"ema": True, "ema_decay": 1.0})
    with pytest.raises(UserError, match="task.ema_tau must be a number > 0"):
        DetectionSettings.from_dict({"ema_tau": 0})
    with pytest.raises(UserError, match="task.ema is true or false"):
        DetectionSettings.from_dict({"ema": 1})
    with pytest.raises(UserError, match="task.norm_bias_decay is true or false"):
        DetectionSettings.from_dict({"norm_bias_decay": "no"})
    assert DetectionSettings.from_dict(None).ema is False  # a checkpoint from before the setting: no EMA


# ---------------------------------------------------------------------------------------------------- decay
@pytest.mark.parametrize(("overrides", "exempt_1d"), [
    (["model=yolov6n"], True),  # YOLOv6's optimiser: BatchNorm weights and biases at decay 0
    (["model=yolov6n", "task.norm_bias_decay=true"], False),
    (["model=yolov5n"], False),  # cvlab's AdamW 0.05 decays them (yolov7_tiny trained worse without: BENCHMARKS.md)
    (["model=yolov5n", "task.norm_bias_decay=false"], True),
])
def test_norm_bias_decay_sets_the_one_dimensional_parameters_group(train_cfg, overrides, exempt_1d):
    cfg = detection_cfg(train_cfg, *overrides)
    task = build_task(cfg, build_datamodule(cfg))
    groups = task.optimizer_param_groups()
    one_dim = {id(p) for p in task.model.parameters() if p.ndim <= 1}
    trainable = {id(p) for p in task.model.parameters()}
    assert one_dim and trainable - one_dim  # both kinds exist
    grouped = [{id(p) for p in group["params"]} for group in groups]
    assert set().union(*grouped) == trainable and sum(map(len, grouped)) == len(trainable)  # the EMA copy in none
    if exempt_1d:
        assert (groups[1]["name"], groups[1]["weight_decay"], grouped[1]) == ("no_weight_decay", 0.0, one_dim)
    else:
        assert len(groups) == 1


# ---------------------------------------------------------------------------------------------------- fitness
def test_fitness_is_ultralytics_weighting_and_prefers_tighter_boxes():
    loose = {"map": 0.58, "map_50": 0.965, "map_75": 0.6, "mar_100": 0.7}  # the epoch 18
    tight = {"map": 0.60, "map_50": 0.960, "map_75": 0.65, "mar_100": 0.7}  # its last epoch
    assert fitness(loose) == pytest.approx(0.1 * 0.965 + 0.9 * 0.58)
    assert loose["map_50"] > tight["map_50"] and fitness(tight) > fitness(loose)
    assert fitness(tight, {"map_75": 1.0}) == pytest.approx(0.65)
    with pytest.raises(UserError, match="task.fitness weighs some of map, map_50, map_75, mar_100"):
        DetectionSettings.from_dict({"fitness": {"map_5": 1.0}})
    with pytest.raises(UserError, match="task.fitness.map must be a number >= 0"):
        DetectionSettings.from_dict({"fitness": {"map": -1.0}})


def test_fitness_is_the_detection_monitor_logged_beside_map_50(ema_run):
    _, metrics, _ = ema_run
    for split in ("val", "test"):  # study and tune read test/<the monitor's name> beside val/<it>
        assert metrics[f"{split}/fitness"] == pytest.approx(0.1 * metrics[f"{split}/map_50"]
                                                            + 0.9 * metrics[f"{split}/map"], abs=1e-6)
    cfg = compose("train", complete_task(["model=yolov3_tiny"]))
    assert (cfg.task.monitor, cfg.callbacks.model_checkpoint.monitor) == ("val/fitness", "val/fitness")
    assert main_metric(compose("tune", complete_task(["model=yolov3_tiny", "paths.output_dir=unused"]))) == (
        "val/fitness", "max")


def test_fitness_weights_are_configurable_and_reach_the_logged_score(train_cfg):
    cfg = detection_cfg(train_cfg, "model=yolov3_tiny", "task.fitness.map_50=1.0", "task.fitness.map=0.0",
                        "+task.fitness.map_75=0.5")
    task = build_task(cfg, build_datamodule(cfg))
    scores = {"map": 0.4, "map_50": 0.8, "map_75": 0.3, "mar_100": 0.5}
    task.map_metric.compute = lambda: {**scores, "ap50_per_class": {}, "ap_per_class": {}}
    task.map_metric.pr_curves = lambda iou: {}
    logged = {}
    task.log_dict = lambda values, **_: logged.update(values)
    task._log_evaluation("val")
    assert logged["val/fitness"] == pytest.approx(1.0 * 0.8 + 0.5 * 0.3)
    assert {key: logged[f"val/{key}"] for key in scores} == scores


# ---------------------------------------------------------------------------------------------- per-model defaults
@pytest.mark.parametrize(("model", "mosaic", "mixup", "ema"), [
    ("yolov1", 0.0, 0.0, False), ("yolov2", 0.0, 0.0, False), ("yolov3_tiny", 0.0, 0.0, False),
    ("yolov4", 0.5, 0.0, False), ("yolov4_tiny", 0.0, 0.0, False), ("yolov5n", 1.0, 0.0, True),
    ("yolov5x", 1.0, 0.0, True), ("yolov6s", 1.0, 0.0, True), ("yolov7", 1.0, 0.15, True),
    ("yolov7_tiny", 1.0, 0.05, True), ("faster_rcnn", 0.0, 0.0, False)])
def test_mosaic_mixup_and_ema_default_to_the_models_recipe(model, mosaic, mixup, ema):
    cfg = compose("train", complete_task([f"model={model}"]))
    assert (cfg.data.mosaic, cfg.data.mixup, cfg.task.ema) == (mosaic, mixup, ema)
    # YOLOv6's tools/train.py stops mosaic and mixup for the last 15 epochs (stop_aug_last_n_epoch); the others never.
    assert cfg.data.close_mosaic == (15 if model.startswith("yolov6") else 0)
    given = compose("train", complete_task([f"model={model}", "data.mosaic=0.25", "task.ema=false"]))
    assert (given.data.mosaic, given.task.ema) == (0.25, False)


def test_the_models_mosaic_reaches_the_training_set(train_cfg):
    from cvlab.data.wrappers import Mosaic

    datamodule = build_datamodule(detection_cfg(train_cfg, "model=yolov4"))  # model.mosaic 0.5
    datamodule.setup()
    view, _ = datamodule.training_view()
    assert isinstance(view, Mosaic) and datamodule.mosaic == 0.5
    plain = build_datamodule(detection_cfg(train_cfg, "model=yolov4_tiny"))
    plain.setup()
    assert plain.training_view()[0] is plain.train_set


# ---------------------------------------------------------------------------------------------------- recipe=modern
def test_recipe_modern_composes_mosaic_ema_cosine_and_ciou(train_cfg):
    faithful = detection_cfg(train_cfg, "model=yolov3_tiny", "scheduler=step")
    modern = detection_cfg(train_cfg, "model=yolov3_tiny", "recipe=modern")
    assert (faithful.data.mosaic, faithful.task.ema, "box_loss" in faithful.loss) == (0.0, False, False)
    assert (modern.data.mosaic, modern.task.ema, modern.loss.box_loss) == (1.0, True, "ciou")
    assert (faithful.data.close_mosaic, modern.data.close_mosaic) == (0, 10)  # Ultralytics' close_mosaic
    assert modern.scheduler.scheduler._target_ == "cvlab.utils.schedules.WarmupCosineLR"
    assert modern.scheduler.scheduler.warmup_fraction == 0.05 and modern.scheduler.interval == "step"
    assert (modern.recipe.name, modern.recipe.task) == ("modern", "detection")

    task = build_task(modern, build_datamodule(modern))
    assert task.model.loss.box_loss == "ciou" and isinstance(task.ema, WeightEMA)
    assert build_task(faithful, build_datamodule(faithful)).ema is None


def test_a_setting_given_beside_the_recipe_wins(train_cfg):
    cfg = detection_cfg(train_cfg, "model=yolov3_tiny", "scheduler=step", "recipe=modern", "data.mosaic=0.25",
                        "loss.box_loss=mse", "task.ema=false")
    assert cfg.scheduler.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert (cfg.data.mosaic, cfg.loss.box_loss, cfg.task.ema) == (0.25, "mse", False)
    task = build_task(cfg, build_datamodule(cfg))
    assert task.model.loss.box_loss == "mse" and task.ema is None
    named = detection_cfg(train_cfg, "model=yolov3_tiny", "loss=yolov3", "recipe=modern")  # a named loss gets it too
    assert named.loss.box_loss == "ciou" and named.loss.ignore_thresh == 0.5


@pytest.mark.parametrize("model", list(PAPER_BOX_LOSS))
def test_recipe_modern_gives_every_yolo_ciou_boxes(train_cfg, model):
    modern = detection_cfg(train_cfg, f"model={model}", "recipe=modern")
    assert build_task(modern, build_datamodule(modern)).model.loss.box_loss == "ciou"
    faithful = detection_cfg(train_cfg, f"model={model}")
    assert build_task(faithful, build_datamodule(faithful)).model.loss.box_loss == PAPER_BOX_LOSS[model]


def test_recipe_modern_is_refused_for_another_task_and_the_own_loss_refuses_what_it_lacks(train_cfg):
    with pytest.raises(UserError, match="recipe=modern is a training recipe for detection models"):
        check("train", complete_task(["model=resnet18", "recipe=modern"]))
    with pytest.raises(UserError, match="unknown key 'loss.box_loss'"):  # without the recipe loss=default has none
        check("train", complete_task(["model=yolov3_tiny", "loss.box_loss=ciou"]))
    refusals = {
        ("+loss.box_loss=siou",): "loss.box_loss=siou: yolov3_tiny's own loss \\(YoloV3Loss\\) takes box_loss mse, "
                                  "giou, ciou",
        ("+loss.ignore_thresh=0.3",): "loss=default \\(the model's own loss\\) takes only box_loss",
    }
    for overrides, message in refusals.items():
        cfg = detection_cfg(train_cfg, "model=yolov3_tiny", *overrides)
        with pytest.raises(UserError, match=message):
            build_task(cfg, build_datamodule(cfg))
    cfg = train_cfg(*complete_task(["model=faster_rcnn", "data.image_size=64", "data.train_size=4", "data.val_size=2",
                                    "+loss.box_loss=ciou"]))
    with pytest.raises(UserError, match="loss.box_loss=ciou: faster_rcnn's own loss has no box_loss choice"):
        build_task(cfg, build_datamodule(cfg))


# ---------------------------------------------------------------------------------------------------- CIoU boxes
def _yolov1_case():
    """One 16 x 32 object centred at (16, 24) in a 64 px image (cell (0, 0) of a 2 x 2 grid); predictor 0 of that cell
    decodes to a 23.04 px square at the same centre, predictor 1 to a far smaller box, so predictor 0 answers."""
    box_pred = torch.zeros(1, 2, 2, 2, 5)
    box_pred[0, 0, 0, 0] = torch.tensor([0.5, 0.75, 0.6, 0.6, 0.5])
    box_pred[0, 0, 0, 1] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.5])
    class_pred = torch.zeros(1, 2, 2, 3)
    targets = [dict(boxes=torch.tensor([[8.0, 8.0, 24.0, 40.0]]), labels=torch.tensor([1]))]
    return box_pred, class_pred, targets


def test_yolov1_ciou_box_loss_is_one_minus_ciou_of_the_responsible_box():
    box_pred, class_pred, targets = _yolov1_case()
    mse = YoloV1Loss()(box_pred, class_pred, targets, (64, 64))
    ciou = YoloV1Loss(box_loss="ciou")(box_pred, class_pred, targets, (64, 64))
    # The paper's term: the centre is exact, sqrt sizes 0.6 against sqrt(16 / 64) = 0.5 and sqrt(32 / 64).
    assert mse["loss_box"].item() == pytest.approx(5 * ((0.6 - 0.5) ** 2 + (0.6 - math.sqrt(0.5)) ** 2), rel=1e-5)
    decoded = torch.tensor([[16 - 11.52, 24 - 11.52, 16 + 11.52, 24 + 11.52]])
    expected = 5 * complete_box_iou_loss(decoded, targets[0]["boxes"]).item()
    assert ciou["loss_box"].item() == pytest.approx(expected, rel=1e-5)
    assert ciou["loss_box"].item() != pytest.approx(mse["loss_box"].item(), rel=1e-2)
    for term in ("loss_obj", "loss_noobj", "loss_cls"):  # the same assignment: only the box term changes
        assert ciou[term].item() == pytest.approx(mse[term].item())
    with pytest.raises(ValueError, match="choose one of mse, ciou"):
        YoloV1Loss(box_loss="giou")


def test_yolov6_takes_ciou_boxes_beside_siou_and_giou():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    torch.testing.assert_close(YoloV6Loss(box_loss="ciou")._box_losses(pred, truth),
                               complete_box_iou_loss(pred, truth))
    assert not torch.allclose(YoloV6Loss(box_loss="ciou")._box_losses(pred, truth),
                              YoloV6Loss(box_loss="siou")._box_losses(pred, truth))
