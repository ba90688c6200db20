"""The Ultralytics baseline on cvlab's shapes_det, rerun offline: yolov8n trained from scratch on the very scenes
`cvlab train model=yolov5n` trains on, and scored on the test split with pycocotools, beside cvlab's numbers.

Ultralytics is never a dependency of cvlab: the script installs it into a venv of its own (``--venv``, created with
this interpreter's ``-m venv`` when missing, reused when present) with the torch and torchvision versions cvlab runs,
and runs every Ultralytics step there as a subprocess. The steps:

1. Export: the splits are built through cvlab itself (``cvlab.utils.config.check`` / ``compose`` of
   ``train model=yolov5n``, completed as the CLI does, then ``cvlab.engine.build_datamodule``), so they are the
   splits cvlab trains, validates and tests on (2,000 / 200 / 200 scenes at 128 px, seed 42 by default). Each
   dataset's raw items (``dataset.load``: uint8 image, xyxy pixel boxes, before any transform) are written to
   ``--data-dir`` in Ultralytics' layout (``images/<split>/*.png``, ``labels/<split>/*.txt`` of normalised
   ``cls cx cy w h``, ``data.yaml``) and as COCO json (``annotations/val.json``, ``annotations/test.json``; xywh
   boxes, category id = class index + 1, image id = cvlab's, the scene's index in its split, also the file name).
   ``--check-export`` reads the export back, compares every pixel and box with cvlab's dataset and scores the ground
   truth as predictions with COCOeval (mAP 1.0 expected), then stops.
2. Train: ``YOLO("yolov8n.yaml").train(...)``, from scratch (no weights read or downloaded), at Ultralytics'
   defaults but for imgsz / batch / epochs / device=cpu / plots=False / seed, with per-epoch validation. Wall and
   CPU time of the training process (its import, the epochs and the final validation of best.pt) are measured
   around it. Offline: ``YOLO_OFFLINE=1`` (no update check, no telemetry), ``YOLO_AUTOINSTALL=0``, settings
   ``sync=False`` and the integrations off, in a settings folder of the run's own (``YOLO_CONFIG_DIR``), which also
   holds a stand-in ``Arial.ttf``: the dataset check looks that font up unconditionally, and downloads it otherwise.
3. Evaluate best.pt on the test split at conf 0.001, NMS IoU 0.7, max_det 100 (Ultralytics' val thresholds with
   COCO's 100 detections), scored with pycocotools' COCOeval against ``annotations/test.json``. The headline figures
   are those of Ultralytics' validator (``val(split="test", save_json=True)``), whose NMS keeps a box once per class
   above the threshold, as cvlab's evaluation does (``multi_label``); beside them the same thresholds through
   ``predict`` (one class per box, which can score lower: far lower for a weak model) and Ultralytics' own metric on the
   validator's detections. The val figures of Ultralytics' results.csv (the last epoch and the best) come last.
4. ``--predict-timing``: one batch-1 ``predict`` pass over the test images (conf 0.25, nothing saved) after a
   warm-up, timed in the venv, to set beside `cvlab predict`.

Everything is printed and written to ``--out-dir``/summary.json (the Ultralytics run is ``--out-dir``/train).
Torch runs ``--threads`` threads (1, as cvlab's benchmark trainings; Ultralytics itself would take
``min(8, cores - 1)``).

Hand-written: the comparison needs the data exported from cvlab and the baseline kept out of cvlab's venv.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python scripts/bench_ultralytics.py --predict-timing
    .venv/bin/python scripts/bench_ultralytics.py --check-export
    .venv/bin/python scripts/bench_ultralytics.py --epochs 1 --train-size 64 --val-size 16 --test-size 16 \\
        --data-dir /tmp/shapes_det_yolo_tiny --out-dir /tmp/ultralytics-bench-tiny
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cvlab.utils.errors import UserError

SPLITS = ("train", "val", "test")
# Pinned so that a rerun installs the Ultralytics of the recorded baseline; torch and torchvision are pinned to
# cvlab's own versions (see ensure_venv).
ULTRALYTICS = "ultralytics==8.4.190"
# COCOeval's stats: [0] mAP@[.5:.95], [1] mAP@0.5.
MAP, MAP_50 = 0, 1

# Run in the venv (python -I: its packages only, whatever PYTHONPATH the caller has); parameters as JSON in argv[1].
# Ultralytics sets torch's threads to its NUM_THREADS (min(8, cores - 1)) in every select_device: set that instead.
TRAIN = """
import json, sys
params = json.loads(sys.argv[1])
from ultralytics import YOLO, settings
from ultralytics.utils import torch_utils
settings.update(sync=False, clearml=False, comet=False, dvc=False, mlflow=False, raytune=False, tensorboard=False,
                wandb=False)
