"""`cvlab export`: a checkpoint's network as an ONNX or TorchScript graph, checked on real images, with a sidecar
json that says how to feed it and read it; and the runners `cvlab predict` draws through, a checkpoint's task or an
exported ONNX graph, so one drawing and json code (the task's ``predict_images``) serves both.

What is exported
    The network of the checkpoint, restored by :func:`~cvlab.engine.checkpoints.restore_task` (the safe loader:
    nothing in the file is run), in eval mode. A distillation checkpoint holds its student, a classifier. Before
    export, :func:`fuse_for_export` calls the **fuse hook**: every module of the network that defines ``fuse()`` is
    called once, innermost first. ``fuse()`` takes no arguments and folds the module's own training-time branches
    (RepVGG-style parallel convolutions, a BatchNorm after a conv) into the single op it infers with, in place; it
    is idempotent. A network without such modules is exported as it is. The batch axis is dynamic; the image size
    is the checkpoint's (``data_info.image_size``), fixed.

Graph outputs
    =============== ==========================================================================================
    classification  ``logits`` Tensor[N, C]; their softmax is the probabilities `cvlab predict` reports
    segmentation    ``logits`` Tensor[N, C, S, S], per-pixel class logits at the input size; `cvlab predict` resizes
                    them to the original image (bilinear) and takes the arg-max over C: the class mask
    detection       ``boxes`` Tensor[N, P, 4] xyxy in absolute pixels of the letterboxed input (clipped to it)
                    and ``scores`` Tensor[N, P, C] (objectness x class probability) over all P prediction slots, then
                    ``raw_0, raw_1, ...``: the head's raw outputs (the detector's ``forward_raw``) that boxes and
                    scores are decoded from. The decode is in the graph; thresholding and class-wise NMS are not
                    (their output sizes depend on the data): they are
                    :class:`~cvlab.ops.postprocess.DetectionPostprocess` with the sidecar's thresholds, the module
                    a checkpoint's detector ends with, run in python after the graph.
    =============== ==========================================================================================

The sidecar (``<export name>.json`` beside the graph, :func:`sidecar_path`) holds the task, the model, the input
(name, shape, channels, colour mode, image size), the preprocessing (each step, and mean/std), the class names, every
output's name, shape and meaning, for detection the box format, how to undo the letterbox and the NMS thresholds,
for segmentation the mask palette and the ignore index; also the check's figures. It gives a graph what a
checkpoint's hyper-parameters give its task.

The check
    Each export is run (onnxruntime on the CPU, or the saved TorchScript module reloaded) on real images, the first
    ``images`` of the checkpoint's validation split, as a batch and as a batch of one, beside the unfused eager
    network: the largest absolute difference of every output must be at most :data:`RAW_TOLERANCE` (1e-4), and of
    the decoded boxes at most :data:`BOX_TOLERANCE` (1e-3 px). A failure raises :class:`ExportCheckFailed`, and
    nothing is left behind: the graph and the sidecar are written to temporary files and renamed only once checked.

torch.onnx (its dynamo exporter, onnxscript underneath), torch.jit.trace and onnxruntime do the work; what is written
here is the fuse walk, the detector's export form, the check and the sidecar.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision.ops import clip_boxes_to_image

from cvlab.data.base import LETTERBOX_GREY, DataInfo
from cvlab.engine.builders import checkpoint_datamodule
from cvlab.engine.checkpoints import restore_for_inference, restore_task
from cvlab.engine.runs import write_json
from cvlab.layers.rep import fuse_modules
from cvlab.ops.postprocess import DetectionPostprocess
from cvlab.tasks.base import BaseTask, task_class, to_plain
from cvlab.utils.errors import UserError

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".torchscript")}
# The default file beside the checkpoint: best.ckpt -> best.onnx / best_torchscript.pt (and best.json /
# best_torchscript.json: the two sidecars never collide).
DEFAULT_NAMES = {"onnx": "{stem}.onnx", "torchscript": "{stem}_torchscript.pt"}
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME = "images"
RAW_TOLERANCE = 1e-4
BOX_TOLERANCE = 1e-3  # pixels
SIDECAR_VERSION = 1
# The example batch the graph is traced with: 2, because torch.export treats a size of 1 as a constant.
_EXAMPLE_BATCH = 2
_POSTPROCESS_KEYS = ("conf_thresh", "iou_thresh", "max_det", "pre_nms_topk", "multi_label")


class ExportCheckFailed(Exception):
    """The exported graph's outputs differ from the checkpoint's beyond the tolerance (one line)."""


def require_export_extra(what: str, modules: tuple[str, ...] = EXPORT_EXTRA) -> None:
    """A UserError naming the ``export`` extra unless ``modules`` (of the extra) import; ``what`` says who needs
    them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{what} needs the {module} package: pip install 'cvlab[export]'") from None


