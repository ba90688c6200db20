"""`cvlab export` (issue 11, Export): ONNX and TorchScript exports of resnet18, mobilenetv2, vit_tiny and yolov3_tiny
match their checkpoints on real images (every output within 1e-4, boxes within 1e-3 px), the batch axis is dynamic,
the sidecar says how to feed and read the graph, `cvlab predict` gives the same predictions from model.onnx as from
the checkpoint, the fuse hook is called before export, a failed check and a missing extra are one line each and
leave nothing written, and a hostile checkpoint is refused by the safe loader.

Checkpoints are written by Lightning from untrained tasks on the embedded data (tiny sizes): the check compares a
graph with the weights it was exported from, which training would not change."""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cvlab.engine.export import (
    BOX_TOLERANCE,
    RAW_TOLERANCE,
    DecodedDetector,
    ExportCheckFailed,
    ExportedGraph,
    build_transform,
    export_checkpoint,
    fuse_for_export,
    read_sidecar,
    write_graph,
)
from cvlab.utils.errors import UserError

DIGITS_STATS = ([0.3053], [0.3761])  # cvlab's digits normalisation (cvlab/data/classification.py)
DETECTION = ["model=yolov3_tiny", "task=detection", "model.width=0.125", "data=shapes_det", "data.image_size=64",
             "data.train_size=8", "data.val_size=4", "data.test_size=4"]
MODELS = {
    "resnet18": ["model=resnet18"],
    "mobilenetv2": ["model=mobilenetv2"],
    "vit_tiny": ["model=vit_tiny"],
    "yolov3_tiny": DETECTION,
}
# yolov3_tiny at 64 px: 3 anchors on a 2x2 (stride 32) and a 4x4 (stride 16) grid.
YOLO_SLOTS = 3 * (2 * 2 + 4 * 4)


# Tiny networks gain nothing from a second thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spread_detector_scores(detector: nn.Module) -> None:
    """Re-draws the output convs of a YOLO head (seeded) so that its scores spread over (0, 1) as a trained head's
    do: an untrained head scores every box about 0.01 / C, and two overlapping boxes of near-equal scores let NMS
    keep either, whichever runtime computed them."""
    from cvlab.models.heads.anchor_head import AnchorOutputConv

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, AnchorOutputConv):
                module.weight.normal_(0, 0.5, generator=generator)
                module.bias.normal_(0, 2, generator=generator)


