"""cvlab's faster_rcnn against torchvision's: the same parameter counts as fasterrcnn_resnet50_fpn and
fasterrcnn_mobilenet_v3_large_fpn, and, with torchvision's randomly initialised weights loaded through the key map,
the same boxes, scores and labels in eval."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from cvlab.models import create_model
from cvlab.models.detectors.faster_rcnn import from_torchvision_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128  # torchvision is built with min_size = max_size = SIZE, so its resize leaves the images as they are
# Fewer RoIs than the default 1000 keep the box head (1000 x 12.8 M multiply-adds per image) fast; both get it.
TEST_PROPOSALS = 100
# torchvision's MobileNetV3 detector: FPN on the outputs of features.13 (the first stride-32 block) and features.16,
# 5 anchor sizes x 3 ratios on each of its 3 RPN levels, proposals below 0.05 dropped.
MOBILENET = dict(backbone="mobilenetv3_large", levels=["features.13", "features.16"],
                 anchor_sizes=[[32, 64, 128, 256, 512]] * 3, rpn_score_thresh=0.05)
VARIANTS = {"resnet50_fpn": (fasterrcnn_resnet50_fpn, {}), "mobilenet_v3_large_fpn": (fasterrcnn_mobilenet_v3_large_fpn,
                                                                                       MOBILENET)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cvlab_faster_rcnn(settings: dict, norm_layer, **kwargs) -> nn.Module:
    return create_model("faster_rcnn", num_classes=90, image_size=SIZE, norm_layer=norm_layer, **settings, **kwargs)


@pytest.mark.parametrize("variant, frozen, trainable", [
    ("resnet50_fpn", 41_755_286, 41_808_406),
    ("mobilenet_v3_large_fpn", 19_386_354, 19_410_754),
])
def test_parameter_counts_equal_torchvision(variant, frozen, trainable):
    build, settings = VARIANTS[variant]
    with torch.device("meta"):
        reference = build(weights=None, weights_backbone=None)
        assert n_params(cvlab_faster_rcnn(settings, FrozenBatchNorm2d)) == frozen
        assert n_params(cvlab_faster_rcnn(settings, nn.BatchNorm2d)) == trainable == n_params(reference)
    # torchvision's documented count (its pretrained detectors freeze BatchNorm) is the BatchNorm-free one.
    batch_norm = sum(p.numel() for m in reference.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert trainable - batch_norm == frozen


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d of ``module`` by a FrozenBatchNorm2d holding its statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _torchvision_reference(build, frozen: bool) -> nn.Module:
    """torchvision's detector with weights=None, its BatchNorm statistics taken from random images (a network of
    unit-variance statistics gives vanishing features) and a sharper classifier, so that detections score above the
    0.05 threshold (at 1/91 each, none would)."""
    model = build(weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE,
                  rpn_post_nms_top_n_test=TEST_PROPOSALS)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    model.backbone.train()
    with torch.no_grad():
        model.backbone(model.transform(list(torch.rand(4, 3, SIZE, SIZE)))[0].tensors)
        model.roi_heads.box_predictor.cls_score.weight.mul_(8)
    if frozen:
        _freeze_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize("variant, frozen", [("resnet50_fpn", False), ("mobilenet_v3_large_fpn", False),
                                             ("mobilenet_v3_large_fpn", True)])
def test_torchvision_weights_give_the_same_detections(variant, frozen):
    build, settings = VARIANTS[variant]
    torch.manual_seed(0)
    reference = _torchvision_reference(build, frozen)
    model = cvlab_faster_rcnn(settings, FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                              rpn_post_nms_top_n=(2000, TEST_PROPOSALS)).eval()
    model.load_state_dict(from_torchvision_state_dict(reference.state_dict(), model), strict=True)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, found = reference(list(images)), model(images)
    for want, got in zip(expected, found):
        assert 20 <= len(want["boxes"]) == len(got["boxes"])
        assert len(want["scores"].unique()) == len(want["scores"])  # no ties: the order is the models' own
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)
        assert torch.equal(got["labels"], want["labels"] - 1)  # torchvision's label 0 is the background
