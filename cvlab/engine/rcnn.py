"""`cvlab train model=rcnn`: R-CNN (Girshick, Donahue, Darrell & Malik 2014) as six stages of the engine's stage
runner (:func:`~cvlab.engine.stages.run_stages`), each in its own folder of the run directory:

1. ``proposals``: selective search (fast mode; :mod:`cvlab.data.proposals`, cached on disk across runs) on every image
   of the three splits; their boxes and ground truth, in the pixels of the letterboxed images, as ``.npy``
   (:class:`~cvlab.data.regions.SplitBoxes`). It also times selective search itself, uncached, on the first
   ``timing_images`` test images, and counts how many test objects a proposal covers at IoU 0.5 (the recall that
   bounds every later stage).
2. ``finetune``: the zoo CNN (``model.backbone``) fine-tuned as a ``K + 1``-way classifier of warped windows, 32
   positive (IoU >= 0.5) and 96 background a batch (:class:`~cvlab.data.regions.RegionDataModule`): an ordinary
   classification run (:func:`~cvlab.engine.training.run_train`: progress bar, weights/, results.csv, metrics.json),
   its best epoch chosen by the validation windows' accuracy.
3. ``features``: the fine-tuned CNN's penultimate features of every window (ground truth and proposals) of the first
   ``features.images`` training images, with each window's IoU with the objects, as ``.npy`` files written in place
   (``numpy.lib.format.open_memmap``) and read back memory-mapped, never pickled.
4. ``svms``: one linear SVM per class (``sklearn.svm.LinearSVC``: L1 hinge loss, C = 0.001, positives weighted 2,
   bias feature 10, as liblinear in the released code), positives the ground-truth boxes, negatives the windows
   below IoU 0.3 with every object of the class, with hard-negative mining: the SVM is trained on the positives and
   2,000 random negatives, then each round adds every negative inside the margin (score > -1) and drops those far
   outside it (< -1.2) and trains again, until a round adds none or ``svm.rounds`` are done.
5. ``box_regression``: one ridge regressor per class (``sklearn.linear_model.Ridge``, alpha = lambda = 1000) from the
   features of the proposals with IoU >= 0.6 to their object to its ``(t_x, t_y, t_w, t_h)``; the targets are
   centred and whitened first, as in the released code.
6. ``test``: the assembled detector (:class:`~cvlab.models.detectors.rcnn.RCNN`: CNN, SVMs and regressors as linear
   layers, per-class NMS at 0.3) as a detection checkpoint (``test/weights/best.ckpt``: ``cvlab eval`` and ``cvlab
   predict`` restore it), scored on val and test by the detection task's COCO mAP, with its per-class AP table and
   PR curves, and its test time per image split into selective search and the network.

The run directory's ``metrics.json`` holds the test stage's figures, the fine-tuning accuracy, each stage's time
(``time/<stage>_s``) and the training time (every stage but ``test``). Features are the CNN's input to its classifier
for SVMs and regressors alike, scaled to R-CNN's mean norm of 20. A killed run resumes: run the same command again
with ``hydra.run.dir=<its run directory>``, and the finished stages are skipped.

Fine-tuning length: ``trainer.max_epochs`` when given, else ``model.pipeline.finetune.epochs``; an epoch is
``finetune.batches_per_epoch`` batches (the windows are drawn anew for every batch, so no epoch sees them all).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cvlab.data.regions import RegionDataModule, SplitBoxes
from cvlab.engine.builders import build_datamodule, build_task, quiet_trainer
from cvlab.engine.runs import output_dir, quiet_lightning, say_run_dir, write_json
from cvlab.engine.stages import Column, Stage, StageContext, refuse_resume, run_stages
from cvlab.engine.training import evaluate, finish_run, register_pipeline, run_train
from cvlab.tasks.base import MODEL_META_KEYS, build_model, to_plain
from cvlab.utils.config import read_option
from cvlab.utils.console import console
from cvlab.utils.errors import UserError, suggest
from cvlab.utils.validate import check_number

SPLITS = ("train", "val", "test")
FEATURE_NORM = 20.0  # the released code's feat_norm_mean: features are scaled to this mean L2 norm
INITIAL_NEGATIVES = 2000  # the first SVM's negatives (the released code retrains after every 2,000 new ones)
EASY_SCORE = -1.2  # cached negatives scoring below this leave the cache (the released code's evict threshold)
MIN_REGRESSION_SAMPLES = 4  # a class with fewer proposals near its objects keeps its boxes unregressed
FEATURE_FILES = ("features", "image_index", "windows", "gt_label", "overlaps", "matched_boxes", "matched_label",
                 "matched_iou")
COLUMNS = (Column("result", "result", justify="left"), Column("time_s", "time (s)", "{:.1f}"))
LOADER_KEYS = ("batch_size", "num_workers")  # data keys that change how fast a stage runs, not what it computes

# model.pipeline's keys and their checks: (low, high, integer, optional); None bounds are open.
SETTINGS = {
    "finetune": {"epochs": (1, None, True, False), "batches_per_epoch": (1, None, True, False),
                 "positives": (0, None, True, False), "background": (0, None, True, False),
                 "fg_iou": (0, 1, False, False), "eval_batches": (1, None, True, False)},
    "features": {"images": (1, None, True, True)},
    "svm": {"C": (0, None, False, False), "positive_weight": (0, None, False, False), "bg_iou": (0, 1, False, False),
            "rounds": (0, None, True, False), "hard_score": (None, None, False, False),
            "max_iter": (1, None, True, False)},
    "box_regression": {"alpha": (0, None, False, False), "min_iou": (0, 1, False, False)},
    "timing_images": (0, None, True, False),
}


def check_settings(pipeline: dict) -> dict:
    """``model.pipeline`` checked against :data:`SETTINGS` (every key present, known and in range)."""
    def check(node: dict, rules: dict, prefix: str) -> None:
        for key in node:
            if key not in rules:
                raise UserError(f"unknown key {prefix}.{key}.{suggest(key, rules)} Keys: {', '.join(rules)}.")
        for key, rule in rules.items():
            if key not in node:
                raise UserError(f"{prefix}.{key} is missing (conf/model/rcnn.yaml lists every setting).")
            if isinstance(rule, dict):
                if not isinstance(node[key], dict):
                    raise UserError(f"{prefix}.{key} holds settings ({', '.join(rule)}), got {node[key]!r}.")
                check(node[key], rule, f"{prefix}.{key}")
            else:
                low, high, integer, optional = rule
                check_number(f"{prefix}.{key}", node[key], low, high, integer=integer, optional=optional,
                             low_open=low == 0 and not integer)
    check({key: value for key, value in pipeline.items() if key != "name"}, SETTINGS, "model.pipeline")
    if pipeline["finetune"]["positives"] + pipeline["finetune"]["background"] < 2:
        raise UserError("model.pipeline.finetune.positives + background must make batches of at least 2 windows.")
    return pipeline


# ------------------------------------------------------------------------------------------------- configs
def detector_config(cfg: DictConfig) -> dict:
    """The assembled detector's model config (what its checkpoint rebuilds it from): the model without ``pipeline``."""
    return {key: value for key, value in to_plain(cfg.model).items() if key != "pipeline"}