# ---------------------------------------------------------------------------------------------------- the network
def fuse_for_export(network: nn.Module) -> list[str]:
    """Puts ``network`` in eval mode and calls the ``fuse()`` hook of each of its modules that defines one (the
    network itself included), innermost first (:func:`~cvlab.layers.rep.fuse_modules`); returns the names of the
    modules fused ("" is the network)."""
    return fuse_modules(network.eval())


class DecodedDetector(nn.Module):
    """A YOLO detector in its export form: ``images Tensor[N, 3, S, S] -> (boxes Tensor[N, P, 4] xyxy pixels,
    scores Tensor[N, P, C], *raw)``, the detector's ``forward_raw`` and ``decode`` without the NMS; ``S`` is fixed
    (the grid strides follow from it).

    The boxes are clipped to the input, the first step of the NMS that follows (so clipping again there changes
    nothing): an untrained head's boxes can reach tens of thousands of pixels, where float32 steps are 1e-3 px."""

    def __init__(self, detector: nn.Module, image_size: int):
        super().__init__()
        self.detector = detector
        self.image_size = (int(image_size), int(image_size))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.detector.forward_raw(images)
        raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        boxes, scores = self.detector.decode(raw, self.image_size)
        return (clip_boxes_to_image(boxes, self.image_size), scores, *raw)


def is_detector(network: nn.Module) -> bool:
    """Whether ``network`` follows the YOLO detection contract that :class:`DecodedDetector` exports."""
    return callable(getattr(network, "forward_raw", None)) and callable(getattr(network, "decode", None))


def _as_outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _batched(shape: torch.Size) -> list:
    return ["batch", *map(int, shape[1:])]


# ---------------------------------------------------------------------------------------------------- preprocessing
def describe_transform(transform) -> list[dict]:
    """The steps of a classification or segmentation checkpoint's evaluation transform (a v2.Compose) as json, which
    :func:`build_transform` rebuilds exactly; a UserError for a step the sidecar cannot describe."""
    from torchvision.transforms import v2

    steps = []
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, v2.ToImage):
            steps.append({"op": "to_image", "does": "PIL/numpy HWC -> Tensor[C, H, W] uint8"})
        elif isinstance(step, v2.ToDtype) and step.dtype == torch.float32 and step.scale:
            steps.append({"op": "to_float", "does": "uint8 / 255 -> float32 in [0, 1]"})
        elif isinstance(step, v2.Resize) and step.max_size is None:
            size = [step.size] * 2 if isinstance(step.size, int) else list(step.size)
            steps.append({"op": "resize", "size": size, "interpolation": v2.InterpolationMode(step.interpolation).value,
                          "antialias": bool(step.antialias)})
        elif isinstance(step, v2.Normalize):
            steps.append({"op": "normalize", "mean": list(map(float, step.mean)), "std": list(map(float, step.std)),
                          "does": "(x - mean) / std per channel"})
        elif isinstance(step, v2.ToPureTensor):
            steps.append({"op": "to_pure_tensor", "does": "a plain Tensor (no tv_tensors type): the values unchanged"})
        else:
            raise UserError(f"the checkpoint's evaluation preprocessing has a {type(step).__name__} step, which an "
                            "export sidecar cannot describe yet.")
    return steps


def build_transform(steps: list[dict]):
    """The v2.Compose that :func:`describe_transform` described."""
    from torchvision.transforms import v2

    built = []
    for step in steps:
        op = step["op"]
        if op == "to_image":
            built.append(v2.ToImage())
        elif op == "to_float":
            built.append(v2.ToDtype(torch.float32, scale=True))
        elif op == "resize":
            built.append(v2.Resize([int(v) for v in step["size"]], v2.InterpolationMode(step["interpolation"]),
                                   antialias=bool(step["antialias"])))
        elif op == "normalize":
            built.append(v2.Normalize([float(v) for v in step["mean"]], [float(v) for v in step["std"]]))
        elif op == "to_pure_tensor":
            built.append(v2.ToPureTensor())
        else:
            raise UserError(f"unknown preprocessing step {op!r} in the sidecar.")
    return v2.Compose(built)


