"""scripts/bench_ultralytics.py's export, the part that needs no Ultralytics: the files it writes for Ultralytics and
pycocotools hold cvlab's own shapes_det scenes (images, classes, boxes), and its COCOeval helper scores them as
pycocotools does (the training in a venv of its own is the script's business, not a test's)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_ultralytics.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ultralytics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def exported(bench, tmp_path_factory):
    args = bench.parse_args(["--train-size", "6", "--val-size", "4", "--test-size", "3", "--image-size", "64",
                             "--data-dir", str(tmp_path_factory.mktemp("export"))])
    datasets, data = bench.cvlab_splits(args)
    return args.data_dir, bench.export(args.data_dir, datasets, data["class_names"]), datasets, data


def test_the_export_holds_cvlabs_scenes(bench, exported, capsys):
    root, data_yaml, datasets, data = exported
    assert {split: len(d) for split, d in datasets.items()} == {"train": 6, "val": 4, "test": 3}
    assert data["image_size"] == 64 and data["source"] == "shapes_det"
    bench.check_export(root, datasets)  # every pixel and box read back, COCOeval of the truth = 1.0
    assert "COCOeval of the test ground truth as predictions: mAP@0.5 1.000" in capsys.readouterr().out
    image, boxes, labels, image_id = datasets["val"].load(1)
    stem = bench.stem(image_id)
    assert np.array_equal(np.asarray(Image.open(root / "images" / "val" / f"{stem}.png")),
                          image.permute(1, 2, 0).numpy())
    first = (root / "labels" / "val" / f"{stem}.txt").read_text().splitlines()[0].split()
    (x1, y1, x2, y2), height, width = boxes[0].tolist(), *image.shape[-2:]
    assert int(first[0]) == int(labels[0])
    assert [float(v) for v in first[1:]] == pytest.approx(
        [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], abs=1e-6)
    yaml_text = data_yaml.read_text()
    assert "images/train" in yaml_text and all(name in yaml_text for name in data["class_names"])


def test_coco_map_scores_a_shifted_box_below_one(bench, exported):
    root, _, _, _ = exported
    truth = json.loads((root / "annotations" / "test.json").read_text())
    results = [{**ann, "score": 1.0} for ann in truth["annotations"]]
    assert bench.coco_map(root / "annotations" / "test.json", results) == pytest.approx((1.0, 1.0), abs=1e-9)
    x, y, w, h = results[0]["bbox"]
    results[0] = {**results[0], "bbox": [x + w / 2, y, w, h]}  # IoU 1/3 with its object: a miss at every threshold
    map_50, map_ = bench.coco_map(root / "annotations" / "test.json", results)
    assert map_50 < 1.0 and map_ < 1.0
    assert bench.coco_map(root / "annotations" / "test.json", []) == (0.0, 0.0)