def data_view(plain: dict) -> dict:
    """The run's data config with augmentation off: R-CNN's stages read the images as evaluation does."""
    return {**plain["data"], "augment": False}


def data_identity(view: dict) -> dict:
    """What of a data config the boxes, windows and features depend on: all but how its loaders batch."""
    return {key: value for key, value in view.items() if key not in LOADER_KEYS}


def finetune_config(cfg: DictConfig, pipeline: dict) -> DictConfig:
    """The fine-tuning stage's train config: the run's groups, the backbone as a classification model with its
    ``backbone_args`` (and the meta keys of its own yaml, e.g. ViT's ``adam_lr``), the classification task and the
    warped windows of the run's data (the proposals stage's boxes)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    model = plain["model"]
    backbone = str(OmegaConf.select(cfg, "model.backbone"))
    own = read_option("model", backbone)
    tune = pipeline["finetune"]
    given = not OmegaConf.is_interpolation(cfg.trainer, "max_epochs")
    plain.update(
        task=read_option("task", "classification"),
        model={**{key: own[key] for key in MODEL_META_KEYS if key in own}, **(model.get("backbone_args") or {})},
        data={"_target_": "cvlab.data.regions.RegionDataModule", "_recursive_": False, "_convert_": "all",
              "name": f"{plain['data'].get('name', 'detection')} regions",
              "detection": {key: value for key, value in data_view(plain).items() if key != "batch_size"},
              "boxes_dir": "${paths.output_dir}/../proposals", "warp_size": model["warp_size"],
              "context": model["context"], "fg_iou": tune["fg_iou"], "positives": tune["positives"],
              "background": tune["background"], "batches_per_epoch": tune["batches_per_epoch"],
              "eval_batches": tune["eval_batches"], "num_workers": plain["data"].get("num_workers", 0),
              "seed": "${seed}"},
        resume=None)
    plain["trainer"]["max_epochs"] = int(cfg.trainer.max_epochs) if given else int(tune["epochs"])
    return OmegaConf.create(plain)


def stage_config(cfg: DictConfig, *groups: str, **replaced) -> DictConfig:
    """A stage's config: the run's ``groups`` (unresolved) and ``replaced`` ones; what its result depends on."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    return OmegaConf.create({"seed": plain["seed"], "paths": plain["paths"],
                             **{group: plain.get(group) for group in groups}, **replaced})


