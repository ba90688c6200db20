"""The YOLO target assigners on hand-made cases: which slot answers for each object, and which are negatives."""
import pytest
import torch

from cvlab.ops.assigners import BestAnchorAssigner, GridCellAssigner, flatten_targets, last_occurrence

IMAGE = (64, 64)
# Coarse level first, as the detectors pass them: 2×2 cells (stride 32) and 4×4 cells (stride 16).
ANCHORS = [torch.tensor([[40.0, 40.0], [60.0, 30.0]]), torch.tensor([[8.0, 8.0], [12.0, 20.0]])]
FAR = torch.tensor([100.0, 100.0, 101.0, 101.0])  # a predicted box that overlaps nothing


def _targets():
    # Image 0: A (12×18 at (20, 36): best anchor 12×20, fine cell row 2, col 1); B (50×30 at (36, 16): best 60×30,
    # coarse cell row 0, col 1); C (11×19 at (22, 38)): A's anchor and cell, so it replaces A.
    # Image 1: D (8×8 at (5, 5): anchor 8×8, fine cell 0, 0) and a box without area.
    image0 = dict(boxes=torch.tensor([[14.0, 27, 26, 45], [11, 1, 61, 31], [16.5, 28.5, 27.5, 47.5]]),
                  labels=torch.tensor([0, 1, 2]))
    image1 = dict(boxes=torch.tensor([[1.0, 1, 9, 9], [30, 30, 30, 40]]), labels=torch.tensor([1, 0]))
    return [image0, image1]


def _predictions():
    coarse, fine = FAR.repeat(2, 2, 2, 2, 1), FAR.repeat(2, 2, 4, 4, 1)
    coarse[0, 0, 1, 1] = torch.tensor([11.0, 1, 61, 31])  # exactly on B: IoU 1
    fine[1, 1, 3, 3] = torch.tensor([1.0, 1, 9, 5])  # half of D: IoU 0.5
    return [coarse, fine]


def _all_but(shape, *slots):
    mask = torch.ones(shape, dtype=torch.bool)
    for slot in slots:
        mask[slot] = False
    return mask


def test_best_anchor_assigner_positives_and_negatives_by_hand():
    coarse, fine = BestAnchorAssigner(ignore_thresh=0.5)(_predictions(), ANCHORS, _targets(), IMAGE)
    assert [t.tolist() for t in coarse.slot] == [[0], [1], [0], [1]]
    assert coarse.labels.tolist() == [1] and coarse.boxes.tolist() == [[11.0, 1, 61, 31]]
    # Ordered by slot: C (image 0, anchor 1, row 2, col 1), then D; A lost its slot to C, the empty box is gone.
    assert [t.tolist() for t in fine.slot] == [[0, 1], [1, 0], [2, 0], [1, 0]]
    assert fine.labels.tolist() == [2, 1] and fine.boxes.tolist() == [[16.5, 28.5, 27.5, 47.5], [1.0, 1, 9, 9]]
    # Negatives: all but the positives and the prediction on B (IoU 1 > 0.5); the one at IoU 0.5 stays negative.
    assert torch.equal(coarse.negatives, _all_but((2, 2, 2, 2), (0, 1, 0, 1), (0, 0, 1, 1)))
    assert torch.equal(fine.negatives, _all_but((2, 2, 4, 4), (0, 1, 2, 1), (1, 0, 0, 0)))


@pytest.mark.parametrize("ignore_thresh,ignored", [(0.4, 2), (0.5, 1), (1.0, 0)])
def test_the_ignore_threshold_decides_which_overlapping_predictions_are_no_negatives(ignore_thresh, ignored):
    assignments = BestAnchorAssigner(ignore_thresh)(_predictions(), ANCHORS, _targets(), IMAGE)
    positives = sum(len(a.image) for a in assignments)
    slots = sum(a.negatives.numel() for a in assignments)
    assert sum(int(a.negatives.sum()) for a in assignments) == slots - positives - ignored


def test_an_object_whose_best_anchor_is_on_another_level_is_no_positive_here():
    only_fine = BestAnchorAssigner(0.5)(_predictions()[1:], ANCHORS[1:], _targets(), IMAGE)[0]
    coarse_objects = BestAnchorAssigner(0.5)(_predictions(), ANCHORS, _targets(), IMAGE)[1]
    # With the coarse anchors gone, B's best anchor is on the fine level; with them, it is not.
    assert only_fine.labels.tolist() == [1, 2, 1] and coarse_objects.labels.tolist() == [2, 1]


def test_grid_cell_assigner_picks_the_best_overlapping_predictor_or_the_nearest():
    pred = FAR.repeat(2, 2, 2, 2, 1)  # Tensor[N, S, S, B, 4] with S = 2 (32-px cells), B = 2
    pred[0, 0, 1, 0] = torch.tensor([40.0, 8, 48, 16])  # P's cell: IoU 0.125
    pred[0, 0, 1, 1] = torch.tensor([36.0, 4, 52, 30])  # IoU 416 / 512 = 0.8125: responsible
    pred[0, 1, 0, 0] = torch.tensor([40.0, 40, 44, 44])  # Q's cell: no overlap, centre far
    pred[0, 1, 0, 1] = torch.tensor([20.0, 60, 24, 64])  # no overlap, nearer: responsible
    pred[1, 0, 0, 0] = torch.tensor([2.0, 2, 12, 12])  # on S2
    targets = [dict(boxes=torch.tensor([[36.0, 4, 52, 36], [4, 40, 20, 60]]), labels=torch.tensor([2, 0])),
               dict(boxes=torch.tensor([[0.0, 0, 10, 10], [2, 2, 12, 12]]), labels=torch.tensor([0, 1]))]
    assigned = GridCellAssigner()(pred, targets, IMAGE)
    # P (cell 0, 1), Q (cell 1, 0), then image 1's later object S2, which took its cell from S1.
    assert (assigned.image.tolist(), assigned.row.tolist(), assigned.col.tolist()) == ([0, 0, 1], [0, 1, 0], [1, 0, 0])
    assert assigned.predictor.tolist() == [1, 1, 0] and assigned.labels.tolist() == [2, 0, 1]
    torch.testing.assert_close(assigned.iou, torch.tensor([0.8125, 0.0, 1.0]))
    assert assigned.boxes[2].tolist() == [2.0, 2, 12, 12]


def test_flatten_targets_and_last_occurrence():
    image_index, boxes, labels = flatten_targets(_targets(), "cpu")
    assert image_index.tolist() == [0, 0, 0, 1] and labels.tolist() == [0, 1, 2, 1] and boxes.shape == (4, 4)
    # One index per distinct value, in increasing order of the value: 1 → 4, 2 → 3, 3 → 2.
    assert last_occurrence(torch.tensor([3, 1, 3, 2, 1])).tolist() == [4, 3, 2]
