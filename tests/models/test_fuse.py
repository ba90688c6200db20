"""The fuse hook (issue 15, "Conv+BN layers are fused for eval, predict and export"): every conv-norm-act's
BatchNorm folds into its conv, so the YOLOs' fused outputs equal their eval outputs and no BatchNorm is left; other
norms stay; `cvlab eval` and `cvlab predict` of a detection checkpoint run the fused network (the EMA's, where the
task keeps one), while training and the validation inside it run the network as it trains."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import FAST
from cvlab.engine import restore_task, run_train
from cvlab.engine.export import fuse_for_export
from cvlab.layers.conv import ConvNormAct
from cvlab.layers.norm import group_norm, layer_norm, no_norm
from cvlab.layers.rep import RepVGGBlock
from cvlab.models import create_model
from cvlab.models.detectors.yolo_v7 import Implicit
from cvlab.models.heads.decoupled_head import ZeroStartConv
from cvlab.run.eval import run_eval
from cvlab.run.predict import run_predict
from cvlab.tasks.detection import DetectionTask
from cvlab.utils.config import compose
from detector_checks import fold_batch_norms, randomise_batch_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
# The conv-BN pairs of each detector at any width: every conv but the output convs (yolov3-tiny.cfg: 13 convs, 2 of
# them linear outputs; yolov4-tiny.cfg: 21 and 2; YOLOv5n: 57 Conv modules and Detect's 3; yolov7-tiny: 55 and
# IDetect's 3). YOLOv6n's 98 conv-norm-acts hold 128 BatchNorms: 30 RepVGG blocks have an identity branch's too.
BATCH_NORMS = {"yolov3_tiny": 11, "yolov4_tiny": 19, "yolov5n": 57, "yolov7_tiny": 55, "yolov6n": 128}


def batch_norms(network: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in network.modules())


def n_params(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def as_list(raw) -> list[torch.Tensor]:
    return list(raw) if isinstance(raw, (list, tuple)) else [raw]


@pytest.mark.parametrize("name", list(BATCH_NORMS))
def test_fused_detectors_keep_their_eval_outputs_and_no_batch_norm(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=SIZE).eval()
    randomise_batch_norms(model)
    for conv in model.modules():  # YOLOv6's predictors start at zero weights, which would hide the trunk
        if isinstance(conv, ZeroStartConv):
            nn.init.normal_(conv.weight, std=0.05)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    fused = copy.deepcopy(model)
    names = fuse_for_export(fused)
    # The detector's own hook ("") and every conv-norm-act's.
    assert {"", *(n for n, m in model.named_modules() if isinstance(m, ConvNormAct))} <= set(names)
    assert batch_norms(model) == BATCH_NORMS[name] and batch_norms(fused) == 0
    assert not any(module.training for module in fused.modules())
    if name != "yolov6n":  # each BatchNorm folded, not dropped: its 2·C affine parameters become a C-wide conv bias
        folded = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        implicit = sum(n_params(m) for m in model.modules() if isinstance(m, Implicit))  # YOLOv7's, folded too
        assert n_params(fused) == n_params(model) - folded - implicit
        assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == sum(
            isinstance(m, nn.Conv2d) for m in model.modules())
    with torch.no_grad():
        expected, found = as_list(model.forward_raw(images)), as_list(fused.forward_raw(images))
    assert len(found) == len(expected)
    for level, fused_level in zip(expected, found):
        assert level.abs().max() > 1.0  # outputs far from a constant: a wrong fold would show
        torch.testing.assert_close(fused_level, level, rtol=1e-5, atol=1e-5)
    state = {key: value.clone() for key, value in fused.state_dict().items()}
    fuse_for_export(fused)  # idempotent
    fused.fuse()
    assert fused.state_dict().keys() == state.keys()
    assert all(torch.equal(fused.state_dict()[key], value) for key, value in state.items())


def test_the_detectors_own_hook_gives_the_same_network_as_the_export_walk():
    # model.fuse() and fuse_for_export run the same hooks in the same order (YoloDetector.fuse), so the two deploy
    # forms are one; YOLOv6's RepVGG blocks merge branches whose convs have folded their BatchNorms already.
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=3, image_size=SIZE).eval()
    randomise_batch_norms(model)
    direct, walked = copy.deepcopy(model), copy.deepcopy(model)
    direct.fuse()
    fuse_for_export(walked)
    assert batch_norms(direct) == batch_norms(walked) == 0
    assert direct.state_dict().keys() == walked.state_dict().keys()
    assert all(torch.equal(value, walked.state_dict()[key]) for key, value in direct.state_dict().items())
    block = RepVGGBlock(4, 4).eval()  # branch BatchNorms folded first, then the branches: the same kernel
    randomise_batch_norms(block)
    kernel, bias = block.equivalent_kernel_bias()
    assert fold_batch_norms(block) == 2 and block.foldable
    folded_kernel, folded_bias = block.equivalent_kernel_bias()
    torch.testing.assert_close(folded_kernel, kernel, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded_bias, bias, rtol=1e-6, atol=1e-6)


def test_only_an_eval_mode_batch_norm_with_running_statistics_folds():
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    batch_norm = ConvNormAct(4, 8, 3, act_layer=nn.SiLU)
    with pytest.raises(RuntimeError, match="eval"):
        batch_norm.fuse()
    randomise_batch_norms(batch_norm.eval())
    with torch.no_grad():
        before = batch_norm(x)
    assert batch_norm.fuse() is True
    assert isinstance(batch_norm[1], nn.Identity) and batch_norm[0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(batch_norm(x), before, rtol=1e-5, atol=1e-6)
    weight = batch_norm[0].weight.clone()
    assert batch_norm.fuse() is False and torch.equal(batch_norm[0].weight, weight)  # idempotent

    batch_statistics = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731
    for norm_layer in (group_norm, layer_norm, no_norm, batch_statistics):
        block = ConvNormAct(4, 8, 3, norm_layer=norm_layer, act_layer=nn.SiLU, bias=None).eval()
        state = copy.deepcopy(block.state_dict())
        norm = block[1]
        with torch.no_grad():
            before = block(x)
            assert block.fuse() is False and block[1] is norm
            assert block.state_dict().keys() == state.keys()
            assert all(torch.equal(block.state_dict()[key], value) for key, value in state.items())
            assert torch.equal(block(x), before)
    grouped = create_model("yolov5n", num_classes=3, image_size=SIZE, norm_layer=group_norm).eval()
    norms = sum(isinstance(m, nn.GroupNorm) for m in grouped.modules())
    assert norms == BATCH_NORMS["yolov5n"]
    grouped.fuse()
    assert sum(isinstance(m, nn.GroupNorm) for m in grouped.modules()) == norms


# ------------------------------------------------------------------------------------------------- eval, predict
TINY = ["task=detection", "model.width=0.125", "data=shapes_det", f"data.image_size={SIZE}", "data.batch_size=4",
        "data.train_size=8", "data.val_size=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(model) -> (best.ckpt, the trained task, the BatchNorms of the inference network at every validation
    batch inside fit); each model trains once per module."""
    runs = {}

    def train(model: str):
        if model not in runs:
            out = tmp_path_factory.mktemp(model)
            seen = []
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(DetectionTask, "_evaluate_batch", spy(DetectionTask._evaluate_batch, seen))
                _, objects = run_train(compose("train", [*FAST, *TINY, f"model={model}",
                                                               f"paths.output_dir={out}"]))
            runs[model] = out / "weights" / "best.ckpt", objects["task"], seen
        return runs[model]

    return train


