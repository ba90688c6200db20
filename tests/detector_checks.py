"""Checks every detector's tests share: a training step reaches every parameter, and eval follows the detection
contract (one dict of boxes, scores and 0-based labels per image, best first)."""
from __future__ import annotations

import torch


def assert_losses_reach_every_parameter(model: torch.nn.Module, losses: dict, names: set[str]) -> None:
    """``losses`` (the model's training output) are exactly ``names``, positive finite scalars, and their sum's
    gradient reaches every parameter of ``model``, finite."""
    assert set(losses) == names
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def assert_detection_contract(detections: list[dict], images: int, max_det: int, num_classes: int,
                              size: int) -> None:
    """One dict per image, 1..max_det detections each, boxes inside the ``size`` px input, labels in
    [0, num_classes), scores sorted best first."""
    assert len(detections) == images
    for det in detections:
        k = len(det["scores"])
        assert 0 < k <= max_det
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,) and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 0) & (det["labels"] < num_classes)).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= size).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
