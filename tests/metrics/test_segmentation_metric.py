"""The segmentation scores (mIoU by torchmetrics' MulticlassJaccardIndex, per-class IoU, pixel and mean class
accuracy) equal a confusion-matrix computation in numpy over the whole split, with ignored pixels and classes that
the data never shows."""
import numpy as np
import pytest
import torch

from cvlab.data.base import IGNORE_INDEX
from cvlab.metrics.segmentation import SegmentationScores

NUM_CLASSES = 6
NEVER_SEEN = 4  # in neither the truth nor the predictions
ONLY_PREDICTED = 5  # predicted somewhere, never true


def _batches(seed: int = 0):
    """(logits, target) batches of different sizes: 10 % of the pixels ignored, class 4 nowhere, class 5 only in the
    predictions; predictions agree with the truth on about half the pixels."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (3, 1, 4):
        target = torch.randint(0, 4, (size, 12, 10), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.1] = IGNORE_INDEX
        logits = torch.randn(size, NUM_CLASSES, 12, 10, generator=generator)
        agree = (torch.rand(target.shape, generator=generator) < 0.5) & (target != IGNORE_INDEX)
        logits.scatter_add_(1, target.clamp(max=NUM_CLASSES - 1)[:, None], 10.0 * agree[:, None].float())
        logits[:, NEVER_SEEN] = -1e9
        batches.append((logits, target))
    return batches


def numpy_scores(batches) -> dict:
    """The reference: one confusion matrix of every counted pixel, and the figures read off it (NaN = undefined)."""
    truth = np.concatenate([t.numpy().ravel() for _, t in batches])
    predicted = np.concatenate([lg.argmax(1).numpy().ravel() for lg, _ in batches])
    counted = truth != IGNORE_INDEX
    matrix = np.bincount(NUM_CLASSES * truth[counted] + predicted[counted],
                         minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES).astype(np.float64)
    correct, rows, columns = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = correct / (rows + columns - correct)
        acc = correct / rows
    return {"matrix": matrix, "iou": iou, "acc": acc, "miou": np.nanmean(iou), "mean_acc": np.nanmean(acc),
            "pixel_acc": correct.sum() / matrix.sum()}


def _scores(batches) -> dict:
    metric = SegmentationScores(NUM_CLASSES)
    for logits, target in batches:
        metric.update(logits, target)
    return metric.compute()


def test_every_figure_equals_the_numpy_confusion_matrix_computation():
    batches = _batches()
    expected = numpy_scores(batches)
    assert expected["matrix"][:, ONLY_PREDICTED].sum() > 0 and expected["matrix"][ONLY_PREDICTED].sum() == 0
    scores = _scores(batches)
    np.testing.assert_array_equal(scores["confusion"].numpy(), expected["matrix"])
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert float(scores[key]) == pytest.approx(expected[key], abs=1e-6), key
    np.testing.assert_allclose(scores["iou_per_class"].numpy(), expected["iou"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(scores["acc_per_class"].numpy(), expected["acc"], atol=1e-6, equal_nan=True)
    # A class never seen has no IoU and no accuracy and is left out of both means; one only predicted has IoU 0
    # (counted in the mIoU) and no accuracy.
    iou, acc = scores["iou_per_class"], scores["acc_per_class"]
    assert iou[NEVER_SEEN].isnan() and acc[NEVER_SEEN].isnan()
    assert iou[ONLY_PREDICTED] == 0 and acc[ONLY_PREDICTED].isnan()
    assert float(scores["miou"]) == pytest.approx(float(iou[:4].sum()) / 5, abs=1e-6)
    assert float(scores["mean_acc"]) == pytest.approx(float(acc[:4].mean()), abs=1e-6)
    # mIoU is torchmetrics' own macro Jaccard index with the ignore index.
    from torchmetrics.classification import MulticlassJaccardIndex

    jaccard = MulticlassJaccardIndex(NUM_CLASSES, average="macro", ignore_index=IGNORE_INDEX)
    for logits, target in batches:
        jaccard.update(logits, target)
    assert float(scores["miou"]) == float(jaccard.compute())


def test_the_split_is_scored_as_a_whole_not_as_a_mean_of_batches():
    batches = _batches()
    whole = float(_scores(batches)["miou"])
    per_batch = np.mean([float(_scores([batch])["miou"]) for batch in batches])
    assert whole == pytest.approx(numpy_scores(batches)["miou"], abs=1e-6)
    assert abs(whole - per_batch) > 1e-3


def test_ignored_pixels_count_for_nothing_whatever_is_predicted_there():
    batches = _batches()
    flipped = []
    for logits, target in batches:
        logits = logits.clone()
        ignored = (target == IGNORE_INDEX)[:, None].expand_as(logits)
        logits[ignored] = -logits[ignored]  # other predictions on the ignored pixels only
        flipped.append((logits, target))
    assert any((a.argmax(1) != b.argmax(1)).any() for (a, _), (b, _) in zip(batches, flipped))
    first, second = _scores(batches), _scores(flipped)
    for key in ("miou", "pixel_acc", "mean_acc", "confusion"):
        assert torch.equal(first[key], second[key]), key
    assert int(first["confusion"].sum()) == sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)


def test_states_merge_by_summing_as_ddp_synchronises_them():
    batches = _batches()
    ranks = [SegmentationScores(NUM_CLASSES), SegmentationScores(NUM_CLASSES)]
    for rank, (logits, target) in enumerate(batches):
        ranks[rank % 2].update(logits, target)
    ranks[0].merge_state(ranks[1])  # torchmetrics' dist_reduce_fx (sum), as DDP's sync applies it
    merged, single = ranks[0].compute(), _scores(batches)
    for key in ("miou", "pixel_acc", "mean_acc", "confusion"):
        assert torch.equal(merged[key], single[key]), key