def spy(method, seen: list):
    """``method`` of DetectionTask, recording the BatchNorms of the network each call runs (the inference model:
    evaluation and predict run in eval mode)."""

    def wrapped(self, *args, **kwargs):
        assert not self.training
        seen.append(batch_norms(self.inference_model))
        return method(self, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("model,ema", [("yolov5n", True), ("yolov3_tiny", False)])
def test_eval_runs_the_fused_network_and_training_never_fuses(trained, model, ema, tmp_path, monkeypatch, capsys):
    ckpt, task, seen_in_fit = trained(model)
    count = BATCH_NORMS[model]
    # Training, and the validation inside it, ran the network with its BatchNorms; the trained task keeps them.
    assert seen_in_fit and set(seen_in_fit) == {count}
    assert (task.ema is not None) == ema and batch_norms(task.model) == batch_norms(task.inference_model) == count
    assert batch_norms(restore_task(ckpt).inference_model) == count  # restoring to train on (resume) never fuses

    seen = []
    monkeypatch.setattr(DetectionTask, "_evaluate_batch", spy(DetectionTask._evaluate_batch, seen))
    capsys.readouterr()
    evaluated, objects = run_eval(compose("eval", [f"ckpt={ckpt}", "trainer=cpu", f"paths.output_dir={tmp_path}"]))
    assert seen and set(seen) == {0}  # every test batch ran the fused network
    restored = objects["task"]
    assert batch_norms(restored.inference_model) == 0
    if ema:  # the EMA is what evaluation runs and what is fused; the live weights a resume would train stay
        assert restored.inference_model is restored.ema.module and batch_norms(restored.model) == count
    assert f"fused for inference: {count} BatchNorm layers folded into their convs" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["test/map"] == evaluated["test/map"]
    assert_same_raw_outputs(restored.inference_model, task.inference_model.eval())  # the trained network, fused


def test_predict_runs_the_fused_network_with_the_unfused_outputs(trained, tmp_path, monkeypatch):
    from detection_files import shape_scenes

    ckpt, _, _ = trained("yolov5n")
    source = tmp_path / "scenes"
    source.mkdir()
    for stem, image, _, _ in shape_scenes():
        image.save(source / f"{stem}.png")
    seen = []
    monkeypatch.setattr(DetectionTask, "predict_step", spy(DetectionTask.predict_step, seen))
    _, objects = run_predict(compose("predict", [f"ckpt={ckpt}", f"source={source}", "conf=0.001", "device=cpu",
                                                 f"paths.output_dir={tmp_path / 'out'}"]))
    assert seen == [0, 0, 0]  # one call per image, each through the fused EMA network
    fused = objects["runner"].task.inference_model
    unfused = restore_task(ckpt).inference_model.eval()
    assert batch_norms(fused) == 0 and batch_norms(unfused) == BATCH_NORMS["yolov5n"]
    assert_same_raw_outputs(fused, unfused)


def assert_same_raw_outputs(fused: nn.Module, unfused: nn.Module) -> None:
    """The two detectors' raw outputs on random images agree to 1e-5 (the trained networks' are not constant)."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for got, expected in zip(fused.forward_raw(images), unfused.forward_raw(images), strict=True):
            assert expected.std() > 0.1
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
