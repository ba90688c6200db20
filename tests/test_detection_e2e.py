"""Detection end to end: YOLOv1/v2/v3 train and evaluate on the embedded shapes and on a COCO folder, `cvlab predict`
writes COCO-format results in original pixels, `cvlab anchors` and `model.anchors=auto` cluster the training boxes,
`cvlab info` counts detectors exactly. Tiny models (width 1/8, 64 px, a few images, two batches)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST
from cvlab.data.detection import unletterbox_boxes
from cvlab.data.shapes import SHAPE_CLASSES
from cvlab.engine import run_train
from cvlab.ops.anchors import kmeans_anchors, mean_best_iou
from cvlab.run.eval import run_eval
from cvlab.run.predict import run_predict
from cvlab.utils.config import compose
from detection_files import COCO_CATEGORY_IDS, shape_scenes, write_coco

TINY = ["task=detection", "model.width=0.125", "data.image_size=64", "data.batch_size=4"]
DATA = {
    "shapes_det": ["data=shapes_det", "data.train_size=8", "data.val_size=4"],
    "coco": ["data=coco", "data.num_workers=0"],  # + data.root
}
# Train scenes, and validation scenes holding every class once or more; COCO images are 80 x 64 (letterboxed).
COCO_TRAIN = [[0, 1], [2, 3, 4], [4, 1], [3, 0], [1, 2], [4, 0, 2], [3], [2, 1]]
COCO_VAL = [[0, 1], [2, 3], [4, 0], [1, 2, 3]]
TRAIN_SEED, VAL_SEED = 210, 300  # seeds whose scenes place every listed object
EXTRA = {("yolov2", "shapes_det"): ["model.anchors=auto"]}
# Predict runs on YOLOv1: it has no batch norm, so after two training steps its eval outputs are still sane boxes
# (an untrained BN network's running statistics are far off, so its boxes are degenerate and all filtered out).
PREDICTOR = ("yolov1", "coco")


# Tiny networks gain nothing from a second thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train2017", shape_scenes(COCO_TRAIN, seed=TRAIN_SEED))
    write_coco(root, "val2017", shape_scenes(COCO_VAL, seed=VAL_SEED))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, coco_root):
    """trained(model, data) -> (run directory, metrics, objects); each pair trains once per module."""
    runs = {}

    def train(model: str, data: str):
        if (model, data) not in runs:
            out = tmp_path_factory.mktemp(f"{model}-{data}")
            root = [f"data.root={coco_root}"] if data == "coco" else []
            cfg = compose("train", [*FAST, *TINY, f"model={model}", *DATA[data], *root, *EXTRA.get((model, data), []),
                                    f"paths.output_dir={out}"])
            metrics, objects = run_train(cfg)
            runs[model, data] = out, metrics, objects
        return runs[model, data]

    return train


def class_names_in(dataset) -> set[str]:
    labels = torch.cat([dataset.load(i)[2] for i in range(len(dataset))])
    return {SHAPE_CLASSES[k] for k in labels.tolist()}


@pytest.mark.parametrize("data", ["shapes_det", "coco"])
@pytest.mark.parametrize("model", ["yolov1", "yolov2", "yolov3"])
def test_train_then_eval_reproduces_map(trained, model, data, tmp_path, capsys):
    run, metrics, objects = trained(model, data)
    saved = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0.0 <= saved[f"{split}/map_50"] <= 1.0
        assert saved[f"{split}/map_50"] == pytest.approx(metrics[f"{split}/map_50"])
    # The per-class figures are the test split's: the classes it holds.
    assert set(saved["ap_per_class"]) == class_names_in(objects["datamodule"].test_set)
    assert all(0.0 <= ap <= 1.0 for ap in saved["ap_per_class"].values())
    assert (run / "pr_curves.png").is_file() and (run / "weights" / "best.ckpt").is_file()

    capsys.readouterr()
    run_eval(compose("eval", [f"ckpt={run / 'weights' / 'best.ckpt'}", "trainer=cpu",
                              f"paths.output_dir={tmp_path / 'eval'}"]))
    printed = capsys.readouterr().out
    table = printed[printed.index("AP per class"):]
    assert set(saved["ap50_per_class"]) == set(saved["ap_per_class"])
    for name, ap in saved["ap_per_class"].items():
        assert re.search(rf"{name}\s+│\s+{saved['ap50_per_class'][name]:.4f}\s+│\s+{ap:.4f}", table), (name, table)
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("test/map", "test/map_50", "test/map_75", "test/mar_100"):  # eval's default split is test
        assert evaluated[key] == pytest.approx(saved[key], abs=1e-6), key
    assert evaluated["ap_per_class"] == pytest.approx(saved["ap_per_class"], abs=1e-6)
    assert evaluated["ap50_per_class"] == pytest.approx(saved["ap50_per_class"], abs=1e-6)
    assert (tmp_path / "eval" / "pr_curves.png").is_file()


def test_anchors_auto_are_the_kmeans_anchors_of_the_training_boxes_and_are_checkpointed(trained):
    run, _, objects = trained("yolov2", "shapes_det")
    train_set = objects["datamodule"].train_set
    wh = torch.cat([boxes[:, 2:] - boxes[:, :2] for boxes in train_set.boxes])  # drawn at 64 px: no letterbox
    expected, _ = kmeans_anchors(wh, 5, seed=42)  # YOLOv2 has five anchors; the run's seed
    stored = torch.load(run / "weights" / "best.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert stored["model"]["anchors"] == expected.tolist()
    torch.testing.assert_close(objects["task"].model.anchors, expected, rtol=0, atol=0)


def test_anchor_box_sizes_are_measured_at_the_letterboxed_size(coco_root):
    from cvlab.data.detection import CocoDataset
    from cvlab.tasks.anchors import box_sizes

    dataset = CocoDataset(coco_root / "val2017", coco_root / "annotations" / "instances_val2017.json")
    boxes = np.concatenate([scene[2] for scene in shape_scenes(COCO_VAL, seed=VAL_SEED)])
    expected = torch.from_numpy(boxes[:, 2:] - boxes[:, :2]) * (64 / 80)  # 80 x 64 images letterboxed to 64
    torch.testing.assert_close(box_sizes(dataset, 64), expected)


def test_cli_anchors_prints_k_anchors_fitting_at_least_as_well_as_the_defaults(cli_here):
    result = cli_here("anchors", "data.image_size=64", "data.train_size=64")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"│\s+(\d+) │\s+([\d.]+) x ([\d.]+) │\s+([\d.]+) x ([\d.]+) │", result.stdout)
    assert [int(r[0]) for r in rows] == list(range(9))  # yolov3: nine anchors
    kmeans_iou, default_iou = map(float, re.search(r"mean best IoU │\s+([\d.]+) │\s+([\d.]+)", result.stdout).groups())
    assert 0.5 < default_iou <= kmeans_iou <= 1.0
    # The printed anchors are the k-means anchors of the 64 training scenes, and reach the printed IoU.
    from cvlab.data.shapes import ShapesDetection

    boxes = torch.cat(ShapesDetection("train", 64, 64, seed=42).boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    anchors, iou = kmeans_anchors(wh, 9, seed=42)
    assert [(float(r[1]), float(r[2])) for r in rows] == [tuple(round(v, 1) for v in a) for a in anchors.tolist()]
    assert kmeans_iou == pytest.approx(iou, abs=1e-4)
    defaults = torch.tensor([(float(r[3]), float(r[4])) for r in rows])
    assert default_iou == pytest.approx(mean_best_iou(wh, defaults), abs=2e-3)  # defaults printed to 0.1 px
    override = re.search(r"'model\.anchors=(\[.*\])'", result.stdout).group(1)
    assert torch.tensor(json.loads(override)).shape == (9, 2)


def test_cli_predict_writes_coco_results_in_original_pixels_and_drawn_images(trained, coco_root, cli):
    run, _, _ = trained(*PREDICTOR)
    source = coco_root / "val2017"
    result = cli("predict", f"ckpt={run / 'weights' / 'best.ckpt'}", f"source={source}", "conf=0")
    assert result.returncode == 0, result.stderr[-2000:]
    (out,) = (run / "predict").iterdir()
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in predictions)
    assert {p["image_id"] for p in predictions} <= {1, 2, 3, 4}  # the json's ids of the four files
    assert {p["category_id"] for p in predictions} <= set(COCO_CATEGORY_IDS)
    for p in predictions:
        x, y, w, h = p["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 80 + 1e-6 and y + h <= 64 + 1e-6, p
        assert 0 < p["score"] <= 1
    for i in range(len(COCO_VAL)):
        drawn = np.asarray(Image.open(out / f"img{i}.png").convert("RGB"))
        assert drawn.shape == (64, 80, 3)
        has_boxes = any(p["image_id"] == i + 1 for p in predictions)
        assert np.array_equal(drawn, np.asarray(Image.open(source / f"img{i}.png"))) != has_boxes


def test_predict_equals_the_validation_pipeline_mapped_back_and_conf_filters(trained, coco_root, tmp_path):
    run, _, objects = trained(*PREDICTOR)
    overrides = [f"ckpt={run / 'weights' / 'best.ckpt'}", f"source={coco_root / 'val2017'}"]
    everything = run_predict(compose("predict", [*overrides, "conf=0.001", f"paths.output_dir={tmp_path / 'a'}"]))[1]
    everything = everything["predictions"]

    # The model as validated (its config's conf_thresh is 0.001 too) on the dataset's letterboxed image, mapped back.
    image, target = objects["datamodule"].val_set[0]
    with torch.inference_mode():
        detections = objects["task"].model.eval()(image[None])[0]
    boxes = unletterbox_boxes(detections["boxes"], 64, 80, 64)
    inside = ((boxes[:, 2:] - boxes[:, :2]).round(decimals=2) > 0).all(1)
    boxes = boxes[inside]
    mine = [p for p in everything if p["image_id"] == target["image_id"]]
    assert len(mine) == len(boxes) > 0
    xywh = torch.tensor([p["bbox"] for p in mine])
    torch.testing.assert_close(xywh[:, :2], boxes[:, :2], atol=0.01, rtol=0)
    torch.testing.assert_close(xywh[:, 2:], boxes[:, 2:] - boxes[:, :2], atol=0.02, rtol=0)
    scores = torch.tensor([p["score"] for p in mine])
    torch.testing.assert_close(scores, detections["scores"][inside], atol=1e-5, rtol=0)
    assert [p["category_id"] for p in mine] == [COCO_CATEGORY_IDS[k] for k in detections["labels"][inside].tolist()]

    # A threshold halfway between two saved (5-decimal) scores, so no raw score rounds onto it.
    scores = sorted({p["score"] for p in everything})
    median = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    kept = run_predict(compose("predict", [*overrides, f"conf={median}", f"paths.output_dir={tmp_path / 'b'}"]))[1]
    assert kept["predictions"] == [p for p in everything if p["score"] > median]
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == [f"img{i}.png" for i in range(len(COCO_VAL))]


def test_predict_on_a_classification_checkpoint(tmp_path):
    from sklearn.datasets import load_digits

    run = tmp_path / "run"
    _, objects = run_train(compose("train", [*FAST, f"paths.output_dir={run}"]))  # resnet18 on digits
    digits = load_digits()
    source = tmp_path / "digits"
    source.mkdir()
    pixels = [np.round(digits.images[i] * 255 / 16).astype(np.uint8) for i in range(3)]
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(source / f"{i}.png")
    _, result = run_predict(compose("predict", [f"ckpt={run / 'weights' / 'best.ckpt'}", f"source={source}",
                                                "top_k=3", f"paths.output_dir={tmp_path / 'out'}"]))
    model = objects["task"].model.eval()
    batch = (torch.tensor(np.stack(pixels), dtype=torch.float32)[:, None] / 255 - 0.3053) / 0.3761  # digits' stats
    with torch.inference_mode():
        expected = model(batch).softmax(-1).topk(3)
    for i, prediction in enumerate(result["predictions"]):
        assert prediction["image_id"] == i and prediction["file_name"] == f"{i}.png"
        assert [t["label"] for t in prediction["top_k"]] == expected.indices[i].tolist()
        assert [t["class"] for t in prediction["top_k"]] == [str(k) for k in expected.indices[i].tolist()]
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(expected.values[i].tolist(), abs=1e-4)
        assert Image.open(tmp_path / "out" / f"{i}.png").size == (160, 160)  # 8 px enlarged to be readable
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert saved == result["predictions"]


def test_info_counts_a_detector_exactly(tmp_path):
    from cvlab.run.info import run_info

    # 80 COCO-style categories (one annotated image in each of the three splits): YOLOv3-tiny at its release size.
    root = tmp_path / "coco80"
    for split in ("train2017", "val2017", "test2017"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "a.png")
    (root / "annotations").mkdir()
    payload = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "iscrowd": 0}],
               "categories": [{"id": k + 1, "name": f"class{k}"} for k in range(80)]}
    for split in ("train2017", "val2017", "test2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    cfg = compose("train", ["task=detection", "model=yolov3_tiny", "data=coco", f"data.root={root}",
                            "data.image_size=416", "data.num_workers=0"])
    summary = run_info(cfg)
    assert summary["params"] == 8_852_366  # yolov3-tiny.cfg
    assert summary["flops"] == 5_564_961_792  # Darknet: 5.56 Bn
    assert sum(row[1] for row in summary["stages"]) == summary["params"]


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_cli_trains_yolov3_on_a_zoo_backbone(cli, tmp_path):
    from cvlab.models import create_model

    result = cli("train", "model=yolov3", "model.backbone=resnet50", "trainer=debug", "logger=none",
                 "data.image_size=64", "data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
                 "~callbacks.progress_bar", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics_file,) = (tmp_path / "runs" / "detection" / "yolov3").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert {"val/map_50", "test/map_50"} <= set(metrics)
    with torch.device("meta"):
        expected = create_model("yolov3", num_classes=len(SHAPE_CLASSES), image_size=64, backbone="resnet50")
        paper = create_model("yolov3", num_classes=len(SHAPE_CLASSES), image_size=64)
    assert metrics["params"] == sum(p.numel() for p in expected.parameters())
    assert metrics["params"] != sum(p.numel() for p in paper.parameters())  # the backbone option took effect