def build_detector(cfg: DictConfig, num_classes: int, image_size: int):
    """The run's R-CNN detector, unassembled, with the run's layer factories."""
    plain = {group: to_plain(cfg.get(group)) for group in ("norm", "activation", "attention", "init")}
    return build_model(detector_config(cfg), plain["norm"] or {"name": "default"},
                       plain["activation"] or {"name": "default"}, plain["attention"] or {"name": "none"},
                       plain["init"] or {"name": "default"}, num_classes=num_classes, image_size=image_size)


def load_cnn(detector, classifier: torch.nn.Module) -> None:
    """The fine-tuned classifier's weights into ``detector.cnn``, all but its (K + 1)-way classifying layer."""
    prefix = detector.classifier_path + "."
    detector.cnn.load_state_dict({key: value for key, value in classifier.state_dict().items()
                                  if not key.startswith(prefix)})


# ------------------------------------------------------------------------------------------------- features
@dataclass
class RegionFeatures:
    """The windows of the SVM and regressor training images, one row each: ``features`` ``[R, D]`` (unscaled),
    ``image_index`` ``[R]``, ``windows`` ``[R, 4]``, ``gt_label`` ``[R]`` (the class of a ground-truth window, -1 for
    a proposal), ``overlaps`` ``[R, K]`` (best IoU with the objects of each class), and the best-matching object of
    any class (``matched_boxes`` ``[R, 4]``, ``matched_label``, ``matched_iou``; -1 / 0 in an image without any)."""

    features: np.ndarray
    image_index: np.ndarray
    windows: np.ndarray
    gt_label: np.ndarray
    overlaps: np.ndarray
    matched_boxes: np.ndarray
    matched_label: np.ndarray
    matched_iou: np.ndarray

    @property
    def scale(self) -> float:
        """The factor that gives the features R-CNN's mean L2 norm of :data:`FEATURE_NORM`."""
        norms = [np.linalg.norm(self.features[start:start + 65536], axis=1) for start in
                 range(0, len(self.features), 65536)]
        mean = float(np.concatenate(norms).mean()) if norms else 0.0
        return FEATURE_NORM / mean if mean > 0 else 1.0

    def scaled(self, rows: np.ndarray, scale: float) -> np.ndarray:
        return np.asarray(self.features[rows], dtype=np.float64) * scale

    @classmethod
    def load(cls, directory: Path) -> "RegionFeatures":
        try:
            return cls(**{name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                          for name in FEATURE_FILES})
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the features in {directory} ({error}); delete its stage.json to compute "
                            "them again") from None