torch_utils.NUM_THREADS = params.pop("threads")
YOLO(params.pop("model")).train(**params)
"""

# The test split twice, at Ultralytics' val thresholds with COCO's 100 detections: its validator (multi-label NMS, as
# Ultralytics' and cvlab's evaluations; COCO json written to <out>/test/predictions.json) and predict (its NMS keeps one
# class per box). Then, with "timing", one timed batch-1 predict pass at predict's default conf. (The validator's
# warning that faster-coco-eval is missing is harmless: the script scores its json with pycocotools.)
EVALUATE = """
import json, statistics, sys, time
from pathlib import Path
params = json.loads(sys.argv[1])
from ultralytics import YOLO
from ultralytics.utils import torch_utils
torch_utils.NUM_THREADS = params["threads"]
model = YOLO(params["weights"])
scoring = dict(imgsz=params["imgsz"], conf=0.001, iou=0.7, max_det=100, device="cpu", verbose=False)
metrics = model.val(data=params["data"], split="test", batch=16, plots=False, save_json=True, project=params["project"],
                    name="test", exist_ok=True, **scoring)
paths = [str(p) for p in sorted(Path(params["images"]).glob("*.png"))]
common = dict(batch=1, save=False, stream=True)
detections = []
for result in model.predict(paths, **scoring, **common):
    boxes = result.boxes
    for (x1, y1, x2, y2), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
        detections.append({"image_id": int(Path(result.path).stem), "category_id": int(cls) + 1,
                           "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
out = {"images": len(paths), "ultralytics_test": {"map_50": metrics.box.map50, "map": metrics.box.map},
       "predict_detections": detections}
if params["timing"]:
    common.update(imgsz=params["imgsz"], conf=0.25, device="cpu", verbose=False)  # predict's default conf
    list(model.predict(paths[:1], **common))  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    speeds = [result.speed for result in model.predict(paths, **common)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out["timing"] = {"images": len(paths), "wall_s": wall, "cpu_s": cpu, "ms_per_image": 1000 * wall / len(paths),
                     **{f"median_{k}_ms": statistics.median(s[k] for s in speeds) for k in speeds[0]}}
Path(params["output"]).write_text(json.dumps(out))
"""


# ----------------------------------------------------------------------------------------------------- export
def cvlab_splits(args: argparse.Namespace) -> tuple[dict, dict]:
    """The three datasets of `cvlab train model=yolov5n` with the sizes, seed and image size given (unset: the
    config's), and the data settings they were built with."""
    from omegaconf import OmegaConf

    from cvlab.cli import complete_task
    from cvlab.engine import build_datamodule
    from cvlab.utils import config

    given = {"data.train_size": args.train_size, "data.val_size": args.val_size, "data.test_size": args.test_size,
             "data.image_size": args.image_size, "seed": args.data_seed}
    overrides = complete_task(["model=yolov5n", *(f"{key}={value}" for key, value in given.items()
                                                  if value is not None)])
    # check() validates the overrides and spells them for Hydra; compose() then builds the config as the run does.
    cfg = config.compose("train", config.check("train", overrides).overrides)
    datamodule = build_datamodule(cfg)
    datasets = dict(zip(SPLITS, (datamodule.train_set, datamodule.val_set, datamodule.test_set)))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    settings = {"overrides": overrides, "source": data["source"], "seed": data["seed"],
                "image_size": data["image_size"], "n_objects": data["n_objects"],
                "class_names": list(datamodule.class_names), **{f"{s}_size": len(d) for s, d in datasets.items()}}
    return datasets, settings


def stem(image_id: int) -> str:
    return f"{image_id:05d}"


def export(root: Path, datasets: dict, class_names: list[str]) -> Path:
    """Writes the datasets' raw items in Ultralytics' layout and COCO json (val, test); returns the data.yaml."""
    for folder in ("images", "labels", "annotations"):  # also Ultralytics' label caches (labels/<split>.cache)
        shutil.rmtree(root / folder, ignore_errors=True)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    for split, dataset in datasets.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        images, annotations = [], []
        for index in range(len(dataset)):
            image, boxes, labels, image_id = dataset.load(index)
            height, width = image.shape[-2:]
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "images" / split / f"{stem(image_id)}.png")
            lines = []
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                lines.append(f"{label} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                             f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0})
            (root / "labels" / split / f"{stem(image_id)}.txt").write_text("".join(lines))
            images.append({"id": image_id, "file_name": f"{stem(image_id)}.png", "width": width, "height": height})
        if split != "train":
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / f"{split}.json").write_text(
                json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(root.resolve()), **{s: f"images/{s}" for s in SPLITS},
                                         "names": dict(enumerate(class_names))}, sort_keys=False))
    return data_yaml


def coco_map(ann_file: Path, detections: list[dict]) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) of COCO results against a COCO ground-truth json (0 for no detections, which
    pycocotools cannot load)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints each step
        truth = COCO(str(ann_file))
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[MAP_50]), float(evaluation.stats[MAP])


