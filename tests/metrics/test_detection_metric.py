"""The mAP wrapper matches pycocotools' COCOeval run directly on the same boxes."""
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvlab.metrics.detection import DetectionMeanAP, default_backend

CLASS_NAMES = ("circle", "square", "triangle")


def _random_detections(n_images: int = 20, seed: int = 0):
    """Ground truth and noisy predictions: shifted true boxes, missed objects and false positives."""
    generator = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n_images):
        n = int(torch.randint(1, 5, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 80
        wh = 8 + torch.rand(n, 2, generator=generator) * 40
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 3, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        keep = torch.rand(n, generator=generator) > 0.2
        shifted = boxes[keep] + torch.randn(int(keep.sum()), 4, generator=generator) * 3
        n_false = int(torch.randint(0, 3, (1,), generator=generator))
        false_xy = torch.rand(n_false, 2, generator=generator) * 80
        false_boxes = torch.cat([false_xy, false_xy + 10 + torch.rand(n_false, 2, generator=generator) * 30], 1)
        preds.append({
            "boxes": torch.cat([shifted, false_boxes]),
            "scores": torch.rand(len(shifted) + n_false, generator=generator),
            "labels": torch.cat([labels[keep], torch.randint(0, 3, (n_false,), generator=generator)]),
        })
    return preds, targets


def _cocoeval(preds, targets, category_ids=None) -> COCOeval:
    """COCOeval on hand-built COCO json (xywh boxes, area = w * h, no crowd), as the COCO toolkit expects."""
    def xywh(box):
        x1, y1, x2, y2 = box.tolist()
        return [x1, y1, x2 - x1, y2 - y1]

    objects = [(i, box, label) for i, t in enumerate(targets) for box, label in zip(t["boxes"], t["labels"])]
    annotations = [{"id": k + 1, "image_id": i, "category_id": int(label), "bbox": xywh(box),
                    "area": xywh(box)[2] * xywh(box)[3], "iscrowd": 0} for k, (i, box, label) in enumerate(objects)]
    results = [{"image_id": i, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
               for i, p in enumerate(preds) for box, label, score in zip(p["boxes"], p["labels"], p["scores"])]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {"images": [{"id": i} for i in range(len(targets))], "annotations": annotations,
                                "categories": [{"id": c} for c in range(len(CLASS_NAMES))]}
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(copy.deepcopy(results)), "bbox")
        if category_ids is not None:
            evaluation.params.catIds = category_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


@pytest.fixture(scope="module")
def computed():
    preds, targets = _random_detections()
    metric = DetectionMeanAP(CLASS_NAMES)
    metric.update(preds[:10], targets[:10])
    metric.update(preds[10:], targets[10:])
    return metric, metric.compute(), preds, targets


def test_backend_is_one_torchmetrics_supports():
    assert default_backend() in ("pycocotools", "faster_coco_eval")


def test_map_equals_cocoeval(computed):
    metric, result, preds, targets = computed
    stats = _cocoeval(preds, targets).stats  # [mAP, mAP50, mAP75, ...small/medium/large..., AR1, AR10, AR100, ...]
    assert set(result) == {"map", "map_50", "map_75", "mar_100", "ap_per_class", "ap50_per_class"}
    assert result["map"] == pytest.approx(stats[0], abs=1e-4)
    assert result["map_50"] == pytest.approx(stats[1], abs=1e-4)
    assert result["map_75"] == pytest.approx(stats[2], abs=1e-4)
    assert result["mar_100"] == pytest.approx(stats[8], abs=1e-4)
    assert 0.2 < result["map"] < result["map_50"] < 1.0  # noisy but not useless predictions


def test_per_class_ap_equals_cocoeval_per_category(computed):
    _, result, preds, targets = computed
    assert list(result["ap_per_class"]) == list(CLASS_NAMES)
    assert list(result["ap50_per_class"]) == list(CLASS_NAMES)
    for label, name in enumerate(CLASS_NAMES):
        stats = _cocoeval(preds, targets, [label]).stats
        assert result["ap_per_class"][name] == pytest.approx(stats[0], abs=1e-4)
        assert result["ap50_per_class"][name] == pytest.approx(stats[1], abs=1e-4)
        assert result["ap50_per_class"][name] > result["ap_per_class"][name]


def test_pr_curves_are_cocoeval_precision_at_iou_half(computed):
    metric, _, preds, targets = computed
    curves = metric.pr_curves()
    precision = _cocoeval(preds, targets).eval["precision"]  # [T, R, K, A, M]
    assert list(curves) == list(CLASS_NAMES)
    for label, name in enumerate(CLASS_NAMES):
        recall, class_precision = curves[name]["recall"], curves[name]["precision"]
        assert recall.shape == (101,) and recall[0] == 0.0 and recall[-1] == pytest.approx(1.0)
        assert np.allclose(class_precision, precision[0, :, label, 0, -1], atol=1e-6)
        assert np.all(np.diff(class_precision) <= 1e-12)  # COCO's interpolated precision never rises
    # The mean over classes and recall points of these curves is mAP@.5 itself.
    mean_ap50 = np.mean([curves[name]["precision"].mean() for name in CLASS_NAMES])
    assert mean_ap50 == pytest.approx(computed[1]["map_50"], abs=1e-4)
    with pytest.raises(ValueError, match="0.52"):
        metric.pr_curves(0.52)


def test_classes_without_ground_truth_are_left_out():
    metric = DetectionMeanAP(CLASS_NAMES)
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    metric.update([{"boxes": torch.cat([box, box + 40]), "scores": torch.tensor([0.9, 0.8]),
                    "labels": torch.tensor([0, 2])}],
                  [{"boxes": box, "labels": torch.tensor([0])}])
    result = metric.compute()
    assert result["ap_per_class"] == {"circle": pytest.approx(1.0)}
    assert result["ap50_per_class"] == {"circle": pytest.approx(1.0)}
    assert result["map"] == pytest.approx(1.0) and list(metric.pr_curves()) == ["circle"]
    metric.reset()
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}],
                  [{"boxes": box + 2, "labels": torch.tensor([1])}])
    # IoU of two 20 px boxes offset by 2 px: 18*18 / (2 * 400 - 324) = 0.68 -> a hit at .5, a miss at .75.
    result = metric.compute()
    assert result["map_50"] == pytest.approx(1.0) and result["map_75"] == pytest.approx(0.0)
    assert list(result["ap_per_class"]) == ["square"]
    assert result["ap50_per_class"] == {"square": pytest.approx(1.0)}
