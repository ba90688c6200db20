"""The assembled R-CNN detector: parameter counts, the penultimate features it reads from any zoo CNN, the SVM scores
and class-specific box regression it applies, per-class NMS at 0.3, the eval-only contract, its own proposals when
none are given, and the warp with the paper's context."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.data.regions import REGION_MEAN, REGION_STD, context_padding, dilate_boxes, warp_regions
from cvlab.models import create_model
from cvlab.models.detectors.rcnn import RCNN, classifier_path
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STANDARD = {"backbone_args": {"stem": "standard"}}


def tiny_rcnn(num_classes: int = 3, **kwargs) -> RCNN:
    torch.manual_seed(0)
    return create_model("rcnn", num_classes=num_classes, warp_size=16, **{**STANDARD, **kwargs}).eval()


@pytest.mark.parametrize(("classes", "params"), [(20, 11_227_812), (5, 11_189_337)])
def test_parameter_counts_of_the_table(classes, params):
    with torch.device("meta"):
        model = create_model("rcnn", num_classes=classes, **STANDARD)
    # resnet18's trunk (11,176,512) + K SVMs of 512 + 4K regressors of 512, with biases; the fine-tuning head is gone
    assert sum(p.numel() for p in model.parameters()) == params == 11_176_512 + 513 * classes + 513 * 4 * classes
    assert isinstance(model.cnn.fc, nn.Identity) and model.num_features == 512


@pytest.mark.parametrize(("backbone", "path", "features"), [("resnet18", "fc", 512), ("vit_tiny", "head", 192),
                                                            ("mobilenetv3_small", "classifier.3", 1024)])
def test_the_svms_read_the_input_of_the_cnns_classifier(backbone, path, features):
    with torch.device("meta"):
        cnn = create_model(backbone, num_classes=6, image_size=32)
        model = create_model("rcnn", num_classes=5, backbone=backbone, backbone_args={}, warp_size=32)
    assert classifier_path(cnn, 6) == path == model.classifier_path
    assert model.num_features == features and model.svm.in_features == features


def test_a_backbone_without_a_fully_connected_classifier_or_not_a_classifier_is_refused():
    with torch.device("meta"), pytest.raises(UserError, match="no fully connected classifier"):
        create_model("rcnn", num_classes=5, backbone="darknet19", backbone_args={})
    with pytest.raises(UserError, match="must be a classification model"):
        create_model("rcnn", num_classes=5, backbone="yolov3", backbone_args={})
    with pytest.raises(UserError, match="do not suit vit_tiny"):
        create_model("rcnn", num_classes=5, backbone="vit_tiny", backbone_args={"stem": "standard"})


def test_region_features_are_the_fine_tuned_cnns_penultimate_features_of_the_warped_boxes():
    model = tiny_rcnn()
    classifier = create_model("resnet18", num_classes=4, image_size=16, stem="standard").eval()
    model.cnn.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")})
    image, boxes = torch.rand(3, 40, 48), torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 0.0, 47.0, 39.0]])
    with torch.no_grad():
        warps = warp_regions(image, boxes, 16, context_padding(16))
        expected = classifier.global_pool(classifier.forward_features(warps))
        assert torch.allclose(model.region_features(image, boxes), expected, atol=1e-5)
        assert model.region_features(image, boxes[:0]).shape == (0, 512)


def test_warp_keeps_p_pixels_of_context_and_reads_the_mean_outside_the_image():
    # p = 4 at a 32 px warp: the box fills the central 24 x 24 pixels
    padding = context_padding(32, 4 * 227 / 32)
    assert padding == pytest.approx(4.0)
    assert context_padding(227) == 16 and context_padding(32) == pytest.approx(16 * 32 / 227)
    box = torch.tensor([[20.0, 10.0, 44.0, 58.0]])  # 24 x 48
    dilated = dilate_boxes(box, 32, padding)
    assert dilated.tolist() == [[16.0, 2.0, 48.0, 66.0]]  # 24 * 4/24 = 4 px and 48 * 4/24 = 8 px more on each side
    image = torch.zeros(3, 80, 80)
    image[:, 10:58, 20:44] = 1.0
    warped = warp_regions(image, box, 32, padding)[0]
    white, black = (1 - REGION_MEAN) / REGION_STD, -REGION_MEAN / REGION_STD
    assert torch.allclose(warped[:, 5:27, 5:27], torch.full((3, 22, 22), white), atol=1e-5)
    assert torch.allclose(warped[:, :3, :], torch.full((3, 3, 32), black), atol=1e-5)
    assert torch.allclose(warped[:, :, 29:], torch.full((3, 32, 3), black), atol=1e-5)
    # a box at the corner: its context leaves the image, where the window reads 0 (the subtracted mean)
    corner = warp_regions(torch.ones(3, 40, 40), torch.tensor([[0.0, 0.0, 12.0, 12.0]]), 32, padding)[0]
    assert torch.equal(corner[:, :3, :], torch.zeros(3, 3, 32)) and torch.equal(corner[:, :, :3], torch.zeros(3, 32, 3))
    assert torch.allclose(corner[:, 5:, 5:], torch.full((3, 27, 27), (1 - REGION_MEAN) / REGION_STD), atol=1e-5)


def assembled(model: RCNN, features: torch.Tensor) -> RCNN:
    """``model`` whose windows have the given features (one row per proposal) instead of the CNN's."""
    model.region_features = lambda image, boxes: features[: len(boxes)]
    return model


