"""COCO-style detection metrics: mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP and precision-recall curves.

A thin layer over ``torchmetrics.detection.MeanAveragePrecision`` (which runs the official COCOeval of
``pycocotools``, or of ``faster_coco_eval`` when that is installed — the two backends torchmetrics 1.9 knows)
that names classes and flattens the result. Boxes are absolute xyxy, as everywhere in cvlab.

The per-class figures and precision-recall curves are not computed by hand: with ``extended_summary=True``
torchmetrics exposes COCOeval's accumulated ``precision`` array ``[T, R, K, A, M]`` (IoU thresholds x 101 recall
points x classes x area ranges x max-detections). A class's AP@[.5:.95] is the mean of its slice (area "all", the
largest max-detections) over the entries COCOeval filled (> -1), as COCOeval's summarize takes it; that is
torchmetrics' ``class_metrics`` figure, which it gets by evaluating the whole data again once per class (4 COCOeval
runs for 3 classes, 81 for COCO's 80), so it stays off. :meth:`DetectionMeanAP.pr_curves` slices the array at one
IoU. That precision is COCO's interpolated one (the best precision at any recall >= r) and is 0 at recall points
the detector never reaches.

:func:`fitness` is one number to choose a checkpoint by: a weighted sum of the summary figures,
``0.1·mAP@0.5 + 0.9·mAP@[.5:.95]`` by default (YOLOv5's ``utils/metrics.py`` ``fitness``, and Ultralytics'
``Metric.fitness`` until 8.3; their precision and recall weigh 0; Ultralytics 8.4 weighs mAP@[.5:.95] alone,
``task.fitness.map_50=0 task.fitness.map=1``).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence

import numpy as np
from torchmetrics.detection import MeanAveragePrecision

# The summary figures of DetectionMeanAP.compute(), logged as <split>/<key>.
SUMMARY_KEYS = ("map", "map_50", "map_75", "mar_100")
FITNESS_WEIGHTS = {"map_50": 0.1, "map": 0.9}
# faster_coco_eval logs each evaluation's summary table at INFO, which a run's logging (Hydra's, at INFO) would print
# at every validation; pycocotools prints it too, and torchmetrics silences that.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def fitness(scores: Mapping[str, float], weights: Mapping[str, float] = FITNESS_WEIGHTS) -> float:
    """``Σ weights[k] · scores[k]`` over the summary figures ``weights`` names (default: YOLOv5's fitness)."""
    return float(sum(weight * scores[key] for key, weight in weights.items()))


def default_backend() -> str:
    """``faster_coco_eval`` (faster, same numbers) when installed, else ``pycocotools``."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


class DetectionMeanAP(MeanAveragePrecision):
    """``MeanAveragePrecision`` (bbox, xyxy, per-class) whose ``compute()`` returns

    ``{"map": float, "map_50": float, "map_75": float, "mar_100": float, "ap_per_class": {name: AP@[.5:.95]},
    "ap50_per_class": {name: AP@.5}}``.

    ``ap_per_class`` and ``ap50_per_class`` hold the classes that have ground truth in the evaluated data (COCO's AP
    is undefined for the others). Update with ``update(preds, targets)``: lists of ``dict(boxes, scores, labels)`` and
    ``dict(boxes, labels)``, one per image. Areas of ground-truth boxes are their ``w * h`` (COCO's area
    ranges only matter for ``map_small``/``medium``/``large``, which are not reported).
    """

    def __init__(self, class_names: Sequence[str], backend: str | None = None, **kwargs):
        super().__init__(box_format="xyxy", iou_type="bbox", class_metrics=False, extended_summary=True,
                         backend=backend or default_backend(), **kwargs)
        self.class_names = tuple(class_names)
        self._raw: dict | None = None
        # COCO scores the top 100 per image by design; an untrained detector exceeding it is expected.
        self.warn_on_many_detections = False

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def compute(self) -> dict:
        raw = super().compute()
        self._raw = raw
        ap_per_class = {name: float(slice_.double().mean()) for name, slice_ in self._class_precision(raw).items()}
        # COCO's AP at one IoU is the mean of its 101-point interpolated precision curve.
        ap50_per_class = {name: float(curve["precision"].mean()) for name, curve in self._curves(raw, 0.5).items()}
        return {"map": float(raw["map"]), "map_50": float(raw["map_50"]), "map_75": float(raw["map_75"]),
                "mar_100": float(raw["mar_100"]), "ap_per_class": ap_per_class, "ap50_per_class": ap50_per_class}

    def _class_precision(self, raw: dict) -> dict:
        """``{class name: Tensor[T, R]}``: COCOeval's precision of each class with ground truth, area "all", the most
        detections. COCOeval fills a class's whole slice when it has ground truth and leaves it -1 otherwise."""
        if "precision" not in raw:  # nothing was evaluated
            return {}
        precision = raw["precision"][..., 0, -1]  # [T, R, K]
        return {self._name(int(c)): precision[..., k] for k, c in enumerate(raw["classes"])
                if bool((precision[..., k] > -1).all())}

    def pr_curves(self, iou: float = 0.5) -> dict[str, dict[str, np.ndarray]]:
        """``{class name: {"recall": float[R], "precision": float[R]}}`` at IoU threshold ``iou``, for the
        classes with ground truth; recall is COCO's 101 points ``0, 0.01, ..., 1``."""
        self.compute()  # cached by torchmetrics until the next update/reset; sets self._raw
        return self._curves(self._raw, iou)

    def _curves(self, raw: dict, iou: float) -> dict[str, dict[str, np.ndarray]]:
        matches = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if len(matches) == 0:
            raise ValueError(f"IoU {iou} is not among the evaluated thresholds {self.iou_thresholds}")
        recall = np.asarray(self.rec_thresholds, dtype=np.float64)
        return {name: {"recall": recall, "precision": precision[int(matches[0])].double().numpy()}
                for name, precision in self._class_precision(raw).items()}