def check_export(root: Path, datasets: dict) -> None:
    """Reads the export back: every PNG equals cvlab's raw image, every label file gives cvlab's classes and boxes
    (to 1e-3 px), and each COCO json scored against itself (score 1) gives mAP 1.0. Exits on the first mismatch."""
    boxes_seen, worst = 0, 0.0
    for split, dataset in datasets.items():
        for index in range(len(dataset)):
            image, boxes, labels, image_id = dataset.load(index)
            name = f"{split}/{stem(image_id)}"
            if not np.array_equal(np.asarray(Image.open(root / "images" / f"{name}.png")),
                                  image.permute(1, 2, 0).numpy()):
                raise SystemExit(f"check-export: images/{name}.png differs from cvlab's image")
            text = (root / "labels" / f"{name}.txt").read_text()
            rows = np.array([line.split() for line in text.splitlines()], dtype=np.float64).reshape(-1, 5)
            height, width = image.shape[-2:]
            centre, size = rows[:, 1:3] * (width, height), rows[:, 3:5] * (width, height)
            read = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
            if rows[:, 0].astype(int).tolist() != labels.tolist() or read.shape != tuple(boxes.shape):
                raise SystemExit(f"check-export: labels/{name}.txt has other objects than cvlab's scene")
            if len(read):
                worst = max(worst, float(np.abs(read - boxes.numpy()).max()))
            boxes_seen += len(read)
        if worst > 1e-3:
            raise SystemExit(f"check-export: a box of {split} is {worst:.2g} px off cvlab's")
    image, boxes, labels, image_id = datasets["test"].load(0)
    print(f"check-export: {sum(map(len, datasets.values()))} images and {boxes_seen} boxes equal cvlab's (largest "
          f"box difference {worst:.1e} px); test image {stem(image_id)}: cvlab "
          f"{[(int(c), [round(v) for v in b]) for c, b in zip(labels, boxes.tolist())]} (class, xyxy px), label file:")
    print((root / "labels" / "test" / f"{stem(image_id)}.txt").read_text().rstrip())
    for split in SPLITS[1:]:
        truth = json.loads((root / "annotations" / f"{split}.json").read_text())
        scores = coco_map(root / "annotations" / f"{split}.json",
                          [{**ann, "score": 1.0} for ann in truth["annotations"]])
        print(f"check-export: COCOeval of the {split} ground truth as predictions: mAP@0.5 {scores[0]:.3f}, "
              f"mAP@[.5:.95] {scores[1]:.3f}")
        if min(scores) < 1 - 1e-9:  # COCOeval's means of ones can round to 0.9999999999999999
            raise SystemExit(f"check-export: annotations/{split}.json does not score 1.0 against itself")


# ----------------------------------------------------------------------------------------------- ultralytics
def ensure_venv(venv: Path, spec: str) -> dict:
    """The venv's Ultralytics, torch and torchvision versions, installed first where it lacks them (the venv too,
    when missing; then with ``install_s``, the seconds that took)."""
    python = venv / "bin" / "python"
    query = ("import importlib.metadata as m, json; "
             "print(json.dumps({p: m.version(p) for p in ('ultralytics', 'torch', 'torchvision')}))")
    found = subprocess.run([str(python), "-I", "-c", query], capture_output=True, text=True) \
        if python.exists() else None
    if found is not None and found.returncode == 0:
        return json.loads(found.stdout)
    # The same torch as cvlab, so that both sides of the comparison run one build.
    packages = [spec, f"torch=={metadata.version('torch')}", f"torchvision=={metadata.version('torchvision')}"]
    print(f"installing {' '.join(packages)} into {venv} (torch with its CUDA wheels: ~6 GB, minutes)", flush=True)
    start = time.perf_counter()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--no-input", *packages], check=True)
    versions = json.loads(subprocess.run([str(python), "-I", "-c", query], capture_output=True, text=True,
                                         check=True).stdout)
    return {**versions, "install_s": round(time.perf_counter() - start, 1)}