def _letterbox_preprocess(size: int) -> dict:
    scale = "scale = S / max(h, w)"
    return {
        "steps": [{"op": "letterbox", "size": size, "fill": LETTERBOX_GREY,
                   "does": f"resize (bilinear, antialiased) to round(h * scale) x round(w * scale), {scale}, then pad "
                           f"to S x S (S = {size}) with grey {LETTERBOX_GREY}: pad_left = (S - round(w * scale)) // "
                           "2, pad_top = (S - round(h * scale)) // 2, the rest right and below"},
                  {"op": "to_float", "does": "uint8 / 255 -> float32 in [0, 1], RGB"}],
        "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
    }


# ---------------------------------------------------------------------------------------------------- graphs
class ExportedGraph:
    """An exported graph loaded for inference: ``graph(images Tensor[N, C, H, W]) -> list[Tensor]`` in the graph's
    output order. ONNX runs in onnxruntime (CPU, or CUDA when ``device`` is a GPU and onnxruntime has it; ``threads``
    caps its CPU threads, None: onnxruntime's default), TorchScript in torch.jit."""

    def __init__(self, path: Path, fmt: str, device: torch.device | str = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        self.format = fmt
        if fmt == "onnx":
            import onnxruntime

            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's concern
            if threads is not None:
                options.intra_op_num_threads = threads
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
            self.runtime = f"onnxruntime {onnxruntime.__version__} {self.session.get_providers()[0]}"
        else:
            with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the format still loads
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
            self.runtime = f"torch.jit {torch.__version__}"

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.format == "onnx":
            feed = {INPUT_NAME: images.detach().cpu().float().contiguous().numpy()}
            return [torch.from_numpy(output) for output in self.session.run(None, feed)]
        with torch.inference_mode():
            return [output.cpu() for output in _as_outputs(self.module(images.to(self.device)))]


@contextlib.contextmanager
def _quiet_export():
    """torch.onnx and torch.jit narrate and warn at length about what is expected here (constant image size)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write_graph(module: nn.Module, example: torch.Tensor, path: Path, fmt: str, output_names: list[str]) -> None:
    """Writes ``module`` (eval mode) traced on ``example`` to ``path`` in ``fmt``, with a dynamic batch axis."""
    with _quiet_export(), torch.no_grad():
        if fmt == "onnx":
            batch = torch.export.Dim("batch", min=1, max=65_536)
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=output_names, dynamic_shapes=({0: batch},), external_data=False,
                              verbose=False)
        else:
            torch.jit.save(torch.jit.trace(module, (example,), check_trace=False), str(path))


def _max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    got, expected = got.double(), expected.double()
    same_non_finite = (got == expected) | (got.isnan() & expected.isnan())
    return float(torch.where(same_non_finite, 0.0, (got - expected).abs()).max()) if got.numel() else 0.0


# ---------------------------------------------------------------------------------------------------- export
@dataclass
class CheckRow:
    batch: int
    output: str
    shape: list
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    runtime: str
    rows: list[CheckRow] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)


def sidecar_path(graph: Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return graph.with_suffix(".json")


def _out_path(ckpt: Path, fmt: str, out: str | None) -> Path:
    path = Path(out).expanduser() if out else ckpt.with_name(DEFAULT_NAMES[fmt].format(stem=ckpt.stem))
    if path.suffix not in SUFFIXES[fmt]:
        raise UserError(f"out={str(path)!r}: format={fmt} writes a {' or '.join(SUFFIXES[fmt])} file.")
    if path.resolve() == ckpt.resolve() or path.is_dir():
        raise UserError(f"out={str(path)!r} is the checkpoint or a folder; give the export's file name.")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"out={str(path)!r}: its folder does not exist or cannot be written.")
    return path


def _check_images(task: BaseTask, count: int) -> tuple[torch.Tensor, Any]:
    """The first ``count`` images of the checkpoint's validation split as the network takes them (at least
    :data:`_EXAMPLE_BATCH`: repeated when the split is smaller), and the datamodule."""
    try:
        datamodule = checkpoint_datamodule(task, None, 42)
    except (OSError, RuntimeError) as error:
        raise UserError(f"the export is checked on the checkpoint's own data, which cannot be read: {error}") from None
    val_set = datamodule.val_set
    images = torch.stack([val_set[i][0] for i in range(min(count, len(val_set)))])
    while len(images) < _EXAMPLE_BATCH:
        images = torch.cat([images, images])[:max(_EXAMPLE_BATCH, count)]
    return images, datamodule


def export_checkpoint(ckpt: Path, fmt: str = "onnx", out: str | None = None, images: int = 4) -> ExportResult:
    """Exports the network of ``ckpt`` to ``out`` (default: beside the checkpoint, :data:`DEFAULT_NAMES`) in
    ``fmt``, checks it on ``images`` validation images and writes its sidecar. Raises a UserError for bad input
    (including a missing ``export`` extra) and :class:`ExportCheckFailed` when the check fails; in both cases nothing
    is written."""
    if fmt not in FORMATS:
        raise UserError(f"format is one of {', '.join(FORMATS)}, got {fmt!r}.")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"images (how many validation images the export is checked on) is an integer >= 1, got "
                        f"{images!r}.")
    if fmt == "onnx":
        require_export_extra("format=onnx")
    task = restore_task(ckpt)
    path = _out_path(ckpt, fmt, out)
    batch, datamodule = _check_images(task, images)
    info, task_name = task.data_info, task.model_task or task.name
    network = task.inference_model.eval()
    detector = is_detector(network)
    if not detector and task_name not in ("classification", "segmentation"):
        raise UserError(f"cvlab export does not support {task_name} networks ({type(network).__name__}) yet.")
    module = DecodedDetector(network, info.image_size).eval() if detector else network
    batches = {len(batch): batch, 1: batch[:1]}
    with torch.inference_mode():
        reference = {size: _as_outputs(module(inputs)) for size, inputs in batches.items()}
    output_names = (["boxes", "scores", *(f"raw_{i}" for i in range(len(reference[1]) - 2))] if detector
                    else ["logits"])
    fused = fuse_for_export(network)

    tmp_graph = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_graph.unlink(missing_ok=True)
    try:
        write_graph(module, batch, tmp_graph, fmt, output_names)
        graph = ExportedGraph(tmp_graph, fmt)
        rows = []
        for size, inputs in batches.items():
            got = graph(inputs)
            if len(got) != len(output_names):
                raise ExportCheckFailed(f"the {fmt} graph gives {len(got)} outputs, the network {len(output_names)}")
            for name, out_tensor, expected in zip(output_names, got, reference[size]):
                rows.append(CheckRow(size, name, list(expected.shape), _max_abs_diff(out_tensor, expected),
                                     BOX_TOLERANCE if name == "boxes" else RAW_TOLERANCE))
        failed = [row for row in rows if not row.ok]
        if failed:
            worst = max(failed, key=lambda row: row.max_abs_diff / row.tolerance)
            raise ExportCheckFailed(f"{fmt} export of {ckpt} does not match the checkpoint: {worst.output} differs by "
                                    f"{worst.max_abs_diff:.3g} at batch {worst.batch} (tolerance {worst.tolerance:g}); "
                                    "nothing was written.")
        sidecar = _sidecar(task, task_name, network, path, fmt, output_names, reference[len(batch)], rows, fused,
                           graph.runtime, datamodule)
        write_json(sidecar_path(path), sidecar)
        tmp_graph.replace(path)
    finally:
        tmp_graph.unlink(missing_ok=True)
    return ExportResult(path, sidecar_path(path), fmt, graph.runtime, rows, fused)


def _sidecar(task: BaseTask, task_name: str, network: nn.Module, path: Path, fmt: str, output_names: list[str],
             outputs: list[torch.Tensor], rows: list[CheckRow], fused: list[str], runtime: str, datamodule) -> dict:
    info = task.data_info
    size, channels = info.image_size, info.in_chans
    detector = task_name == "detection"
    if detector:
        preprocess = _letterbox_preprocess(size)
        meanings = {"boxes": "xyxy boxes in absolute pixels of the letterboxed S x S input (clipped to it), one per "
                             "prediction slot",
                    "scores": "per slot and class: objectness x class probability, in [0, 1]"}
        for name in output_names[2:]:
            meanings[name] = (f"the head's raw output {name[4:]} (the detector's forward_raw, before decoding; "
                              f"see {type(network).__module__}.{type(network).__name__})")
    else:
        # A segmentation set's val_set transforms image and mask together: the image's own preprocessing is the task's.
        steps = describe_transform(task.eval_transform() if task_name == "segmentation"
                                   else datamodule.val_set.transform)
        normalize = next((step for step in steps if step["op"] == "normalize"), {"mean": [0.0] * channels,
                                                                                 "std": [1.0] * channels})
        preprocess = {"steps": steps, "mean": normalize["mean"], "std": normalize["std"]}
        meanings = {"logits": "class logits; their softmax over the last axis is the class probabilities"}
        if task_name == "segmentation":
            meanings = {"logits": "per-pixel class logits at the input size; resized to an original h x w image "
                                  "(bilinear, align_corners=False), their arg-max over axis 1 is its class mask"}
    sidecar: dict[str, Any] = {
        "cvlab_export": SIDECAR_VERSION,
        "format": fmt,
        "file": path.name,
        "task": task_name,
        "model": task.hparams.model["name"],
        "input": {"name": INPUT_NAME, "shape": ["batch", channels, size, size], "dtype": "float32",
                  "layout": "NCHW", "channels": channels, "image_size": size,
                  "color": "L" if channels == 1 else "RGB"},
        "preprocess": preprocess,
        "class_names": list(info.class_names),
        "outputs": [{"name": name, "shape": _batched(output.shape), "meaning": meanings[name]}
                    for name, output in zip(output_names, outputs)],
        "data_info": info.as_dict(),
        "data": to_plain(task.hparams.data),
        "fused": fused,
        "check": {"runtime": runtime, "images": max(row.batch for row in rows),
                  "max_abs_diff": {f"{row.output}@batch{row.batch}": row.max_abs_diff for row in rows},
                  "tolerance": {"raw": RAW_TOLERANCE, "boxes_px": BOX_TOLERANCE}},
    }
    if detector:
        sidecar["boxes"] = {
            "format": "xyxy", "units": f"absolute pixels of the letterboxed {size} x {size} input",
            "unletterbox": "for an original h x w image: scale = S / max(h, w), pad_left = (S - round(w * scale)) "
                           "// 2, pad_top = (S - round(h * scale)) // 2; x = (x_box - pad_left) / scale, y = (y_box - "
                           "pad_top) / scale, then clip to [0, w] x [0, h]",
        }
        postprocess = network.postprocess
        sidecar["postprocess"] = {
            **{key: getattr(postprocess, key) for key in _POSTPROCESS_KEYS},
            "does": "per image: clip boxes to the input, keep (box, class) pairs scoring above conf_thresh (every "
                    "class above it when multi_label, else the best), the pre_nms_topk best, class-wise NMS at "
                    "iou_thresh, the max_det best (cvlab.ops.postprocess.select_detections); cvlab predict sets "
                    "conf_thresh to its conf=",
        }
    if task_name == "segmentation":
        sidecar["segmentation"] = {
            "mask": "class indices 0..num_classes - 1 (class_names order; 0 is a class like the others)",
            "palette": [list(colour) for colour in info.palette] if info.palette is not None else None,
            "ignore_index": info.ignore_index,
            "does": "cvlab predict writes the mask as a palette PNG whose pixel values are the class indices, in "
                    "these colours; ignore_index marks unlabelled pixels of the training masks, never predicted",
        }
    return sidecar


# ---------------------------------------------------------------------------------------------------- predict
class CheckpointRunner:
    """`cvlab predict` through a restored task: ``runner(batch)`` is the task's ``predict_step``.

    The runner interface, which a task's ``predict_images`` draws through (:class:`GraphRunner` has it too):
    ``task_name`` (the registered task whose ``predict_images`` applies), ``info`` (DataInfo), ``data`` (the data
    config trained on, or None), ``transform`` (classification: the evaluation preprocessing of a PIL image;
    segmentation: of a uint8 image tensor),
    ``postprocess`` (detection: the DetectionPostprocess whose ``conf_thresh`` predict sets, else None) and
    ``runner(batch Tensor[N, C, H, W]) -> predict_step's output`` (probabilities Tensor[N, C], one
    dict(boxes, scores, labels) per image, or per-pixel logits Tensor[N, C, H, W])."""

    def __init__(self, task: BaseTask, device: torch.device):
        self.task = task.to(device).eval()
        self.device = device
        self.task_name = task.name
        self.info = task.data_info
        self.data = to_plain(task.hparams.data)
        self.postprocess = getattr(task.inference_model, "postprocess", None)

    @functools.cached_property
    def transform(self) -> Callable:
        return self.task.eval_transform()

    def __call__(self, batch: torch.Tensor):
        return self.task.predict_step(batch.to(self.device))

    def predict_images(self, paths, names, out, settings):
        return type(self.task).predict_images(self, paths, names, out, settings)


class GraphRunner:
    """`cvlab predict` through an exported ONNX graph and its sidecar (onnxruntime); the same interface as
    :class:`CheckpointRunner`, the graph's outputs finished as the task's ``predict_step`` finishes the network's:
    a softmax of the logits, the NMS of the decoded boxes (:class:`DetectionPostprocess` with the sidecar's
    thresholds), or a segmentor's logits as they are."""

    def __init__(self, path: Path, device: torch.device):
        require_export_extra("predict with an ONNX model", ("onnxruntime",))
        sidecar = read_sidecar(path)
        self.task_name = sidecar["task"]
        self.info = DataInfo.from_dict(sidecar["data_info"])
        self.data = sidecar.get("data")
        self.postprocess = (DetectionPostprocess(**{key: sidecar["postprocess"][key] for key in _POSTPROCESS_KEYS})
                            if self.task_name == "detection" else None)
        self.transform = build_transform(sidecar["preprocess"]["steps"]) if self.task_name != "detection" else None
        self.graph = ExportedGraph(path, "onnx", device)

    def __call__(self, batch: torch.Tensor):
        outputs = self.graph(batch)
        if self.postprocess is not None:
            size = self.info.image_size
            return self.postprocess(outputs[0], outputs[1], (size, size))
        return outputs[0] if self.task_name == "segmentation" else outputs[0].softmax(-1)

    def predict_images(self, paths, names, out, settings):
        return task_class(self.task_name).predict_images(self, paths, names, out, settings)


