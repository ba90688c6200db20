"""What every detector's tests share: sample targets, two hand-drawn scenes and a few training steps on them,
BatchNorm statistics far from their defaults; the checks that a training step reaches every parameter, and that
eval follows the detection contract (one dict of boxes, scores and 0-based labels per image, best first)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.rep import RepVGGBlock


def sample_targets() -> list[dict]:
    """Two images' targets: two boxes of classes 0 and 2, and none."""
    return [
        dict(boxes=torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 20.0, 30.0, 28.0]]), labels=torch.tensor([0, 2])),
        dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)),
    ]


def two_scenes(num_classes: int) -> tuple[torch.Tensor, list[torch.Tensor], list[dict]]:
    """Seeds torch (0) and returns two flat grey 64 px images with one and two orange rectangles: (images, boxes per
    image, targets). With two classes the last box of each image is class 1, the others 0."""
    torch.manual_seed(0)
    images = torch.full((2, 3, 64, 64), 0.1)
    boxes = [torch.tensor([[8.0, 10.0, 30.0, 40.0]]), torch.tensor([[30.0, 4.0, 58.0, 22.0], [6.0, 36.0, 26.0, 60.0]])]
    for image, image_boxes in zip(images, boxes):
        for x0, y0, x1, y1 in image_boxes.long().tolist():
            image[:, y0:y1, x0:x1] = torch.tensor([0.9, 0.5, 0.2])[:, None, None]
    labels = [torch.tensor([0] * (len(b) - 1) + [1]) if num_classes == 2 else torch.zeros(len(b), dtype=torch.long)
              for b in boxes]
    return images, boxes, [dict(boxes=b, labels=classes) for b, classes in zip(boxes, labels)]


def train_steps(model: nn.Module, images: torch.Tensor, targets: list[dict], steps: int) -> list[float]:
    """``steps`` Adam steps (lr 0.01) on the summed training losses of ``model``; the loss before each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    history = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def randomise_batch_norms(model: nn.Module) -> None:
    """Running statistics and affine parameters far from their defaults, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.2)


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


# Arguments of a loss that the detection task fills in from the data, not its config (class weights' inputs).
DATA_ARGUMENTS = ("num_classes", "class_counts")


def configurable_defaults(loss_class: type) -> dict:
    """The defaults of ``loss_class``'s arguments that its loss config writes out (all but :data:`DATA_ARGUMENTS`)."""
    return {name: p.default for name, p in inspect.signature(loss_class).parameters.items()
            if name not in DATA_ARGUMENTS}


def fold_batch_norms(model: nn.Module) -> int:
    """:meth:`ConvNormAct.fuse` on every conv-norm-act of ``model`` (in eval mode); how many folded their norm."""
    return sum(module.fuse() for module in list(model.modules()) if isinstance(module, ConvNormAct))


def reparameterize(model: nn.Module) -> int:
    """:meth:`RepVGGBlock.fuse` on every RepVGG block of ``model`` not yet fused (eval mode); how many it fused."""
    blocks = [block for block in model.modules() if isinstance(block, RepVGGBlock) and not hasattr(block, "reparam")]
    for block in blocks:
        block.fuse()
    return sum(hasattr(block, "reparam") for block in blocks)