def write_checkpoint(folder, *overrides: str, spread_scores: bool = False):
    """A checkpoint of the untrained task of ``overrides`` (seeded; ``spread_scores``: see
    :func:`spread_detector_scores`), written by Lightning as a training run writes ``best.ckpt`` (weights,
    hyper-parameters, the task's name); returns (path, task)."""
    import pytorch_lightning as pl

    from cvlab.engine import build_datamodule, build_task
    from cvlab.utils.config import compose

    cfg = compose("train", [*overrides, "logger=none", f"paths.output_dir={folder}"])
    torch.manual_seed(0)
    task = build_task(cfg, build_datamodule(cfg))
    if spread_scores:
        spread_detector_scores(task.model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(folder))
    trainer.strategy.connect(task)
    path = folder / "weights" / "best.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path, weights_only=True)
    return path, task


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model: (best.ckpt, task)} for every model of MODELS, written once per module on first use."""
    made = {}

    def get(model: str):
        if model not in made:
            made[model] = write_checkpoint(tmp_path_factory.mktemp(model), *MODELS[model],
                                           spread_scores=model == "yolov3_tiny")
        return made[model]

    return get


def _fresh_copy(checkpoints, model, tmp_path):
    """The module's checkpoint of ``model`` copied into ``tmp_path/weights``, so each test's exports are its own."""
    source, task = checkpoints(model)
    path = tmp_path / "weights" / "best.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(source.read_bytes())
    return path, task


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """{(model, format): (ExportResult, task)}: each checkpoint exported once per module (an ONNX export takes
    seconds: torch.export traces the network) into a folder of its own, on first use; tests only read them."""
    made = {}

    def get(model: str, fmt: str):
        if (model, fmt) not in made:
            ckpt, task = _fresh_copy(checkpoints, model, tmp_path_factory.mktemp(f"{model}-{fmt}"))
            made[model, fmt] = export_checkpoint(ckpt, fmt, images=4), task
        return made[model, fmt]

    return get


# ---------------------------------------------------------------------------------------------------- parity
# An ONNX export takes ~4 s on a quiet core (torch.export): the ONNX exports of the two models that no other test
# reads are slow tests.
PARITY = [pytest.param(model, fmt, marks=[pytest.mark.slow] if fmt == "onnx" and model in ("mobilenetv2", "vit_tiny")
                       else []) for model in MODELS for fmt in ("onnx", "torchscript")]


@pytest.mark.parametrize(("model", "fmt"), PARITY)
def test_export_matches_the_checkpoint_at_two_batch_sizes(exports, model, fmt):
    result, task = exports(model, fmt)
    ckpt = result.path.with_name("best.ckpt")
    expected_path = ckpt.with_name("best.onnx" if fmt == "onnx" else "best_torchscript.pt")
    assert result.path == expected_path and expected_path.is_file()
    assert result.sidecar == expected_path.with_suffix(".json") and result.sidecar.is_file()
    detector = model == "yolov3_tiny"
    names = ["boxes", "scores", "raw_0", "raw_1"] if detector else ["logits"]
    assert [(row.batch, row.output) for row in result.rows] == [(b, n) for b in (4, 1) for n in names]
    for row in result.rows:
        assert row.max_abs_diff <= row.tolerance == (BOX_TOLERANCE if row.output == "boxes" else RAW_TOLERANCE)
    if detector:
        assert result.rows[0].shape == [4, YOLO_SLOTS, 4] and result.rows[1].shape == [4, YOLO_SLOTS, 5]
    else:
        assert result.rows[0].shape == [4, 10]
    # The checkpoint, the graph and its sidecar: no temporary file left behind.
    assert sorted(p.name for p in ckpt.parent.iterdir()) == sorted(["best.ckpt", expected_path.name,
                                                                     result.sidecar.name])


@pytest.mark.parametrize("model", ["resnet18", "yolov3_tiny"])
def test_the_onnx_batch_axis_is_dynamic_and_matches_eager(exports, model):
    result, task = exports(model, "onnx")
    graph = ExportedGraph(result.path, "onnx")
    batch_dim = graph.session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str)  # symbolic, not a number
    network = task.model.eval()
    eager = DecodedDetector(network, 64).eval() if model == "yolov3_tiny" else network
    size = 64 if model == "yolov3_tiny" else 8
    channels = 3 if model == "yolov3_tiny" else 1
    images = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    for batch in (images[:1], images):
        got = graph(batch)
        with torch.inference_mode():
            want = eager(batch)
        want = list(want) if isinstance(want, tuple) else [want]
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
        assert got[0].shape[0] == len(batch)
        for g, w, tolerance in zip(got, want, [BOX_TOLERANCE if model == "yolov3_tiny" else RAW_TOLERANCE]
                                   + [RAW_TOLERANCE] * 3):
            assert (g - w).abs().max() <= tolerance


def test_a_distillation_checkpoint_exports_its_student_as_a_classifier(tmp_path):
    ckpt, task = write_checkpoint(tmp_path, "model=mobilenetv1", "model.width_mult=0.25", "task.name=distillation")
    assert type(task).__name__ == "DistillationTask"
    result = export_checkpoint(ckpt, "torchscript")
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["task"] == "classification" and sidecar["model"] == "mobilenetv1"
    assert result.rows[0].shape == [4, 10] and all(row.ok for row in result.rows)


# ---------------------------------------------------------------------------------------------------- sidecar
def test_the_classification_sidecar_rebuilds_the_checkpoints_preprocessing(exports):
    result, task = exports("resnet18", "onnx")
    path = result.path
    sidecar = read_sidecar(path)
    assert path.with_suffix(".json").is_file()
    assert sidecar["task"] == "classification" and sidecar["model"] == "resnet18" and sidecar["format"] == "onnx"
    assert sidecar["input"] == {"name": "images", "shape": ["batch", 1, 8, 8], "dtype": "float32", "layout": "NCHW",
                                "channels": 1, "image_size": 8, "color": "L"}
    assert (sidecar["preprocess"]["mean"], sidecar["preprocess"]["std"]) == DIGITS_STATS
    assert [step["op"] for step in sidecar["preprocess"]["steps"]] == ["to_image", "to_float", "resize", "normalize"]
    assert sidecar["class_names"] == [str(d) for d in range(10)]
    assert [(o["name"], o["shape"]) for o in sidecar["outputs"]] == [("logits", ["batch", 10])]
    assert "softmax" in sidecar["outputs"][0]["meaning"]
    assert sidecar["check"]["max_abs_diff"].keys() == {"logits@batch4", "logits@batch1"}
    assert "boxes" not in sidecar and "postprocess" not in sidecar
    # The steps rebuild the very transform the checkpoint prepares images with (a 12 x 10 image is resized too).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12), dtype=np.uint8), mode="L")
    rebuilt, original = build_transform(sidecar["preprocess"]["steps"])(image), task.eval_transform()(image)
    assert rebuilt.shape == (1, 8, 8)
    torch.testing.assert_close(rebuilt, original, rtol=0, atol=0)


def test_the_detection_sidecar_gives_boxes_letterbox_and_nms(exports):
    result, task = exports("yolov3_tiny", "onnx")
    sidecar = read_sidecar(result.path)
    assert sidecar["task"] == "detection" and sidecar["input"]["shape"] == ["batch", 3, 64, 64]
    assert sidecar["class_names"] == ["circle", "square", "triangle", "diamond", "cross"]
    assert [(o["name"], o["shape"]) for o in sidecar["outputs"]] == [
        ("boxes", ["batch", YOLO_SLOTS, 4]), ("scores", ["batch", YOLO_SLOTS, 5]),
        ("raw_0", ["batch", 3, 2, 2, 10]), ("raw_1", ["batch", 3, 4, 4, 10])]
    assert sidecar["boxes"]["format"] == "xyxy" and "letterboxed 64 x 64" in sidecar["boxes"]["units"]
    assert "pad_left = (S - round(w * scale)) // 2" in sidecar["boxes"]["unletterbox"]
    assert sidecar["preprocess"]["steps"][0] == {**sidecar["preprocess"]["steps"][0], "op": "letterbox", "size": 64,
                                                 "fill": 114}
    postprocess = task.model.postprocess
    assert sidecar["postprocess"] == {**sidecar["postprocess"], "conf_thresh": postprocess.conf_thresh,
                                      "iou_thresh": postprocess.iou_thresh, "max_det": postprocess.max_det,
                                      "multi_label": postprocess.multi_label}


# ---------------------------------------------------------------------------------------------------- predict
def _predict(ckpt, source, out, *extra):
    from cvlab.run.predict import run_predict
    from cvlab.utils.config import compose

    return run_predict(compose("predict", [f"ckpt={ckpt}", f"source={source}", *extra,
                                           f"paths.output_dir={out}"]))[1]["predictions"]


def test_predict_from_onnx_equals_predict_from_the_checkpoint_classification(exports, tmp_path):
    from sklearn.datasets import load_digits

    onnx_path = exports("resnet18", "onnx")[0].path
    ckpt = onnx_path.with_name("best.ckpt")
    source = tmp_path / "digits"
    source.mkdir()
    digits = load_digits()
    for i in range(4):
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(source / f"{i}.png")
    from_ckpt = _predict(ckpt, source, tmp_path / "a", "top_k=3")
    from_onnx = _predict(onnx_path, source, tmp_path / "b", "top_k=3")
    assert len(from_onnx) == len(from_ckpt) == 4
    for mine, theirs in zip(from_onnx, from_ckpt):
        assert [r["label"] for r in mine["top_k"]] == [r["label"] for r in theirs["top_k"]]
        assert (mine["image_id"], mine["file_name"]) == (theirs["image_id"], theirs["file_name"])
        np.testing.assert_allclose([r["probability"] for r in mine["top_k"]],
                                   [r["probability"] for r in theirs["top_k"]], atol=2e-5)
    for i in range(4):  # the same drawn copies
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f"{i}.png")),
                              np.asarray(Image.open(tmp_path / "b" / f"{i}.png")))


def test_predict_from_onnx_equals_predict_from_the_checkpoint_detection(exports, tmp_path):
    from detection_files import shape_scenes

    onnx_path = exports("yolov3_tiny", "onnx")[0].path
    ckpt = onnx_path.with_name("best.ckpt")
    source = tmp_path / "scenes"
    source.mkdir()
    for stem, image, _, _ in shape_scenes():  # 80 x 64: letterboxed, and mapped back
        image.save(source / f"{stem}.png")
    from_ckpt = _predict(ckpt, source, tmp_path / "a", "conf=0.001")
    from_onnx = _predict(onnx_path, source, tmp_path / "b", "conf=0.001")
    assert len(from_onnx) == len(from_ckpt) > 0
    # One to one: every box from the graph is a box from the checkpoint (same image and class, coordinates within
    # the json's rounding, score within 2e-5).
    unmatched = list(from_ckpt)
    for mine in from_onnx:
        match = next(theirs for theirs in unmatched
                     if (theirs["image_id"], theirs["category_id"]) == (mine["image_id"], mine["category_id"])
                     and np.allclose(theirs["bbox"], mine["bbox"], atol=0.011, rtol=0)
                     and abs(theirs["score"] - mine["score"]) <= 2e-5)
        unmatched.remove(match)
    assert not unmatched


def test_predict_refuses_an_onnx_file_without_its_sidecar(exports, tmp_path):
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes(exports("resnet18", "onnx")[0].path.read_bytes())
    with pytest.raises(UserError, match="has no sidecar model.json beside it"):
        _predict(lonely, tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_export_prints_the_differences_and_a_failed_check_writes_nothing(checkpoints, tmp_path, monkeypatch,
                                                                          capsys):
    from typer.testing import CliRunner

    from cvlab.cli import app

    ckpt, _ = _fresh_copy(checkpoints, "resnet18", tmp_path)
    result = CliRunner().invoke(app, ["export", f"ckpt={ckpt}", "format=torchscript"])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "logits" in result.output
    assert (tmp_path / "weights" / "best_torchscript.pt").is_file()

    # A graph whose outputs are off by twice the tolerance: one line, exit 1, nothing new on disk.
    before = sorted(p.name for p in ckpt.parent.iterdir())
    real_call = ExportedGraph.__call__
    monkeypatch.setattr(ExportedGraph, "__call__", lambda self, images: [o + 2 * RAW_TOLERANCE
                                                                         for o in real_call(self, images)])
    failed = CliRunner().invoke(app, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'weights' / 'other.pt'}",
                                      "format=torchscript"])
    assert failed.exit_code == 1
    lines = [line for line in failed.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not match the checkpoint: logits differs by 0.0002" in lines[0], failed.output
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before


def test_a_missing_export_extra_is_one_line_and_exit_2(checkpoints, exports, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cvlab.cli import app
    from cvlab.engine.export import GraphRunner

    ckpt, _ = _fresh_copy(checkpoints, "resnet18", tmp_path)
    onnx_path = exports("resnet18", "onnx")[0].path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    result = CliRunner().invoke(app, ["export", f"ckpt={ckpt}", "format=onnx", f"out={tmp_path / 'again.onnx'}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: format=onnx needs the onnxruntime package: pip install 'cvlab[export]'"]
    assert not (tmp_path / "again.onnx").exists()
    with pytest.raises(UserError, match=r"needs the onnxruntime package: pip install 'cvlab\[export\]'"):
        GraphRunner(onnx_path, torch.device("cpu"))
    # TorchScript needs no extra.
    assert export_checkpoint(ckpt, "torchscript").path.is_file()


# ---------------------------------------------------------------------------------------------------- safety
class WritesFile:
    """Unpickling it calls ``open(path, "w")``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_hostile_or_foreign_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    created = tmp_path / "created-by-unpickling"
    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps(WritesFile(created)))
    with pytest.raises(UserError, match="is not a cvlab checkpoint: it is not the zip archive"):
        export_checkpoint(hostile, "onnx")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "hyper_parameters": {}}, foreign)
    with pytest.raises(UserError, match="names no cvlab task"):
        export_checkpoint(foreign, "torchscript")
    assert not created.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.ckpt", "hostile.ckpt"]


