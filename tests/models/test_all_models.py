"""Every registered model: its config file exists (and every config names a model), a forward pass gives the
right shapes and finite values, and a backward pass reaches every parameter."""
from __future__ import annotations

import pytest
import torch

from cvlab.models import create_model, list_models, model_task
from cvlab.utils.config import options, read_option

CLASSIFIERS = list_models("classification")
# R-CNN is assembled from stages trained apart and has no training forward (tests/models/test_rcnn_model.py).
DETECTORS = [name for name in list_models("detection") if name != "rcnn"]
SEGMENTORS = list_models("segmentation")
# Small CPU builds: the segmentors' defaults are the papers' (a 31 M-parameter UNet, DANet on ResNet-50).
TINY_SEGMENTORS = {"unet": dict(width=0.125, padding="same"), "danet": dict(backbone="resnet18")}


def test_model_configs_and_registry_name_each_other():
    assert set(options("model")) == set(list_models())
    for name in options("model"):
        config = read_option("model", name)
        assert config["name"] == name
        assert config["task"] == model_task(name)


def _assert_every_parameter_has_a_gradient(model):
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_and_backward_on_digit_sized_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, image_size=8)
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    _assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_losses_backward_and_detections(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=64, width=0.25)
    images = torch.rand(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0], [2.0, 30.0, 20.0, 62.0]]), "labels": torch.tensor([0, 2])},
    ]
    model.train()
    losses = model(images, targets)
    assert losses and all(key.startswith("loss_") for key in losses)
    assert all(value.ndim == 0 and torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    _assert_every_parameter_has_a_gradient(model)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for found in detections:
        assert found["boxes"].shape[1:] == (4,) and found["boxes"].shape[0] == found["scores"].shape[0]
        assert found["labels"].dtype == torch.int64 and (found["labels"] < 3).all()


@pytest.mark.parametrize("name", SEGMENTORS)
def test_segmentor_logits_aux_outputs_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3, image_size=64, **TINY_SEGMENTORS.get(name, {}))
    images = torch.rand(2, 3, 64, 64)
    masks = torch.randint(0, 3, (2, 64, 64))
    masks[0, :8] = 255  # ignored pixels
    model.train()
    outputs = model(images)
    assert len(outputs["aux"]) == len(model.aux_weights)
    for logits in (outputs["out"], *outputs["aux"]):
        assert logits.shape == (2, 3, 64, 64)
        assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(outputs["out"], masks, ignore_index=255)
    loss = loss + sum(w * torch.nn.functional.cross_entropy(aux, masks, ignore_index=255)
                      for w, aux in zip(model.aux_weights, outputs["aux"]))
    loss.backward()
    _assert_every_parameter_has_a_gradient(model)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 3, 64, 64)
    assert torch.isfinite(logits).all()