def extract_features(detector, dataset, boxes: SplitBoxes, images: int, num_classes: int, directory: Path
                     ) -> RegionFeatures:
    """Writes the :class:`RegionFeatures` of the first ``images`` items of ``dataset`` (its windows from
    ``boxes``) into ``directory``, row by row into memory-mapped ``.npy`` files, and returns them read back."""
    from rich.progress import Progress
    from torchvision.ops import box_iou

    counts = boxes.gt_counts[:images] + boxes.proposal_counts[:images]
    total = int(counts.sum())
    shapes = {"features": ((total, detector.num_features), np.float32), "image_index": ((total,), np.int64),
              "windows": ((total, 4), np.float32), "gt_label": ((total,), np.int64),
              "overlaps": ((total, num_classes), np.float32), "matched_boxes": ((total, 4), np.float32),
              "matched_label": ((total,), np.int64), "matched_iou": ((total,), np.float32)}
    arrays = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
              for name, (shape, dtype) in shapes.items()}
    row = 0
    detector.eval()
    with Progress(console=console, transient=True) as progress, torch.inference_mode():
        bar = progress.add_task("features", total=images)
        for index in range(images):
            image, _ = dataset[index]
            proposals, gt_boxes, gt_labels = boxes.image(index)
            windows = torch.cat([gt_boxes, proposals])
            end = row + len(windows)
            arrays["features"][row:end] = detector.region_features(image, windows).numpy()
            arrays["image_index"][row:end] = index
            arrays["windows"][row:end] = windows.numpy()
            arrays["gt_label"][row:end] = np.concatenate([gt_labels.numpy(), np.full(len(proposals), -1)])
            if len(gt_boxes):
                iou = box_iou(windows, gt_boxes)  # [W, M]
                per_class = torch.zeros(len(windows), num_classes)
                for label in gt_labels.unique():
                    per_class[:, label] = iou[:, gt_labels == label].max(dim=1).values
                best, match = iou.max(dim=1)
                arrays["overlaps"][row:end] = per_class.numpy()
                arrays["matched_boxes"][row:end] = gt_boxes[match].numpy()
                arrays["matched_label"][row:end] = gt_labels[match].numpy()
                arrays["matched_iou"][row:end] = best.numpy()
            else:
                arrays["overlaps"][row:end] = 0
                arrays["matched_boxes"][row:end] = 0
                arrays["matched_label"][row:end] = -1
                arrays["matched_iou"][row:end] = 0
            row = end
            progress.advance(bar)
    for array in arrays.values():
        array.flush()
    del arrays
    return RegionFeatures.load(directory)


# ------------------------------------------------------------------------------------------------- SVMs
def _scores(regions: RegionFeatures, rows: np.ndarray, scale: float, weight: np.ndarray, bias: float) -> np.ndarray:
    """SVM scores of ``rows``, 65,536 at a time (the features stay on disk)."""
    parts = [regions.scaled(rows[start:start + 65536], scale) @ weight + bias for start in range(0, len(rows), 65536)]
    return np.concatenate(parts) if parts else np.zeros(0)


def mine_class_svm(regions: RegionFeatures, label: int, scale: float, svm: dict, seed: int
                   ) -> tuple[np.ndarray, float, dict]:
    """One class's SVM with hard-negative mining (see the module docstring): ``(weight [D], bias, record)``; the
    record holds the positives, the final negative cache (``negatives``, row indices) and each round's additions."""
    from sklearn.svm import LinearSVC

    positives = np.flatnonzero(regions.gt_label == label)
    pool = np.flatnonzero(regions.overlaps[:, label] < svm["bg_iou"])
    rng = np.random.default_rng(seed + label)
    cache = np.sort(rng.choice(pool, size=min(len(pool), INITIAL_NEGATIVES), replace=False))
    added = []
    dimension = regions.features.shape[1]

    def fit(negatives: np.ndarray) -> tuple[np.ndarray, float]:
        if not len(positives) or not len(negatives):  # nothing to separate: the class never scores
            return np.zeros(dimension), -1.0
        rows = np.concatenate([positives, negatives])
        targets = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
        model = LinearSVC(C=svm["C"], loss="hinge", class_weight={1: svm["positive_weight"], 0: 1.0},
                          intercept_scaling=10.0, max_iter=svm["max_iter"], random_state=seed)
        model.fit(regions.scaled(rows, scale), targets)
        return model.coef_[0].astype(np.float64), float(model.intercept_[0])

    weight, bias = fit(cache)
    for _ in range(svm["rounds"]):
        scores = _scores(regions, pool, scale, weight, bias)
        hard = np.setdiff1d(pool[scores > svm["hard_score"]], cache)
        added.append(int(len(hard)))
        if not len(hard):
            break
        kept = cache[_scores(regions, cache, scale, weight, bias) >= EASY_SCORE]
        cache = np.union1d(kept, hard)
        weight, bias = fit(cache)
    return weight, bias, {"positives": int(len(positives)), "negatives": cache, "pool": int(len(pool)),
                          "added": added}