def test_bad_format_and_out_are_refused(checkpoints, tmp_path):
    ckpt, _ = _fresh_copy(checkpoints, "resnet18", tmp_path)
    with pytest.raises(UserError, match="format is one of onnx, torchscript, got 'tflite'"):
        export_checkpoint(ckpt, "tflite")
    with pytest.raises(UserError, match="format=onnx writes a .onnx file"):
        export_checkpoint(ckpt, "onnx", out=str(tmp_path / "model.pt"))
    with pytest.raises(UserError, match="images .* is an integer >= 1"):
        export_checkpoint(ckpt, "onnx", images=0)


# ---------------------------------------------------------------------------------------------------- fuse hook
class TwoBranches(nn.Module):
    """``conv3(x) + conv1(x)`` (a RepVGG-style pair of branches) until ``fuse()`` folds the 1x1 conv into the centre
    of the 3x3 one."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv1 = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv3(x) if self.conv1 is None else self.conv3(x) + self.conv1(x)

    def fuse(self):
        if self.conv1 is None:
            return
        with torch.no_grad():
            self.conv3.weight[:, :, 1, 1] += self.conv1.weight[:, :, 0, 0]
            self.conv3.bias += self.conv1.bias
        self.conv1 = None


def test_the_fuse_hook_is_called_innermost_first_and_the_fused_form_is_exported(tmp_path):
    network = nn.Sequential(TwoBranches(), nn.ReLU(), TwoBranches()).train()
    images = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = network(images)
    assert fuse_for_export(network) == ["2", "0"]
    assert not network.training and network[0].conv1 is None and network[2].conv1 is None
    with torch.no_grad():
        torch.testing.assert_close(network(images), before, rtol=0, atol=1e-5)
    assert fuse_for_export(nn.Sequential(nn.Conv2d(1, 1, 1))) == []
    from cvlab.layers.attention import get_attn_layer

    # SK attention holds a layer named `fuse`, which takes an input: no hook of its own; its conv-norm-acts have one.
    selective_kernel = get_attn_layer("sk")(8)
    assert isinstance(selective_kernel.fuse, nn.Module)
    assert fuse_for_export(selective_kernel) == ["fuse", "branches.1", "branches.0"]

    import onnx

    path = tmp_path / "fused.onnx"
    write_graph(network, images, path, "onnx", ["out"])
    assert [node.op_type for node in onnx.load(str(path)).graph.node].count("Conv") == 2  # one per block, not four
    torch.testing.assert_close(ExportedGraph(path, "onnx")(images)[0], before, rtol=0, atol=1e-5)


def test_a_failed_check_raises_and_leaves_no_files(checkpoints, tmp_path, monkeypatch):
    ckpt, _ = _fresh_copy(checkpoints, "yolov3_tiny", tmp_path)
    real_call = ExportedGraph.__call__

    def shifted_boxes(self, images):
        boxes, *rest = real_call(self, images)
        return [boxes + 2 * BOX_TOLERANCE, *rest]

    monkeypatch.setattr(ExportedGraph, "__call__", shifted_boxes)
    # the graph is fused: besides the shift it differs from the eager network by float rounding (0.00203)
    with pytest.raises(ExportCheckFailed, match=r"boxes differs by 0\.002\d* at batch 4 .tolerance 0.001.; nothing"):
        export_checkpoint(ckpt, "torchscript")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.ckpt"]
