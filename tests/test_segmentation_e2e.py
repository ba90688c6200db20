"""Segmentation end to end (issue 12): UNet, BiSeNet and DANet train and evaluate on the embedded shapes_seg and on a
masks folder; metrics.json holds the whole split's mIoU (a numpy confusion matrix of the checkpoint's test
predictions gives the same), `cvlab eval` reproduces it exactly with the per-class table; `cvlab predict` writes
palette masks of class indices at each image's own size, through a checkpoint and through its ONNX export alike;
`cvlab export` matches the raw logits; `model=bisenet` picks the task and data by itself; `cvlab info` counts
FLOPs at the input size. Tiny sizes: 64 px, 8 training images, two batches, UNet at width 1/8."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FAST
from cvlab.data.base import IGNORE_INDEX
from cvlab.data.shapes import SHAPE_MASK_CLASSES, ShapesSegmentation
from cvlab.engine import run_train
from cvlab.run.eval import run_eval
from cvlab.run.predict import run_predict
from cvlab.utils.config import compose
from segmentation_files import save_palette_png

TINY = ["task=segmentation", "data.image_size=64", "data.batch_size=4", "data.num_workers=0"]
DATA = {"shapes_seg": ["data=shapes_seg", "data.train_size=8", "data.val_size=4"], "masks": ["data=masks"]}
MODEL = {"unet": ["model=unet", "model.width=0.125"], "bisenet": ["model=bisenet"], "danet": ["model=danet"]}
# The masks folder: 12 shape scenes of 56 x 48 px (not square: predict maps back to it), palette PNGs.
MASKS_SIZE = (56, 48)
MASKS_COUNT = 12
MASKS_PALETTE = [((k * 40) % 256, 255 - k * 40, (k * 90) % 256) for k in range(len(SHAPE_MASK_CLASSES))]


# Tiny networks gain nothing from a second thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def masks_root(tmp_path_factory):
    """images/ + masks/ (palette PNGs in shapes_seg's palette) and classes.txt; no split folders."""
    root = tmp_path_factory.mktemp("masks")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    width, height = MASKS_SIZE
    scenes = ShapesSegmentation("train", MASKS_COUNT, width, seed=3)
    for k in range(MASKS_COUNT):
        Image.fromarray(scenes.images[k, :, :height].permute(1, 2, 0).numpy()).save(root / "images" / f"s{k}.png")
        save_palette_png(scenes.masks[k, :height].numpy(), root / "masks" / f"s{k}.png", MASKS_PALETTE)
    (root / "classes.txt").write_text("\n".join(SHAPE_MASK_CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, masks_root):
    """trained(model, data) -> (run directory, metrics, objects); each pair trains once per module."""
    runs = {}

    def train(model: str, data: str):
        if (model, data) not in runs:
            out = tmp_path_factory.mktemp(f"{model}-{data}")
            root = [f"data.root={masks_root}"] if data == "masks" else []
            cfg = compose("train", [*FAST, *MODEL[model], *DATA[data], *TINY, *root, f"paths.output_dir={out}"])
            metrics, objects = run_train(cfg)
            runs[model, data] = out, metrics, objects
        return runs[model, data]

    return train


def numpy_miou(task, dataset) -> tuple[float, np.ndarray]:
    """(mIoU, IoU per class, NaN where a class is in neither truth nor prediction) of ``task`` on ``dataset``,
    from one numpy confusion matrix of its predictions."""
    num_classes = task.data_info.num_classes
    images, masks = map(torch.stack, zip(*(dataset[i] for i in range(len(dataset)))))
    with torch.inference_mode():
        predicted = task.model.eval()(images).argmax(1).numpy().ravel()
    truth = masks.numpy().ravel()
    counted = truth != IGNORE_INDEX
    matrix = np.bincount(num_classes * truth[counted] + predicted[counted], minlength=num_classes ** 2)
    matrix = matrix.reshape(num_classes, num_classes).astype(np.float64)
    correct = np.diag(matrix)
    with np.errstate(invalid="ignore"):
        iou = correct / (matrix.sum(0) + matrix.sum(1) - correct)
    return float(np.nanmean(iou)), iou


@pytest.mark.parametrize("data", ["shapes_seg", "masks"])
@pytest.mark.parametrize("model", ["unet", "bisenet", "danet"])
def test_train_then_eval_reproduces_the_whole_split_miou(trained, model, data, tmp_path, capsys):
    run, metrics, objects = trained(model, data)
    task, datamodule = objects["task"], objects["datamodule"]
    saved = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("miou", "pixel_acc", "mean_acc"):
            assert 0.0 <= saved[f"{split}/{key}"] <= 1.0
            assert saved[f"{split}/{key}"] == pytest.approx(metrics[f"{split}/{key}"], abs=1e-7)
    # The best checkpoint's test predictions, scored in numpy, give the saved mIoU and per-class IoU.
    miou, iou = numpy_miou(task, datamodule.test_set)
    assert saved["test/miou"] == pytest.approx(miou, abs=1e-6)
    names = task.class_names
    assert saved["iou_per_class"] == pytest.approx({names[k]: v for k, v in enumerate(iou) if v == v}, abs=1e-6)
    for figure in ("curves.png", "confusion_matrix.png", "overlays.png", "weights/best.ckpt"):
        assert (run / figure).is_file(), figure
    if model == "bisenet":  # two auxiliary heads, each loss logged beside the total
        columns = (run / "results.csv").read_text().splitlines()[0].split(",")
        assert {"train/loss", "train/loss_out", "train/loss_aux1", "train/loss_aux2"} <= set(columns)

    capsys.readouterr()
    run_eval(compose("eval", [f"ckpt={run / 'weights' / 'best.ckpt'}", "trainer=cpu",
                              f"paths.output_dir={tmp_path / 'eval'}"]))
    printed = capsys.readouterr().out
    table = printed[printed.index("IoU per class"):]
    for name in names:
        value = saved["iou_per_class"].get(name)
        assert re.search(rf"{name}\s+│\s+{'-' if value is None else f'{value:.4f}'}\s+│", table), (name, table)
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("test/miou", "test/pixel_acc", "test/mean_acc", "test/loss"):  # eval's default split is test
        assert evaluated[key] == pytest.approx(saved[key], abs=1e-6), key
    assert evaluated["iou_per_class"] == pytest.approx(saved["iou_per_class"], abs=1e-6)
    assert evaluated["acc_per_class"] == pytest.approx(saved["acc_per_class"], abs=1e-6)
    assert (tmp_path / "eval" / "overlays.png").is_file()


def test_masks_folder_keeps_its_palette_and_classes(trained):
    _, _, objects = trained("unet", "masks")
    info = objects["task"].data_info
    assert info.class_names == SHAPE_MASK_CLASSES and info.ignore_index == IGNORE_INDEX
    assert list(info.palette) == MASKS_PALETTE  # the PNGs' own


def _predict(ckpt, source, out):
    return run_predict(compose("predict", [f"ckpt={ckpt}", f"source={source}", f"paths.output_dir={out}"]))[1]


def test_predict_writes_palette_masks_at_the_original_size_through_the_checkpoint_and_its_onnx(
        trained, masks_root, tmp_path):
    from cvlab.data.segmentation import segmentation_eval_transform
    from cvlab.engine import export_checkpoint

    run, _, objects = trained("unet", "masks")
    task, ckpt = objects["task"], run / "weights" / "best.ckpt"
    info = task.data_info
    source = masks_root / "images"
    predictions = _predict(ckpt, source, tmp_path / "ckpt")["predictions"]
    assert [p["file_name"] for p in predictions] == [f"s{k}.png" for k in sorted(range(MASKS_COUNT), key=str)]
    transform = segmentation_eval_transform(info.image_size)
    width, height = MASKS_SIZE
    for record in predictions[:3]:
        pixels = torch.from_numpy(np.array(Image.open(source / record["file_name"]))).permute(2, 0, 1)
        with torch.inference_mode():
            logits = task.model.eval()(transform(pixels)[None])
        expected = F.interpolate(logits, size=(height, width), mode="bilinear").argmax(1)[0].numpy()
        mask = Image.open(tmp_path / "ckpt" / record["mask"])
        assert mask.mode == "P" and mask.size == (width, height)
        assert mask.getpalette()[:3 * info.num_classes] == [v for colour in info.palette for v in colour]
        values = np.asarray(mask)
        np.testing.assert_array_equal(values, expected)
        assert values.max() < info.num_classes
        shares = {info.class_names[k]: round(float((values == k).mean()), 5) for k in np.unique(values)}
        assert record["pixel_share"] == shares and (record["height"], record["width"]) == (height, width)
        assert Image.open(tmp_path / "ckpt" / record["file_name"]).size == (width, height)  # the drawn copy

    result = export_checkpoint(ckpt, "onnx")
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["task"] == "segmentation" and sidecar["input"]["image_size"] == 64
    assert sidecar["segmentation"]["palette"] == [list(colour) for colour in info.palette]
    assert sidecar["segmentation"]["ignore_index"] == IGNORE_INDEX
    assert sidecar["class_names"] == list(SHAPE_MASK_CLASSES)
    assert all(row.max_abs_diff <= 1e-4 for row in result.rows)
    assert {row.batch for row in result.rows} == {1, len(objects["datamodule"].val_set)}  # 2 of the 12 images
    through_onnx = _predict(result.path, source, tmp_path / "onnx")["predictions"]
    assert [p["file_name"] for p in through_onnx] == [p["file_name"] for p in predictions]
    for record in through_onnx:
        graph_mask = np.asarray(Image.open(tmp_path / "onnx" / record["mask"]))
        checkpoint_mask = np.asarray(Image.open(tmp_path / "ckpt" / record["mask"]))
        assert (graph_mask != checkpoint_mask).mean() < 1e-3  # arg-max ties aside, the same masks


def test_torchscript_export_of_a_segmentor_matches_its_logits_at_any_batch(trained):
    from cvlab.engine import export_checkpoint
    from cvlab.engine.export import ExportedGraph

    run, _, objects = trained("bisenet", "shapes_seg")
    result = export_checkpoint(run / "weights" / "best.ckpt", "torchscript")
    assert [(row.batch, row.output, row.shape) for row in result.rows] == [(4, "logits", [4, 6, 64, 64]),
                                                                          (1, "logits", [1, 6, 64, 64])]
    assert all(row.max_abs_diff <= 1e-4 for row in result.rows)
    images = torch.stack([objects["datamodule"].val_set[i][0] for i in range(3)])
    with torch.inference_mode():
        expected = objects["task"].model.eval()(images)
    torch.testing.assert_close(ExportedGraph(result.path, "torchscript")(images)[0], expected, atol=1e-4, rtol=0)


def test_model_bisenet_picks_the_segmentation_task_and_its_data():
    from cvlab.cli import complete_task

    overrides = complete_task(["model=bisenet"])
    assert overrides == ["task=segmentation", "data=shapes_seg", "model=bisenet"]
    cfg = compose("train", overrides)
    assert (cfg.task.monitor, cfg.task.mode, cfg.trainer.max_epochs) == ("val/miou", "max", cfg.task.epochs)
    assert complete_task(["model=unet", "data=masks"]) == ["task=segmentation", "model=unet", "data=masks"]


def test_info_counts_params_and_flops_at_the_input_size():
    from cvlab.cli import complete_task
    from cvlab.models import create_model
    from cvlab.run.info import run_info

    sizes = ["data.train_size=2", "data.val_size=2"]
    small = run_info(compose("train", complete_task(["model=bisenet", *sizes, "data.image_size=64"])))
    large = run_info(compose("train", complete_task(["model=bisenet", *sizes, "data.image_size=128"])))
    with torch.device("meta"):
        model = create_model("bisenet", num_classes=len(SHAPE_MASK_CLASSES))
    assert small["params"] == large["params"] == sum(p.numel() for p in model.parameters())
    assert sum(row[1] for row in small["stages"]) == small["params"]
    # Convolutions over maps 4x the area: 4x the FLOPs (the global-pool branch alone does not scale).
    assert 3.9 < large["flops"] / small["flops"] <= 4.0
