"""Fast R-CNN and Faster R-CNN: the detection contract, gradients, the RPN's anchors and sampling, the RoI head's
sampling, pooling and post-processing, the options, and the shipped recipes."""
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou, roi_align, roi_pool

import cvlab.ops.proposals
from cvlab.models import create_model
from cvlab.models.heads.roi_heads import BoxPredictor, RoIHeads, RoIPooler, TwoMLPHead
from cvlab.models.heads.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from cvlab.ops.box_coder import BoxCoder
from cvlab.ops.matching import BACKGROUND, FOREGROUND, IGNORED, IoUMatcher, sample_balanced
from cvlab.tasks.base import MODEL_META_KEYS
from cvlab.utils.config import read_option
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_FASTER = dict(backbone="resnet18", levels=[-3, -2, -1], fpn_channels=32, representation_size=64,
                    extra_pool=False, anchor_sizes=[[8, 12, 16], [16, 24, 32], [32, 48, 64]])
SMALL_FAST = dict(backbone="resnet18", representation_size=64)
TARGETS = [
    {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0], [2.0, 30.0, 20.0, 62.0]]), "labels": torch.tensor([0, 2])},
]


def proposals_for(targets, count=30, seed=0):
    """Jittered copies of the objects plus random boxes: Tensor[count, 4] per image, inside 64 px."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for target in targets:
        near = target["boxes"].repeat(count // 2, 1) + torch.randn(count // 2 * len(target["boxes"]), 4,
                                                                   generator=generator) * 3
        xy = torch.rand(count, 2, generator=generator) * 40
        far = torch.cat([xy, xy + 8 + torch.rand(count, 2, generator=generator) * 16], 1)
        out.append(torch.cat([near, far]).clamp(0, 64))
    return out


def assert_every_parameter_has_a_gradient(model):
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def assert_detections(detections, count, num_classes, size=64):
    assert len(detections) == count
    for found in detections:
        assert set(found) == {"boxes", "scores", "labels"}
        assert found["boxes"].shape == (len(found["scores"]), 4) and found["labels"].dtype == torch.int64
        assert ((found["labels"] >= 0) & (found["labels"] < num_classes)).all()
        assert (found["boxes"] >= 0).all() and (found["boxes"] <= size).all()
        assert (found["scores"][:-1] >= found["scores"][1:]).all()  # best first


FASTER_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


@pytest.mark.parametrize("name, kwargs, loss_keys", [
    ("faster_rcnn", SMALL_FASTER, FASTER_LOSSES),
    ("fast_rcnn", SMALL_FAST, {"loss_classifier", "loss_box_reg"}),
    # the focal heads (issue 14): K sigmoid class outputs, scores still in [0, 1] and best first
    ("faster_rcnn", {**SMALL_FASTER, "rpn_focal_gamma": 2.0, "box_focal_gamma": 2.0}, FASTER_LOSSES),
    ("fast_rcnn", {**SMALL_FAST, "focal_gamma": 2.0, "focal_alpha": None}, {"loss_classifier", "loss_box_reg"}),
])
def test_losses_backward_and_detections(name, kwargs, loss_keys):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=64, **kwargs)
    images = torch.rand(2, 3, 64, 64)
    extra = {"proposals": proposals_for(TARGETS)} if name == "fast_rcnn" else {}
    model.train()
    losses = model(images, TARGETS, **extra)
    assert set(losses) == loss_keys
    assert all(value.ndim == 0 and torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    assert_every_parameter_has_a_gradient(model)
    model.eval()
    with torch.no_grad():
        detections = model(images, **extra)
    assert_detections(detections, 2, 3)
    assert all(((found["scores"] > 0) & (found["scores"] <= 1)).all() for found in detections)


def test_fast_rcnn_computes_its_proposals_when_given_none(monkeypatch):
    seen = []

    def fake(image, settings):
        seen.append((tuple(image.shape), settings))
        return torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 20.0, 50.0, 60.0]])

    monkeypatch.setattr(cvlab.ops.proposals, "compute_proposals", fake)
    model = create_model("fast_rcnn", num_classes=3, image_size=64, proposals={"max_proposals": 50},
                         score_thresh=0.0, **SMALL_FAST).eval()
    assert model.needs_proposals and not create_model("faster_rcnn", **SMALL_FASTER).needs_proposals
    with torch.no_grad():
        detections = model(torch.rand(2, 3, 64, 64))
    assert [shape for shape, _ in seen] == [(3, 64, 64)] * 2
    assert seen[0][1]["max_proposals"] == 50 and seen[0][1]["mode"] == "fast"
    # Every detection is one of the two proposals, refined by one class's deltas: no more than 2 x 3 per image.
    assert all(0 < len(found["boxes"]) <= 6 for found in detections)


def test_fast_rcnn_image_without_proposals_has_no_detections():
    torch.manual_seed(0)
    model = create_model("fast_rcnn", num_classes=3, image_size=64, score_thresh=0.0, **SMALL_FAST).eval()
    with torch.no_grad():
        detections = model(torch.rand(2, 3, 64, 64), proposals=[torch.zeros(0, 4), proposals_for(TARGETS)[1]])
    assert len(detections[0]["boxes"]) == 0 and len(detections[1]["boxes"]) > 0
    model.train()  # no proposals and no objects in the whole batch: zero losses that still backpropagate
    losses = model(torch.rand(1, 3, 64, 64), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}],
                   proposals=[torch.zeros(0, 4)])
    assert all(value.item() == 0 and value.requires_grad for value in losses.values())


def test_anchor_generator_counts_order_and_offset():
    generator = AnchorGenerator([[16, 20, 25], [32, 40, 50]], [0.5, 1.0, 2.0])
    assert generator.num_anchors_per_location() == [9, 9]
    fine, coarse = generator([(16, 16), (8, 8)], (128, 128), "cpu")
    assert fine.shape == (16 * 16 * 9, 4) and coarse.shape == (8 * 8 * 9, 4)
    # Ratio-major, sizes inner: the first anchor is h/w = 0.5 at size 16 (w = 16 / sqrt(0.5) = 22.6, h = 11.3),
    # centred on the cell corner (0, 0), corners rounded as torchvision's.
    assert fine[0].tolist() == [-11.0, -6.0, 11.0, 6.0]
    assert fine[9 + 4].tolist() == [8.0 - 10, -10.0, 8.0 + 10, 10.0]  # next cell (x + 8), ratio 1, size 20
    centred = AnchorGenerator([[16, 20, 25]], [0.5, 1.0, 2.0], offset=0.5)([(16, 16)], (128, 128), "cpu")[0]
    assert torch.equal(centred - fine, torch.full_like(fine, 4.0))
    sizes = (fine[:, 2:] - fine[:, :2])[:9]
    assert torch.allclose(sizes.prod(1).sqrt(), torch.tensor([16.0, 20, 25] * 3), rtol=0.08)


def test_rpn_matching_and_sampling_numbers():
    torch.manual_seed(0)
    matcher = IoUMatcher(0.7, (0.0, 0.3), allow_low_quality=True)
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 9, 10], [50, 50, 60, 60], [0, 0, 20, 20], [100, 100, 110, 110]])
    objects = torch.tensor([[0.0, 0, 10, 10], [52, 52, 68, 68]])
    match = matcher(anchors, objects)
    # Anchor 2 overlaps object 1 by 0.22 only (< 0.3) but is its best anchor: positive all the same.
    assert match.kind.tolist() == [FOREGROUND, FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND]
    assert match.index[:3].tolist() == [0, 0, 1]
    strict = IoUMatcher(0.7, (0.0, 0.3))(anchors, objects)
    assert strict.kind.tolist() == [FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND]
    assert IoUMatcher(0.5, (0.1, 0.5))(anchors, objects).kind.tolist()[3:] == [BACKGROUND, IGNORED]

    kind = torch.tensor([FOREGROUND] * 300 + [BACKGROUND] * 3000 + [IGNORED] * 50)
    positive, negative = sample_balanced(kind, 256, 0.5)
    assert (len(positive), len(negative)) == (128, 128)
    assert (kind[positive] == FOREGROUND).all() and (kind[negative] == BACKGROUND).all()
    few = torch.tensor([FOREGROUND] * 20 + [BACKGROUND] * 3000)
    assert [len(s) for s in sample_balanced(few, 256, 0.5)] == [20, 236]


def test_rpn_trains_on_256_anchors_and_keeps_the_proposal_budget():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(AnchorGenerator([[16, 32, 64]], [0.5, 1.0, 2.0]), RPNHead(8, 9),
                                pre_nms_top_n=(600, 300), post_nms_top_n=(200, 50))
    levels = [torch.randn(2, 8, 16, 16)]
    rpn.train()
    proposals, losses = rpn(levels, (128, 128), [{"boxes": torch.tensor([[10.0, 10, 60, 50]]),
                                                 "labels": torch.tensor([0])}] * 2)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    # An untrained head scores every anchor ~0.5: the BCE of 256 sampled anchors per image is ~ln 2.
    assert losses["loss_objectness"].item() == pytest.approx(0.6931, abs=0.01)
    assert all(len(p) <= 200 for p in proposals)
    rpn.eval()
    proposals, losses = rpn(levels, (128, 128))
    assert losses == {} and all(0 < len(p) <= 50 for p in proposals)
    assert all(((p >= 0) & (p <= 128)).all() for p in proposals)


def test_box_coder_round_trip_and_weights():
    references = torch.tensor([[10.0, 10, 50, 30], [0, 0, 8, 16]])
    boxes = torch.tensor([[12.0, 8, 60, 40], [1, 2, 7, 20]])
    for weights in ((1.0, 1, 1, 1), (10.0, 10, 5, 5)):
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(boxes, references), references), boxes)
    targets = BoxCoder((10.0, 10, 5, 5)).encode(boxes, references)
    # Centre x moves 6 px on a 40 px wide reference: 10 x 6 / 40; width 48 / 40: 5 log 1.2.
    assert targets[0, 0].item() == pytest.approx(1.5) and targets[0, 2].item() == pytest.approx(5 * 0.18232, 1e-4)


def test_fast_rcnn_samples_64_rois_a_quarter_foreground_with_the_objects_added():
    torch.manual_seed(0)
    heads = RoIHeads(RoIPooler([16]), nn.Identity(), BoxPredictor(1, 3), 0.5, (0.1, 0.5), 64, 0.25)
    objects = torch.tensor([[10.0, 10, 50, 50]])
    near = objects + torch.randn(60, 4)  # IoU > 0.5
    middle = torch.tensor([[10.0, 10, 50, 30]]).repeat(60, 1)  # IoU 0.5 exactly -> foreground
    low = torch.tensor([[40.0, 40, 80, 80]]).repeat(60, 1)  # IoU 0.06: ignored (below 0.1)
    half = torch.tensor([[30.0, 10, 70, 50]]).repeat(60, 1)  # IoU 0.33: background
    sampled, labels, regression = heads.sample([torch.cat([near, middle[:1], low, half])],
                                               [{"boxes": objects, "labels": torch.tensor([2])}])
    assert len(sampled[0]) == 64 and (labels > 0).sum() == 16 and (labels[labels > 0] == 3).all()
    iou = box_iou(sampled[0], objects)[:, 0]
    assert (iou[labels > 0] >= 0.5).all() and ((iou[labels == 0] >= 0.1) & (iou[labels == 0] < 0.5)).all()
    assert (regression[labels == 0] == 0).all()
    # With only the object itself as a foreground candidate, the ground-truth box joins the proposals.
    sampled, labels, _ = heads.sample([half], [{"boxes": objects, "labels": torch.tensor([0])}])
    assert (labels > 0).sum() == 1 and torch.equal(sampled[0][labels > 0], objects)
    # An image without objects: all its proposals are background.
    _, labels, _ = heads.sample([half[:10]], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    assert labels.tolist() == [0] * 10


def test_roi_pool_and_align_differ_and_are_torchvision_ops():
    torch.manual_seed(0)
    level = torch.randn(1, 4, 8, 8)
    boxes = [torch.tensor([[3.0, 5.0, 37.0, 29.0], [0.0, 0.0, 64.0, 64.0]])]
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    pooled = RoIPooler([8], 7, "pool")([level], boxes)
    aligned = RoIPooler([8], 7, "align")([level], boxes)
    assert torch.equal(pooled, roi_pool(level, rois, 7, 1 / 8))
    assert torch.equal(aligned, roi_align(level, rois, 7, 1 / 8, 2))
    assert (pooled - aligned).abs().max() > 0.1
    model_kwargs = dict(num_classes=3, image_size=64, **SMALL_FASTER)
    torch.manual_seed(0)
    align_model = create_model("faster_rcnn", roi="align", box_score_thresh=0.0, **model_kwargs).eval()
    pool_model = create_model("faster_rcnn", roi="pool", box_score_thresh=0.0, **model_kwargs).eval()
    pool_model.load_state_dict(align_model.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        scores = [model(images)[0]["scores"] for model in (align_model, pool_model)]
    assert len(scores[0]) and not torch.equal(scores[0], scores[1])


def test_fpn_level_assignment_follows_eq_1():
    pooler = RoIPooler([4, 8, 16, 32])
    boxes = torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 56, 56], [0, 0, 20, 20], [0, 0, 448, 448],
                          [0, 0, 900, 900]])
    # k = floor(4 + log2(side / 224)), clamped to the strides there are (2..5), as an index into the levels.
    assert pooler.target_levels(boxes).tolist() == [2, 1, 0, 0, 3, 3]
    # torchvision's MobileNet detector pools from two stride-32 levels: every RoI goes to the first.
    assert RoIPooler([32, 32]).target_levels(boxes).tolist() == [0] * 6
    with pytest.raises(ValueError, match="powers of two"):
        RoIPooler([8, 32])


def test_per_class_nms_threshold_and_background_is_no_detection():
    heads = RoIHeads(RoIPooler([16]), nn.Identity(), BoxPredictor(1, 2), nms_thresh=0.3)
    proposals = [torch.tensor([[0.0, 0, 40, 40], [10.0, 0, 50, 40], [0, 0, 40, 40]])]  # IoU of the first two: 0.6
    logits = torch.tensor([[0.0, 5, 0], [0.0, 4, 0], [6.0, 0, 0]])  # class 1, class 1, background
    deltas = torch.zeros(3, 12)
    found = heads.postprocess(logits, deltas, proposals, (64, 64))[0]
    assert found["labels"].tolist().count(0) == 1  # the second box of class 0 is suppressed at 0.3
    heads.nms_thresh = 0.7
    assert heads.postprocess(logits, deltas, proposals, (64, 64))[0]["labels"].tolist().count(0) == 2


def test_options_are_checked():
    with pytest.raises(UserError, match="one backbone level"):
        create_model("faster_rcnn", backbone="resnet18", fpn=False, levels=[-2, -1])
    with pytest.raises(UserError, match="anchor_sizes list 5 levels"):
        create_model("faster_rcnn", backbone="resnet18", fpn=True, levels=[-2, -1], extra_pool=False)
    with pytest.raises(UserError, match="roi is one of align, pool"):
        create_model("fast_rcnn", backbone="resnet18", roi="pol")
    with pytest.raises(UserError, match="no module 'features.99'"):
        create_model("faster_rcnn", backbone="mobilenetv3_large", levels=["features.99"], fpn=False)
    with pytest.raises(UserError, match="backbone_args"):
        create_model("faster_rcnn", backbone="vit_tiny")
    # Without an FPN: one level and the paper's 3 scales x 3 ratios on it.
    plain = create_model("faster_rcnn", backbone="resnet18", fpn=False, levels=[-2])
    assert plain.rpn.anchor_generator.sizes == [[128.0, 256.0, 512.0]] and isinstance(plain.neck, nn.Identity)


def test_mobilenet_taps_are_measured():
    model = create_model("faster_rcnn", backbone="mobilenetv3_large", levels=["features.13", "features.16"],
                         anchor_sizes=[[32, 64, 128, 256, 512]] * 3, image_size=320)
    assert model.backbone.feature_info.channels() == [160, 960]
    assert model.backbone.feature_info.reductions() == [32, 32]


@pytest.mark.parametrize("name, settings, params", [
    ("faster_rcnn", {}, 3_267_323), ("fast_rcnn", {}, 16_709_214),
    # the focal classifier has no background logit: representation_size + 1 parameters fewer (128 + 1, 1024 + 1)
    ("faster_rcnn", {"box_focal_gamma": 2.0, "rpn_focal_gamma": 2.0}, 3_267_194),
    ("fast_rcnn", {"focal_gamma": 2.0}, 16_708_189),
])
def test_shipped_recipe_builds_at_shapes_det_size(name, settings, params):
    config = read_option("model", name)
    kwargs = {key: value for key, value in config.items() if key not in MODEL_META_KEYS} | settings
    with torch.device("meta"):
        model = create_model(name, num_classes=5, image_size=128, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


def test_two_fc_head_shapes():
    head = TwoMLPHead(4 * 7 * 7, 32)
    assert head(torch.randn(5, 4, 7, 7)).shape == (5, 32)
    scores, deltas = BoxPredictor(32, 3)(torch.randn(5, 32))
    assert scores.shape == (5, 4) and deltas.shape == (5, 16)
