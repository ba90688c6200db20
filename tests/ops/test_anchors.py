"""k-means anchors with the 1 - IoU distance (YOLOv2 dimension clusters)."""
import pytest
import torch

from cvlab.ops.anchors import kmeans_anchors, mean_best_iou, wh_iou

TRUE_SHAPES = torch.tensor([[10.0, 13.0], [62.0, 45.0], [116.0, 190.0]])


def _clustered_boxes(per_cluster: int = 200, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Boxes around each true shape with independent multiplicative (log-normal) noise on w and h."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.exp(spread * torch.randn(len(TRUE_SHAPES), per_cluster, 2, generator=generator))
    return (TRUE_SHAPES[:, None] * noise).reshape(-1, 2)


def test_wh_iou_on_a_hand_example():
    # 4 x 6 and 6 x 3 sharing a corner: overlap 4 x 3 = 12, union 24 + 18 - 12 = 30.
    iou = wh_iou(torch.tensor([[4.0, 6.0]]), torch.tensor([[6.0, 3.0], [4.0, 6.0], [8.0, 12.0]]))
    assert torch.allclose(iou, torch.tensor([[0.4, 1.0, 0.25]]))


def test_kmeans_recovers_the_true_cluster_shapes():
    anchors, mean_iou = kmeans_anchors(_clustered_boxes(), k=3, seed=0)
    assert anchors.shape == (3, 2)
    assert torch.all(anchors.prod(1)[1:] > anchors.prod(1)[:-1])  # sorted by area
    relative_error = (anchors - TRUE_SHAPES).abs() / TRUE_SHAPES
    assert float(relative_error.max()) < 0.05
    assert mean_iou == pytest.approx(mean_best_iou(_clustered_boxes(), anchors))
    assert mean_iou > 0.85


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kmeans_is_robust_to_its_seed_and_deterministic(seed):
    wh = _clustered_boxes(seed=seed)
    anchors, _ = kmeans_anchors(wh, k=3, seed=seed)
    assert float(((anchors - TRUE_SHAPES).abs() / TRUE_SHAPES).max()) < 0.05
    assert torch.equal(anchors, kmeans_anchors(wh, k=3, seed=seed)[0])


def test_kmeans_anchors_beat_poor_hand_picked_ones():
    wh = _clustered_boxes()
    poor = torch.tensor([[5.0, 5.0], [20.0, 20.0], [300.0, 300.0]])
    anchors, mean_iou = kmeans_anchors(wh, k=3)
    assert mean_iou > mean_best_iou(wh, poor) + 0.3
    # More anchors can only fit as well or better.
    assert kmeans_anchors(wh, k=6)[1] >= mean_iou


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="at least k=3"):
        kmeans_anchors(torch.ones(2, 2), k=3)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors(torch.tensor([[1.0, 0.0], [2.0, 2.0]]), k=1)
    with pytest.raises(ValueError, match=r"Tensor\[M, 2\]"):
        kmeans_anchors(torch.ones(5, 4), k=2)