def offline_env(config_dir: Path, threads: int) -> dict:
    """The environment of the Ultralytics processes: offline, no auto-install, settings in ``config_dir``."""
    font = config_dir / "Ultralytics" / "Arial.ttf"  # Ultralytics' USER_CONFIG_DIR is YOLO_CONFIG_DIR/Ultralytics
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        # check_det_dataset looks the font up on every run (for plots, off here) and downloads it when missing:
        # any TrueType font of that name stops it; matplotlib ships one.
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    env = {key: value for key, value in os.environ.items() if key != "ULTRALYTICS_API_KEY"}  # no Platform upload
    env.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=str(config_dir), OMP_NUM_THREADS=str(threads))
    return env


def run_timed(command: list[str], env: dict) -> tuple[float, float]:
    """Runs ``command`` to the end; (wall s, CPU s of it and its children)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def read_results(results_csv: Path) -> dict:
    """Ultralytics' val figures of its last epoch and of its best (highest mAP50-95: 8.4's fitness, by which it
    keeps best.pt; the first of equals), and the epochs it ran."""
    with results_csv.open() as file:
        rows = [{key.strip(): float(value) for key, value in row.items()} for row in csv.DictReader(file)]

    def figures(row: dict) -> dict:
        return {"epoch": int(row["epoch"]), "map_50": row["metrics/mAP50(B)"], "map": row["metrics/mAP50-95(B)"]}

    best = max(rows, key=lambda row: row["metrics/mAP50-95(B)"])  # max keeps the first of equals
    return {"epochs": len(rows), "last": figures(rows[-1]), "best": figures(best)}


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ultralytics-venv"),
                        help="Ultralytics' own venv, created and installed when missing, else reused as it is "
                             "(default: /tmp/ultralytics-venv)")
    parser.add_argument("--ultralytics", default=ULTRALYTICS, metavar="SPEC",
                        help=f"what pip installs into a new venv (default: {ULTRALYTICS})")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/shapes_det_yolo"),
                        help="where the splits are exported, rewritten every run (default: /tmp/shapes_det_yolo)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/ultralytics-bench"),
                        help="the Ultralytics run (train/), the test detections (test/) and summary.json "
                             "(default: /tmp/ultralytics-bench)")
    parser.add_argument("--check-export", action="store_true",
                        help="verify the export against cvlab's datasets and COCOeval, then stop (no venv needed)")
    data = parser.add_argument_group("data (unset: cvlab's config, data=shapes_det of `cvlab train model=yolov5n`)")
    data.add_argument("--train-size", type=int, help="data.train_size (config: 2000)")
    data.add_argument("--val-size", type=int, help="data.val_size (config: 200)")
    data.add_argument("--test-size", type=int, help="data.test_size (config: the val size)")
    data.add_argument("--image-size", type=int, help="data.image_size, and Ultralytics' imgsz (config: 128)")
    data.add_argument("--data-seed", type=int, help="cvlab's seed, which draws the splits (config: 42)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=13, help="(default: 13)")
    train.add_argument("--batch", type=int, default=16, help="(default: 16, as cvlab's detection runs)")
    train.add_argument("--workers", type=int, default=0,
                       help="dataloader workers (default: 0; Ultralytics uses 0 on the CPU whatever is given)")
    train.add_argument("--seed", type=int, default=0, help="Ultralytics' training seed (default: 0)")
    train.add_argument("--threads", type=int, default=1, help="torch threads of every Ultralytics step (default: 1)")
    parser.add_argument("--predict-timing", action="store_true",
                        help="also time a batch-1 predict pass over the test images (conf 0.25, nothing saved)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        datasets, data = cvlab_splits(args)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    data_yaml = export(args.data_dir, datasets, data["class_names"])
    print(f"exported {data['source']} (seed {data['seed']}, {data['image_size']} px): {data['train_size']} / "
          f"{data['val_size']} / {data['test_size']} train / val / test scenes to {args.data_dir}", flush=True)
    if args.check_export:
        check_export(args.data_dir, datasets)
        return

    versions = ensure_venv(args.venv, args.ultralytics)
    python = str(args.venv / "bin" / "python")
    env = offline_env(args.out_dir / "ultralytics-config", args.threads)
    project = str(args.out_dir.resolve())
    train = {"model": "yolov8n.yaml", "data": str(data_yaml), "imgsz": data["image_size"], "batch": args.batch,
             "epochs": args.epochs, "device": "cpu", "plots": False, "workers": args.workers, "seed": args.seed,
             "project": project, "name": "train", "exist_ok": True, "val": True, "threads": args.threads}
    shutil.rmtree(args.out_dir / "train", ignore_errors=True)  # a clean run folder: nothing left from a former run
    print(f"training yolov8n from scratch with Ultralytics {versions['ultralytics']} (torch {versions['torch']}), "
          f"{args.epochs} epochs, {args.threads} thread(s)", flush=True)
    wall, cpu = run_timed([python, "-I", "-c", TRAIN, json.dumps(train)], env)
    ultralytics_val = read_results(args.out_dir / "train" / "results.csv")

    shutil.rmtree(args.out_dir / "test", ignore_errors=True)
    scratch = args.out_dir / "evaluate.json"
    evaluate = {"weights": str(args.out_dir / "train" / "weights" / "best.pt"), "data": str(data_yaml),
                "images": str(args.data_dir / "images" / "test"), "imgsz": data["image_size"],
                "threads": args.threads, "project": project, "timing": args.predict_timing, "output": str(scratch)}
    subprocess.run([python, "-I", "-c", EVALUATE, json.dumps(evaluate)], env=env, check=True)
    evaluated = json.loads(scratch.read_text())
    scratch.unlink()
    val_json = args.out_dir / "test" / "predictions.json"  # the validator writes none when it detects nothing
    by_validator = json.loads(val_json.read_text()) if val_json.exists() else []
    by_predict = evaluated["predict_detections"]
    (args.out_dir / "test" / "predict_predictions.json").write_text(json.dumps(by_predict))
    truth = args.data_dir / "annotations" / "test.json"
    (map_50, map_), (predict_50, predict_) = coco_map(truth, by_validator), coco_map(truth, by_predict)

    summary = {
        "model": "yolov8n (Ultralytics, from scratch)", "versions": versions, "data": data,
        "train": {k: v for k, v in train.items() if k not in ("model", "data", "project", "name")},
        "epochs": ultralytics_val["epochs"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "test": {"images": evaluated["images"], "scorer": "pycocotools COCOeval, annotations/test.json",
                 "thresholds": {"conf": 0.001, "iou": 0.7, "max_det": 100},
                 "map_50": round(map_50, 4), "map": round(map_, 4), "detections": len(by_validator),
                 "predict": {"map_50": round(predict_50, 4), "map": round(predict_, 4), "detections": len(by_predict)},
                 "ultralytics_metric": {k: round(v, 4) for k, v in evaluated["ultralytics_test"].items()}},
        "ultralytics_val": {"last": ultralytics_val["last"], "best": ultralytics_val["best"]},
    }
    if args.predict_timing:
        summary["predict_timing"] = {k: round(v, 3) for k, v in evaluated["timing"].items()}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report(summary, args.out_dir)


def report(summary: dict, out_dir: Path) -> None:
    """The summary's figures, a few lines."""
    test, last, best = summary["test"], summary["ultralytics_val"]["last"], summary["ultralytics_val"]["best"]
    ultralytics = test["ultralytics_metric"]
    print(f"\nyolov8n from scratch, Ultralytics {summary['versions']['ultralytics']}, {summary['epochs']} epochs: "
          f"wall {summary['wall_s']:.0f} s, CPU {summary['cpu_s']:.0f} s ({summary['train']['threads']} thread(s))")
    print(f"test, {test['images']} images, pycocotools: mAP@0.5 {test['map_50']:.3f}  mAP@[.5:.95] {test['map']:.3f} "
          "(Ultralytics' validator: multi-label NMS, as cvlab's evaluation)")
    print(f"  by predict (one class per box): mAP@0.5 {test['predict']['map_50']:.3f}  mAP@[.5:.95] "
          f"{test['predict']['map']:.3f}; Ultralytics' own metric: mAP50 {ultralytics['map_50']:.3f}  mAP50-95 "
          f"{ultralytics['map']:.3f}")
    print(f"Ultralytics' val (results.csv): last epoch {last['epoch']} mAP50 {last['map_50']:.3f} mAP50-95 "
          f"{last['map']:.3f}; best epoch {best['epoch']} mAP50 {best['map_50']:.3f} mAP50-95 {best['map']:.3f}")
    if "predict_timing" in summary:
        timing = summary["predict_timing"]
        print(f"predict, batch 1: {timing['images']} images in {timing['wall_s']:.2f} s ({timing['ms_per_image']:.1f} "
              f"ms/image, CPU {timing['cpu_s']:.2f} s; median inference {timing['median_inference_ms']:.1f} ms)")
    if "install_s" in summary["versions"]:
        print(f"(Ultralytics installed in {summary['versions']['install_s']:.0f} s)")
    print(f"written: {out_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