def fit_svms(regions: RegionFeatures, num_classes: int, scale: float, svm: dict, seed: int
             ) -> tuple[np.ndarray, np.ndarray, list]:
    """Every class's SVM on the features times ``scale``: ``(weight [K, D], bias [K], records)``."""
    weights, biases, records = [], [], []
    for label in range(num_classes):
        weight, bias, record = mine_class_svm(regions, label, scale, svm, seed)
        weights.append(weight)
        biases.append(bias)
        records.append(record)
    return np.stack(weights).astype(np.float32), np.asarray(biases, dtype=np.float32), records


# ------------------------------------------------------------------------------------------------- box regression
def regression_targets(boxes: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """R-CNN's ``(t_x, t_y, t_w, t_h)`` of objects ``boxes`` from ``proposals`` (``[N, 4]`` xyxy each)."""
    from cvlab.ops.box_coder import BoxCoder

    return BoxCoder().encode(torch.from_numpy(np.asarray(boxes, np.float64)),
                             torch.from_numpy(np.asarray(proposals, np.float64))).numpy()


def fit_class_regressor(features: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge from ``features [N, D]`` to ``targets [N, 4]``, centred and whitened as the released code does
    (``T = V diag(1 / sqrt(d + 0.001)) V^T`` of the targets' covariance), folded back into one affine map:
    ``(weight [4, D], bias [4])`` with ``targets ~= features @ weight.T + bias``."""
    from sklearn.linear_model import Ridge

    mean = targets.mean(axis=0)
    centred = targets - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    whiten = vectors @ np.diag(1 / np.sqrt(values + 1e-3)) @ vectors.T
    unwhiten = vectors @ np.diag(np.sqrt(values + 1e-3)) @ vectors.T
    ridge = Ridge(alpha=alpha).fit(features, centred @ whiten)
    return unwhiten @ ridge.coef_, ridge.intercept_ @ unwhiten + mean


def fit_box_regressors(regions: RegionFeatures, num_classes: int, scale: float, settings: dict
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every class's regressor as ``(weight [4K, D], bias [4K], record)``: from the proposals (not the ground-truth
    windows) whose best IoU is >= ``min_iou`` with an object of that class. The record has the samples per class and
    their mean IoU with their objects before and after regression."""
    from torchvision.ops import box_iou

    from cvlab.ops.box_coder import BoxCoder

    dimension = regions.features.shape[1]
    weight = np.zeros((num_classes, 4, dimension), np.float32)
    bias = np.zeros((num_classes, 4), np.float32)
    samples, before, after = [], [], []
    for label in range(num_classes):
        rows = np.flatnonzero((regions.gt_label < 0) & (regions.matched_label == label)
                              & (regions.matched_iou >= settings["min_iou"]))
        samples.append(int(len(rows)))
        if len(rows) < MIN_REGRESSION_SAMPLES:
            continue
        features = regions.scaled(rows, scale)
        objects, proposals = np.asarray(regions.matched_boxes[rows]), np.asarray(regions.windows[rows])
        weight[label], bias[label] = fit_class_regressor(features, regression_targets(objects, proposals),
                                                         settings["alpha"])
        moved = BoxCoder().decode(torch.from_numpy(features @ weight[label].T.astype(np.float64) + bias[label]),
                                  torch.from_numpy(proposals.astype(np.float64)))
        objects = torch.from_numpy(objects.astype(np.float64))
        before.append(box_iou(torch.from_numpy(proposals.astype(np.float64)), objects).diagonal().numpy())
        after.append(box_iou(moved, objects).diagonal().numpy())
    record = {"samples": samples,
              "iou_before": float(np.concatenate(before).mean()) if before else None,
              "iou_after": float(np.concatenate(after).mean()) if after else None}
    return weight.reshape(4 * num_classes, dimension), bias.reshape(-1), record


# ------------------------------------------------------------------------------------------------- the pipeline
def _timed(function):
    """A stage function that also records its wall time (``time_s``) in its row."""
    def run(context: StageContext):
        started = time.perf_counter()
        metrics, output = function(context)
        return {**metrics, "time_s": round(time.perf_counter() - started, 2)}, output

    return run


def _load_boxes(context: StageContext) -> dict[str, SplitBoxes]:
    return {split: SplitBoxes.load(context.out_dir, split) for split in SPLITS}


def _load_arrays(*names: str):
    def restore(context: StageContext) -> tuple[np.ndarray, ...]:
        try:
            return tuple(np.load(context.out_dir / f"{name}.npy", allow_pickle=False) for name in names)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {context.out_dir} ({error}); delete its stage.json to run it again") from None

    return restore


def proposal_recall(boxes: SplitBoxes, iou: float = 0.5) -> float | None:
    """The fraction of objects that some proposal of their image overlaps by IoU >= ``iou``."""
    from torchvision.ops import box_iou

    covered, objects = 0, 0
    for index in range(len(boxes)):
        proposals, gt_boxes, _ = boxes.image(index)
        objects += len(gt_boxes)
        if len(gt_boxes) and len(proposals):
            covered += int((box_iou(gt_boxes, proposals).max(dim=1).values >= iou).sum())
    return covered / objects if objects else None


@register_pipeline("rcnn")
def run_rcnn(cfg: DictConfig) -> tuple[dict, dict]:
    """Runs R-CNN's stages per ``cfg`` (see the module docstring); returns (the run's metrics, {"task": the
    assembled detector's task when the test stage ran or had to be restored, "stages": {name: StageResult}})."""
    from cvlab.data.proposals import WithProposals
    from cvlab.ops.proposals import compute_proposals

    quiet_lightning()
    out = output_dir(cfg)
    refuse_resume(cfg, "model=rcnn", "runs/detection/rcnn/<time>")
    pipeline = check_settings(to_plain(cfg.model.pipeline))
    RegionDataModule.check_sampler(to_plain(cfg.get("sampler")))
    seed = int(cfg.seed)
    with torch.device("meta"):  # the detector's settings are checked before the first stage
        build_detector(cfg, 1, int(cfg.data.image_size))
    say_run_dir(out, "start")
    if cfg.data.get("augment"):
        console.print("R-CNN reads every image as evaluation does (its windows are the variation): data.augment and "
                      "its flips, jitter and colour do not apply.", style="dim", highlight=False)
    plain = OmegaConf.to_container(cfg, resolve=False)
    detector_model = detector_config(cfg)
    view = data_view(plain)

    reading = stage_config(cfg, data=view)  # the data the stages before the test read, loaders as configured

    def proposals(context: StageContext):
        datamodule = build_datamodule(reading)
        settings = datamodule.attach_proposals(detector_model["proposals"])
        boxes = {}
        for split, dataset in zip(SPLITS, (datamodule.train_set, datamodule.val_set, datamodule.test_set)):
            boxes[split] = SplitBoxes.collect(dataset)
            boxes[split].save(context.out_dir, split)
        test: WithProposals = datamodule.test_set
        seconds = []
        for index in range(min(pipeline["timing_images"], len(test))):
            image = test.image(index)
            started = time.perf_counter()
            compute_proposals(image, settings)
            seconds.append(time.perf_counter() - started)
        per_image = {split: float(np.mean(boxes[split].proposal_counts)) if len(boxes[split]) else 0.0
                     for split in SPLITS}
        recall = proposal_recall(boxes["test"])
        metrics = {"proposals_per_image": per_image, "test_recall_50": recall,
                   "proposal_s_per_image": float(np.mean(seconds)) if seconds else None,
                   "result": f"{per_image['train']:.0f} proposals a training image, test recall@0.5 "
                             + (f"{recall:.3f}" if recall is not None else "-")
                             + (f", {np.mean(seconds):.3f} s an image" if seconds else "")}
        return metrics, boxes

    def finetune(context: StageContext):
        metrics, objects = run_train(context.config)
        keys = ("val/acc", "test/acc", "val/f1", "test/f1", "epochs", "train_time_s", "params")
        row = {key: metrics[key] for key in keys if key in metrics}
        row["result"] = f"val window acc {metrics.get('val/acc', float('nan')):.3f}"
        return row, objects["task"]

    def features(context: StageContext):
        boxes = context.output("proposals")["train"]
        classifier = context.output("finetune")
        datamodule = build_datamodule(reading)
        info = datamodule.info
        detector = build_detector(cfg, info.num_classes, info.image_size)
        load_cnn(detector, classifier.model)
        images = min(pipeline["features"]["images"] or len(boxes), len(boxes))
        regions = extract_features(detector, datamodule.train_set, boxes, images, info.num_classes, context.out_dir)
        rows, dimension = regions.features.shape
        return {"images": images, "windows": rows, "dimension": dimension, "feature_scale": regions.scale,
                "result": f"{rows:,} windows of {images} images x {dimension}"}, regions

    def svms(context: StageContext):
        regions = context.output("features")
        weight, bias, records = fit_svms(regions, regions.overlaps.shape[1],
                                         context.metrics("features")["feature_scale"], pipeline["svm"], seed)
        np.save(context.out_dir / "weight.npy", weight, allow_pickle=False)
        np.save(context.out_dir / "bias.npy", bias, allow_pickle=False)
        added = [sum(record["added"]) for record in records]
        metrics = {"positives": [record["positives"] for record in records],
                   "negatives": [len(record["negatives"]) for record in records],
                   "hard_negatives_added": added, "rounds": [len(record["added"]) for record in records],
                   "result": f"{len(records)} SVMs, {sum(added):,} hard negatives mined"}
        return metrics, (weight, bias)

    def box_regression(context: StageContext):
        regions = context.output("features")
        weight, bias, record = fit_box_regressors(regions, regions.overlaps.shape[1],
                                                  context.metrics("features")["feature_scale"],
                                                  pipeline["box_regression"])
        np.save(context.out_dir / "weight.npy", weight, allow_pickle=False)
        np.save(context.out_dir / "bias.npy", bias, allow_pickle=False)
        result = (f"train IoU {record['iou_before']:.3f} -> {record['iou_after']:.3f}" if record["iou_after"]
                  is not None else "no class has proposals to regress")
        return {**record, "result": result}, (weight, bias)

    def test(context: StageContext):
        return test_detector(context, cfg, detector_model, pipeline)

    data = {"data": data_identity(view), "seed": seed}
    cnn = {key: detector_model[key] for key in ("backbone", "backbone_args", "warp_size", "context")}
    layers = {group: to_plain(cfg.get(group)) for group in ("norm", "activation", "attention", "init")}
    stages = [
        Stage("proposals", _timed(proposals),
              params={**data, "proposals": detector_model["proposals"], "timing_images": pipeline["timing_images"]},
              title=f"proposals: selective search ({detector_model['proposals'].get('mode', 'fast')})",
              restore=_load_boxes),
        Stage("finetune", _timed(finetune), needs=("proposals",), config=finetune_config(cfg, pipeline),
              title=f"fine-tuning {detector_model['backbone']} on warped windows"),
        Stage("features", _timed(features), needs=("proposals", "finetune"),
              params={**data, **pipeline["features"], "model": cnn, **layers},
              title="features of the training windows",
              restore=lambda context: RegionFeatures.load(context.out_dir)),
        Stage("svms", _timed(svms), needs=("features",), params=pipeline["svm"], title="one linear SVM per class",
              restore=_load_arrays("weight", "bias")),
        Stage("box_regression", _timed(box_regression), needs=("features",), params=pipeline["box_regression"],
              title="box regression (ridge per class)", restore=_load_arrays("weight", "bias")),
        Stage("test", _timed(test), needs=("finetune", "svms", "box_regression"),
              config=stage_config(cfg, "optimizer", "scheduler", "loss", "norm", "activation", "attention", "init",
                                  "trainer", "task", data=view, model=detector_model),
              params={"timing_images": pipeline["timing_images"]}, title="assembled detector on val and test"),
    ]
    results = run_stages(stages, out, COLUMNS, title=f"R-CNN ({detector_model['backbone']}) on {cfg.data.name}")
    return finish_pipeline(out, results)


def test_detector(context: StageContext, cfg: DictConfig, detector_model: dict, pipeline: dict):
    """The test stage: assembles the detector into a detection task, scores it, times it, saves its checkpoint."""
    from cvlab.callbacks.checkpoint import keep_weights_only

    stage_cfg = context.config
    datamodule = build_datamodule(stage_cfg)
    task = build_task(stage_cfg, datamodule)  # attaches the (cached) proposals to every split
    detector = task.model
    load_cnn(detector, context.output("finetune").model)
    scale = context.metrics("features")["feature_scale"]
    svm_weight, svm_bias = context.output("svms")
    box_weight, box_bias = context.output("box_regression")
    with torch.no_grad():
        detector.feature_scale.fill_(scale)
        detector.svm.weight.copy_(torch.from_numpy(svm_weight))
        detector.svm.bias.copy_(torch.from_numpy(svm_bias))
        detector.box_regressor.weight.copy_(torch.from_numpy(box_weight))
        detector.box_regressor.bias.copy_(torch.from_numpy(box_bias))
    # A save killed half-way is no risk: the stage has no record yet, and a rerun starts it from an empty folder.
    trainer = quiet_trainer(stage_cfg.trainer, context.out_dir)
    metrics = evaluate(trainer, task, datamodule, "val")
    metrics.update(evaluate(trainer, task, datamodule, "test"))
    ckpt = context.out_dir / "weights" / "best.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)
    monitor = str(stage_cfg.task.monitor)  # the detection task's (val/fitness), as a trained detector's best.ckpt
    keep_weights_only(ckpt, monitor, str(stage_cfg.task.mode), metrics.get(monitor))

    test_set = datamodule.test_set
    seconds = []
    detector.eval()
    with torch.inference_mode():
        for index in range(min(pipeline["timing_images"], len(test_set))):
            image, target = test_set[index]
            started = time.perf_counter()
            detector(image[None].to(detector.feature_scale.device), proposals=[target["proposals"]])
            seconds.append(time.perf_counter() - started)
    proposal_seconds = (context.metrics("proposals") or {}).get("proposal_s_per_image")
    metrics.update({"test/network_s_per_image": float(np.mean(seconds)) if seconds else None,
                    "test/proposal_s_per_image": proposal_seconds,
                    "params": sum(p.numel() for p in detector.parameters())})
    finish_run(task, context.out_dir, "metrics.json", metrics, title=f"R-CNN on {stage_cfg.data.name}",
               extra={"best_ckpt": str(ckpt)})
    result = f"test mAP@0.5 {metrics.get('test/map_50', float('nan')):.4f}, mAP {metrics.get('test/map', 0):.4f}"
    return {**metrics, "best_ckpt": str(ckpt), "result": result}, task


def finish_pipeline(out: Path, results: dict) -> tuple[dict, dict]:
    """The run directory's metrics.json: the test stage's figures (and its per-class APs), the fine-tuning
    accuracy, each stage's time and the training time."""
    import json

    tested = results["test"].metrics
    metrics = {key: value for key, value in tested.items() if key not in ("result", "time_s")}
    for key in ("val/acc", "test/acc"):
        if key in results["finetune"].metrics:
            metrics[f"finetune/{key}"] = results["finetune"].metrics[key]
    times = {f"time/{name}_s": result.metrics.get("time_s") for name, result in results.items()}
    metrics.update(times, train_time_s=round(sum(result.metrics.get("time_s") or 0 for name, result in results.items()
                                                 if name != "test"), 2))
    try:
        per_class = {key: value for key, value in json.loads((out / "test" / "metrics.json").read_text()).items()
                     if key in ("ap50_per_class", "ap_per_class")}
    except (OSError, ValueError):
        per_class = {}
    write_json(out / "metrics.json", {**metrics, **per_class})
    console.print(f"the assembled detector: cvlab eval ckpt={tested.get('best_ckpt')}", highlight=False)
    say_run_dir(out, "end")
    return metrics, {"task": results["test"].output, "stages": results}


__all__ = ["RegionFeatures", "check_settings", "extract_features", "fit_box_regressors", "fit_svms",
           "mine_class_svm", "regression_targets", "run_rcnn"]