_SIDECAR_KEYS = {"task": str, "data_info": dict, "preprocess": dict, "outputs": list}


def read_sidecar(graph: Path) -> dict:
    """The sidecar of the exported ``graph``, checked to hold what :class:`GraphRunner` reads; a UserError (one
    line) when it is missing or is not a cvlab export sidecar. It is data: nothing in it is imported or run."""
    path = sidecar_path(graph)
    try:
        sidecar = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{str(graph)!r} has no sidecar {path.name} beside it; cvlab export writes the two "
                        "together.") from None
    except ValueError as error:
        raise UserError(f"sidecar {str(path)!r} is not json: {error}.") from None
    problems = [key for key, kind in _SIDECAR_KEYS.items()
                if not isinstance(sidecar, dict) or not isinstance(sidecar.get(key), kind)]
    if problems or sidecar.get("cvlab_export") != SIDECAR_VERSION:
        raise UserError(f"sidecar {str(path)!r} is not a cvlab export sidecar (version {SIDECAR_VERSION}); "
                        f"missing or wrong: {', '.join(problems) or 'cvlab_export'}.")
    if sidecar["task"] == "detection" and not isinstance(sidecar.get("postprocess"), dict):
        raise UserError(f"sidecar {str(path)!r} of a detector holds no postprocess thresholds.")
    try:
        DataInfo.from_dict(sidecar["data_info"])
        task_class(sidecar["task"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"sidecar {str(path)!r}: its data_info is not readable ({error}).") from None
    return sidecar


def open_runner(path: Path, device: torch.device) -> CheckpointRunner | GraphRunner:
    """What `cvlab predict ckpt=PATH` runs: an ONNX graph (``.onnx``, with its sidecar) or a checkpoint (fused
    where its task asks for it, :func:`~cvlab.engine.checkpoints.restore_for_inference`)."""
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"ckpt {str(path)!r} does not exist.")
        return GraphRunner(path, device)
    return CheckpointRunner(restore_for_inference(path), device)