def test_detections_are_svm_scores_with_class_specific_regression_and_per_class_nms_at_0_3():
    model = tiny_rcnn(num_classes=2, backbone_args={"stem": "standard"})
    dimension = model.num_features
    with torch.no_grad():
        model.feature_scale.fill_(2.0)
        model.svm.weight.zero_()
        model.svm.weight[0, 0] = 1.0  # class 0 scores feature 0, class 1 feature 1 (times the scale)
        model.svm.weight[1, 1] = 1.0
        model.box_regressor.weight.zero_()
        model.box_regressor.bias.zero_()
        model.box_regressor.bias[4:6] = torch.tensor([0.1, 0.0])  # class 1 moves its boxes right by 0.1 width
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0],   # IoU 1/3 with the next: NMS at 0.3 drops the weaker
                              [5.0, 0.0, 15.0, 10.0],
                              [8.5, 0.0, 18.5, 10.0],   # IoU 0.08 with the first, 0.48 with the second
                              [30.0, 30.0, 40.0, 40.0]])
    features = torch.zeros(4, dimension)
    features[:, 0] = torch.tensor([3.0, 2.0, 1.0, -0.6])  # class-0 scores 6, 4, 2, -1.2
    features[:, 1] = torch.tensor([-1.0, -1.0, -1.0, 0.25])  # class-1 scores -2, -2, -2, 0.5
    found = assembled(model, features)(torch.zeros(1, 3, 48, 48), proposals=[proposals])[0]
    assert found["labels"].tolist() == [0, 0, 1]
    assert found["scores"].tolist() == pytest.approx([6.0, 2.0, 0.5])
    assert torch.allclose(found["boxes"], torch.tensor([[0, 0, 10, 10], [8.5, 0, 18.5, 10], [31, 30, 41, 40.0]]))
    # a looser NMS keeps the overlapping window; the score threshold drops the -1.2 and -2 pairs either way
    model.iou_thresh = 0.5
    assert model(torch.zeros(1, 3, 48, 48), proposals=[proposals])[0]["scores"].tolist() == pytest.approx(
        [6.0, 4.0, 2.0, 0.5])
    model.max_det = 2
    assert len(model(torch.zeros(1, 3, 48, 48), proposals=[proposals])[0]["scores"]) == 2


def test_eval_only_and_its_own_proposals_when_none_are_given(monkeypatch):
    model = tiny_rcnn(proposals={"mode": "quality", "max_proposals": 7})
    asked = []

    def fake_search(image, mode, max_proposals, min_size):
        asked.append((tuple(image.shape), mode, max_proposals, min_size))
        return torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 5.0, 30.0, 31.0]])

    monkeypatch.setattr("cvlab.ops.proposals.selective_search", fake_search)
    images = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        found = model(images)
    assert asked == [((3, 32, 40), "quality", 7, 8)] * 2
    assert len(found) == 2
    for detections in found:
        assert detections["boxes"].shape[1:] == (4,) and detections["labels"].dtype == torch.int64
        assert len(detections["boxes"]) == len(detections["scores"]) == len(detections["labels"])
    # untrained (zero) SVMs score 0 > conf_thresh -1: every proposal, once per class, NMS aside
    assert len(found[0]["scores"]) == 2 * 3 and found[0]["scores"].abs().max() == 0
    model.train()
    with pytest.raises(RuntimeError, match="no training forward"):
        model(images)
    assert RCNN.needs_proposals
