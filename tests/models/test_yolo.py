"""YOLO v1–v3: exact sizes, outputs identical to the monolithic models of before, the detection contract, backbone
and loss options, decoding, post-processing, hand-computed losses, overfitting."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_iou

from cvlab.layers.init import get_init
from cvlab.losses.yolo import YoloV1Loss, YoloV2Loss, YoloV3Loss
from cvlab.models import create_model, list_models
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.models.necks.yolo_fpn import YoloV3FPN
from cvlab.ops.postprocess import DetectionPostprocess, decode_anchor_boxes, decode_cell_boxes, select_detections
from cvlab.utils.config import compose, read_option
from cvlab.utils.errors import UserError
from cvlab.utils.plugins import instantiate_plugin
from detector_checks import configurable_defaults, sample_targets, train_steps, two_scenes
from fixtures import yolo_reference

torch.set_num_threads(1)

DETECTORS = ["yolov1", "yolov1_tiny", "yolov2", "yolov2_tiny", "yolov3", "yolov3_tiny"]
# Tiny CPU builds: YOLOv1's input must be a multiple of 64 (its grid is image_size / 64), the others of 32.
TINY_SIZE = {"yolov1": 128, "yolov1_tiny": 128}
LOSS_NAMES = {"loss_box", "loss_obj", "loss_noobj", "loss_cls"}

# (name, classes, image_size): params, FLOPs (2·MACs of forward_raw), Conv2d layers, Linear layers
SIZES = {
    ("yolov3", 80, 416): (61_949_149, 65_864_075_264, 75, 0),  # yolov3.cfg: 61,949,149; Darknet: 65.86 Bn
    ("yolov3_tiny", 80, 416): (8_852_366, 5_564_961_792, 13, 0),  # yolov3-tiny.cfg; Darknet: 5.56 Bn
    ("yolov2", 80, 416): (50_962_889, 29_464_168_448, 23, 0),
    ("yolov2", 20, 416): (50_655_389, 29_360_334_848, 23, 0),
    ("yolov2_tiny", 20, 416): (15_861_773, 6_971_041_792, 9, 0),  # tiny-yolo-voc.cfg; Darknet: 6.97 Bn
    ("yolov1", 20, 448): (271_703_550, 40_570_306_560, 24, 2),  # the paper's 24 conv + 2 FC
    ("yolov1_tiny", 20, 448): (27_093_086, 3_216_030_720, 8, 1),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def tiny(name: str, **kw) -> nn.Module:
    return create_model(name, num_classes=3, image_size=TINY_SIZE.get(name, 64), width=0.125, **kw)


def test_registered_as_detectors():
    assert set(DETECTORS) <= set(list_models(task="detection"))


@pytest.mark.parametrize("key", SIZES, ids=lambda k: f"{k[0]}-{k[1]}cls")
def test_exact_size_flops_and_layers(key):
    name, classes, size = key
    params, flops, convs, linears = SIZES[key]
    with torch.device("meta"):
        model = create_model(name, num_classes=classes, image_size=size)
        with FlopCounterMode(display=False) as counter:
            model.forward_raw(torch.empty(1, 3, size, size))
    assert n_params(model) == params
    assert counter.get_total_flops() == flops
    assert (count(model, nn.Conv2d), count(model, nn.Linear)) == (convs, linears)


def test_yolov3_tiny_counts_8_858_734_with_batchnorm_statistics():
    # The often-quoted 8,858,734 adds BN running mean / var (non-trainable) to the 8,852,366 parameters.
    with torch.device("meta"):
        model = create_model("yolov3_tiny")
    stats = sum(b.numel() for k, b in model.named_buffers() if k.endswith(("running_mean", "running_var")))
    assert n_params(model) + stats == 8_858_734


def test_yolov3_raw_output_shapes_at_416():
    with torch.device("meta"):
        model = create_model("yolov3")
        levels = model.forward_raw(torch.empty(2, 3, 416, 416))
    assert [tuple(level.shape) for level in levels] == [(2, 3, 13, 13, 85), (2, 3, 26, 26, 85), (2, 3, 52, 52, 85)]
    # The coarsest grid gets the largest anchors.
    assert model.level_anchors()[0].tolist() == [[116, 90], [156, 198], [373, 326]]
    assert model.level_anchors()[2].tolist() == [[10, 13], [16, 30], [33, 23]]


def test_yolov1_paper_grid_and_output():
    with torch.device("meta"):
        model = create_model("yolov1", num_classes=20)
        boxes, classes = model.forward_raw(torch.empty(1, 3, 448, 448))
    assert model.grid_size == 7 and model.head[-1].out_features == 7 * 7 * 30
    assert boxes.shape == (1, 7, 7, 2, 5) and classes.shape == (1, 7, 7, 20)
    assert isinstance(model.head[3], nn.Dropout) and model.head[3].p == 0.5
    assert count(model, nn.BatchNorm2d) == 0  # the paper's net has no norm; its convs keep biases
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    bn = create_model("yolov1", num_classes=20, width=0.125, norm_layer=nn.BatchNorm2d)
    assert count(bn, nn.BatchNorm2d) == 24


@pytest.mark.parametrize("name", DETECTORS)
def test_train_losses_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = tiny(name).train()
    size = TINY_SIZE.get(name, 64)
    losses = model(torch.rand(2, 3, size, size), sample_targets())
    assert set(losses) == LOSS_NAMES
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", DETECTORS)
def test_eval_returns_one_detection_dict_per_image(name):
    torch.manual_seed(0)
    model = tiny(name, max_det=20).eval()
    size = TINY_SIZE.get(name, 64)
    with torch.no_grad():
        detections = model(torch.rand(2, 3, size, size))
    assert len(detections) == 2
    for det in detections:
        k = len(det["scores"])
        assert 0 < k <= 20
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,) and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 0) & (det["labels"] < 3)).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= size).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


@pytest.mark.parametrize("name", ["yolov2", "yolov2_tiny", "yolov3", "yolov3_tiny"])
def test_any_multiple_of_32_works_for_multiscale_training(name):
    model = tiny(name)  # built for 64 px
    levels = model.forward_raw(torch.rand(1, 3, 96, 160))
    assert [tuple(level.shape[2:4]) for level in levels][0] == (3, 5)
    model.train()
    assert set(model(torch.rand(1, 3, 96, 160), sample_targets()[:1])) == LOSS_NAMES


@pytest.mark.parametrize("name,init", [("yolov3_tiny", None), ("yolov2_tiny", None), ("yolov3", "xavier_uniform")])
def test_anchor_yolos_start_at_the_prior(name, init):
    """σ(objectness) = 0.01 and class probability 1/C in every slot at the start, even after an init= scheme."""
    torch.manual_seed(0)
    model = tiny(name)
    if init is not None:
        get_init(init)(model)
    with torch.no_grad():
        levels = model.eval().forward_raw(torch.rand(2, 3, 64, 64))
    for level in levels:
        assert level[..., 4].sigmoid().sub(0.01).abs().max() < 0.01
        probabilities = model.class_probabilities(level[..., 5:])
        assert probabilities.sub(1 / 3).abs().max() < 0.05


def test_input_size_validation_and_training_needs_targets():
    with pytest.raises(ValueError, match="multiple of 64"):
        create_model("yolov1", image_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("yolov3", image_size=100, width=0.125)
    model = tiny("yolov1").train()
    with pytest.raises(ValueError, match="fix its input"):
        model(torch.rand(1, 3, 192, 192), sample_targets()[:1])
    with pytest.raises(ValueError, match="needs targets"):
        tiny("yolov3_tiny").train()(torch.rand(1, 3, 64, 64))


def test_anchor_options():
    # Default anchors are the released 416-px sets rescaled to image_size; YOLOv2's are in 32-px grid cells.
    with torch.device("meta"):
        v3 = create_model("yolov3", image_size=320)
        v2 = create_model("yolov2")
    torch.testing.assert_close(v3.anchors[-1], torch.tensor([373.0, 326.0]) * 320 / 416)
    torch.testing.assert_close(v2.anchors[0], torch.tensor([0.57273, 0.677385]) * 32)
    # A user list is pixels at image_size, used as given (sorted by area over the scales for YOLOv3).
    anchors = [(40, 40), (5, 5), (20, 10), (8, 12), (60, 50), (12, 30)]
    model = create_model("yolov3_tiny", num_classes=1, image_size=64, width=0.125, anchors=anchors)
    assert [a.tolist() for a in model.level_anchors()] == [[[12, 30], [40, 40], [60, 50]],
                                                           [[5, 5], [8, 12], [20, 10]]]
    v2_custom = create_model("yolov2_tiny", num_classes=2, image_size=64, width=0.125, anchors=[(10, 20), (30, 30)])
    assert v2_custom.forward_raw(torch.rand(1, 3, 64, 64))[0].shape == (1, 2, 2, 2, 7)
    with pytest.raises(ValueError, match="split evenly"):
        create_model("yolov3", width=0.125, anchors=anchors[:4])


def test_postprocess_options_reach_the_model():
    model = tiny("yolov3_tiny", conf_thresh=0.25, iou_thresh=0.5, max_det=7)
    assert (model.postprocess.conf_thresh, model.postprocess.iou_thresh, model.postprocess.max_det) == (0.25, 0.5, 7)
    assert tiny("yolov1").postprocess.conf_thresh == 0.001 and tiny("yolov2").postprocess.iou_thresh == 0.45


# ------------------------------------------------------------------------------------ identical to the old models

# Old state-dict key prefix → new, per model: the monolithic ``body`` of commit 845989a became backbone, neck, head.
RENAMES = {
    "yolov2": [("body.backbone.", "backbone."), ("body.extra.", "neck.extra."),
               ("body.passthrough.", "neck.passthrough."), ("body.head.", "head.levels.0.")],
    "yolov2_tiny": [("body.trunk.", "backbone."), ("body.head.", "head.levels.0.")],
    "yolov3": [("body.backbone.", "backbone."), ("body.conv_sets.", "neck.conv_sets."),
               ("body.laterals.", "neck.laterals."), ("body.heads.", "head.levels.")],
    "yolov3_tiny": [("body.trunk.", "backbone."), ("body.reduce.", "neck.conv_sets.0.0."),
                    ("body.lateral.", "neck.laterals.0."), ("body.head_coarse.", "head.levels.0."),
                    ("body.head_fine.", "head.levels.1.")],
}


def _renamed(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@pytest.fixture(scope="module")
def reference():
    return torch.load(yolo_reference.FIXTURE, weights_only=True)


def _assert_same(actual, expected):
    # Float32 rounding through Darknet-53's 75 convolutions differs with the CPU's kernels (AVX2 vs AVX-512 oneDNN
    # paths): a few 1e-6 in eval mode, up to 2.2e-5 in train mode, whose batch statistics of two images amplify it
    # (AMD EPYC, torch 2.14.1); a wrong weight mapping or layer order differs by O(1).
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", yolo_reference.MODELS)
def test_outputs_and_losses_identical_to_the_monolithic_models_given_their_weights(name, reference):
    ref = reference[name]
    old_state = yolo_reference.reference_state(ref["keys"], ref["anchors"])
    # The weight rule still draws the weights of the reference run (up to the last bits of a vectorised draw).
    sums = {key: value.double().sum().item() for key, value in old_state.items() if key in ref["sums"]}
    assert sums == pytest.approx(ref["sums"], rel=1e-6, abs=1e-5)
    model = create_model(name, num_classes=yolo_reference.NUM_CLASSES, image_size=yolo_reference.IMAGE_SIZE,
                         width=yolo_reference.WIDTH, **yolo_reference.POSTPROCESS)
    state = {_renamed(key, RENAMES[name]): value for key, value in old_state.items()}
    # Every old weight has exactly one place, of the same shape, and nothing new was added.
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(state)

    images = yolo_reference.reference_images()
    with torch.no_grad():
        model.eval()
        for level, expected in zip(model.forward_raw(images), ref["eval_levels"], strict=True):
            _assert_same(level, expected)
        for found, expected in zip(model(images), ref["detections"], strict=True):
            assert found.keys() == expected.keys()
            for key in found:
                _assert_same(found[key], expected[key])
        model.train()
        for level, expected in zip(model.forward_raw(images), ref["train_levels"], strict=True):
            _assert_same(level, expected)
        losses = model(images, yolo_reference.reference_targets())
    assert losses.keys() == ref["losses"].keys()
    for key in losses:
        _assert_same(losses[key], ref["losses"][key])


# ------------------------------------------------------------------------------------------------ backbone option


def _trunk(name: str, size: int, out_indices=(-3, -2, -1), **kw) -> nn.Module:
    return create_model(name, features_only=True, out_indices=out_indices, image_size=size, **kw)


@pytest.mark.parametrize("backbone,size", [("resnet18", 128), ("mobilenetv2", 96)])
def test_yolov3_on_a_zoo_backbone_trains_evaluates_and_counts_trunk_neck_head(backbone, size):
    torch.manual_seed(0)
    model = create_model("yolov3", num_classes=3, image_size=size, width=0.125, backbone=backbone).train()
    trunk_chs = _trunk(backbone, size).feature_info.channels()  # finest first
    # The neck reads the backbone's widths: C5 into the first conv set, C4 and C3 beside the upsampled laterals.
    assert [block[0][0].in_channels for block in model.neck.conv_sets] == [trunk_chs[2], 32 + trunk_chs[1],
                                                                           16 + trunk_chs[0]]
    neck = YoloV3FPN(trunk_chs, [64, 32, 16])
    head = AnchorHead(neck.out_channels, [128, 64, 32], 3, 3)
    assert n_params(model) == n_params(_trunk(backbone, size)) + n_params(neck) + n_params(head)
    # The backbone keeps its own activation (act_layer=None); the neck and head use Darknet's.
    assert any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.backbone.modules())
    assert not any(isinstance(m, nn.LeakyReLU) for m in model.backbone.modules())
    assert isinstance(model.neck.conv_sets[0][0][2], nn.LeakyReLU)

    images = torch.rand(2, 3, size, size)
    losses = model(images, sample_targets())
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()] == []

    model.eval()
    with torch.no_grad():
        levels = model.forward_raw(images)
        detections = model(images)
    assert [tuple(level.shape) for level in levels] == [(2, 3, size // s, size // s, 8) for s in (32, 16, 8)]
    assert len(detections) == 2 and all(d["boxes"].shape == (len(d["scores"]), 4) for d in detections)


def test_zoo_backbones_under_yolov2_and_the_tiny_variants():
    size = 64  # the small stems: resnet18's last stages at strides 2, 4, 8
    reductions = _trunk("resnet18", size).feature_info.reductions()
    assert reductions == [2, 4, 8]
    v2 = create_model("yolov2", num_classes=3, image_size=size, width=0.125, backbone="resnet18")
    assert (v2.neck.passthrough[0].in_channels, v2.neck.extra[0][0].in_channels) == (256, 512)
    assert v2.forward_raw(torch.rand(1, 3, size, size))[0].shape == (1, 5, 8, 8, 8)
    v2_tiny = create_model("yolov2_tiny", num_classes=3, image_size=size, width=0.125, backbone="mobilenetv2")
    assert v2_tiny.head.levels[0][0][0].in_channels == 1280
    v3_tiny = create_model("yolov3_tiny", num_classes=3, image_size=size, width=0.125, backbone="resnet18")
    assert [tuple(level.shape[2:4]) for level in v3_tiny.forward_raw(torch.rand(1, 3, size, size))] == [(8, 8),
                                                                                                         (16, 16)]
    # The backbone gets the model's norm factory too.
    gn = create_model("yolov3_tiny", num_classes=3, image_size=size, width=0.125, backbone="resnet18",
                      norm_layer=lambda chs: nn.GroupNorm(1, chs))
    assert count(gn.backbone, nn.GroupNorm) == count(_trunk("resnet18", size, (-2, -1)), nn.BatchNorm2d) > 0


def test_backbones_without_the_needed_strides_or_that_are_no_classifiers_are_refused():
    with torch.device("meta"):
        with pytest.raises(UserError, match=r"vit_tiny's last 3 stages have reductions \[8, 8, 8\]"):
            create_model("yolov3", image_size=64, width=0.125, backbone="vit_tiny")
        with pytest.raises(UserError, match="must be a classification model.*resnet18"):
            create_model("yolov3", image_size=64, width=0.125, backbone="yolov3_tiny")
        with pytest.raises(UserError, match="Did you mean resnet18"):
            create_model("yolov3_tiny", image_size=64, width=0.125, backbone="resnet1")


def test_model_configs_take_the_backbone_option():
    for name in ("yolov2", "yolov2_tiny", "yolov3", "yolov3_tiny"):
        config = compose("train", [f"model={name}", "task=detection", "data=shapes_det"]).model
        assert "backbone" in config and config.backbone is None


# ---------------------------------------------------------------------------------------------------- loss option

LOSS_CONFIGS = {"yolov1": YoloV1Loss, "yolov2": YoloV2Loss, "yolov3": YoloV3Loss}


@pytest.mark.parametrize("option", LOSS_CONFIGS)
def test_loss_configs_are_the_paper_losses_with_every_setting_written_out(option):
    config = read_option("loss", option)
    assert (config.pop("name"), config.pop("task"), config.pop("_target_")) == (
        option, "detection", f"cvlab.losses.yolo.{LOSS_CONFIGS[option].__name__}")
    defaults = configurable_defaults(LOSS_CONFIGS[option])
    assert config == defaults  # the same settings as the model's default (loss=None)


@pytest.mark.parametrize("name,paper_loss", [("yolov1", YoloV1Loss), ("yolov2_tiny", YoloV2Loss),
                                             ("yolov3_tiny", YoloV3Loss)])
def test_the_paper_loss_is_the_default(name, paper_loss):
    assert type(tiny(name).loss) is paper_loss


def test_loss_overrides_reach_the_model():
    cfg = compose("train", ["model=yolov3_tiny", "loss=yolov3", "loss.ignore_thresh=0.7", "loss.coord_scale=2"])
    loss = instantiate_plugin(cfg.loss)
    assert type(loss) is YoloV3Loss and loss.assigner.ignore_thresh == 0.7

    torch.manual_seed(0)
    paper = tiny("yolov3_tiny").train()
    plugged = tiny("yolov3_tiny", loss=loss).train()
    plugged.load_state_dict(paper.state_dict())
    assert plugged.loss is loss
    images = torch.rand(2, 3, 64, 64)
    expected, found = paper(images, sample_targets()), plugged(images, sample_targets())
    assert found["loss_box"].item() == pytest.approx(2 * expected["loss_box"].item(), rel=1e-6)
    assert found["loss_cls"] == expected["loss_cls"]


def test_the_loss_decides_the_class_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    v3_softmax = tiny("yolov3_tiny", loss=YoloV2Loss())
    torch.testing.assert_close(v3_softmax.class_probabilities(logits), logits.softmax(-1))
    torch.testing.assert_close(tiny("yolov2_tiny", loss=YoloV3Loss()).class_probabilities(logits), logits.sigmoid())
    torch.testing.assert_close(tiny("yolov2_tiny").class_probabilities(logits), logits.softmax(-1))


def test_a_loss_of_another_kind_is_refused_naming_the_options():
    with pytest.raises(UserError, match="yolov3_tiny cannot train with CrossEntropyLoss.*loss=yolov3 or loss=yolov2"):
        tiny("yolov3_tiny", loss=nn.CrossEntropyLoss())
    with pytest.raises(UserError, match="YoloV3Loss.*loss=yolov1"):
        tiny("yolov1", loss=YoloV3Loss())
    with pytest.raises(UserError, match="YoloV1Loss.*loss=yolov2 or loss=yolov3"):
        tiny("yolov2", loss=YoloV1Loss())


# ---------------------------------------------------------------------------------------------------- decoding


def test_decode_anchor_boxes_direct_location_prediction():
    raw = torch.zeros(1, 1, 2, 2, 4)  # one anchor on a 2×2 grid of a 64×64 image: stride 32
    raw[0, 0, 1, 0] = torch.tensor([math.log(0.25 / 0.75), 0.0, math.log(2.0), math.log(0.5)])
    boxes = decode_anchor_boxes(raw, torch.tensor([[16.0, 8.0]]), (64, 64))
    # σ(tx) = 0.25 in column 0 → cx = 8; σ(0) = 0.5 in row 1 → cy = 48; w = 16·2, h = 8·0.5.
    torch.testing.assert_close(boxes[0, 0, 1, 0], torch.tensor([8.0 - 16, 48.0 - 2, 8.0 + 16, 48.0 + 2]))
    # Raw zeros: the anchor centred in its cell (row 0, column 1: centre (48, 16)).
    torch.testing.assert_close(boxes[0, 0, 0, 1], torch.tensor([40.0, 12.0, 56.0, 20.0]))


def test_decode_cell_boxes_yolov1():
    pred = torch.zeros(2, 2, 1, 4)  # S = 2, B = 1, image 64 high × 128 wide
    pred[1, 0, 0] = torch.tensor([0.5, 0.25, 0.5, 0.5])
    boxes = decode_cell_boxes(pred, (64, 128))
    # cx = (0 + 0.5)/2·128 = 32, cy = (1 + 0.25)/2·64 = 40, w = 0.5²·128 = 32, h = 0.5²·64 = 16.
    torch.testing.assert_close(boxes[1, 0, 0], torch.tensor([16.0, 32.0, 48.0, 48.0]))


# ------------------------------------------------------------------------------------------------- post-process


def test_select_detections_keeps_top_box_and_suppresses_overlap():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [-5, 0, 10, 80]],
                         dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.6], [0.0, 0.7], [0.3, 0.0], [0.0, 0.5]])
    out = select_detections(boxes, scores, (64, 64), conf_thresh=0.4, iou_thresh=0.5)
    # Box 1 loses to box 0 in class 0 (IoU 0.81) but survives as class 1; box 3 is under the threshold;
    # box 4 is clipped to the image.
    assert out["labels"].tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.7, 0.6, 0.5]))
    torch.testing.assert_close(out["boxes"][[0, 3]], torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 64]]))
    best_class = select_detections(boxes, scores, (64, 64), conf_thresh=0.4, iou_thresh=0.5, multi_label=False)
    assert best_class["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert len(select_detections(boxes, scores, (64, 64), conf_thresh=0.4, max_det=2)["scores"]) == 2
    batched = DetectionPostprocess(conf_thresh=0.4, iou_thresh=0.5)(boxes.expand(2, -1, -1), scores.expand(2, -1, -1),
                                                                    (64, 64))
    assert [len(d["scores"]) for d in batched] == [4, 4]


# ------------------------------------------------------------------------------------------------------ losses


def _iou(a, b):
    """Plain-Python IoU of two xyxy boxes, for the hand-computed expectations."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_yolov1_loss_by_hand():
    # S = 2, B = 2, C = 2 on a 64×64 image. One object: centre (40, 20), 16×32 → cell row 0, column 1;
    # targets x = 40/32 − 1 = 0.25, y = 20/32 = 0.625, √w = √0.25 = 0.5, √h = √0.5.
    box_pred = torch.zeros(1, 2, 2, 2, 5)
    box_pred[0, 0, 1, 0] = torch.tensor([0.5, 0.5, 0.3, 0.3, 0.6])  # a small box off-centre: low IoU
    box_pred[0, 0, 1, 1] = torch.tensor([0.3, 0.6, 0.45, 0.7, 0.2])  # close to the object: responsible
    box_pred[0, 1, 0, 0, 4] = 0.1  # confidence in an empty cell
    class_pred = torch.zeros(1, 2, 2, 2)
    class_pred[0, 0, 1] = torch.tensor([0.2, 0.7])
    class_pred[0, 1, 1] = torch.tensor([0.9, 0.9])  # class scores of an empty cell are not penalised
    gt = [32.0, 4.0, 48.0, 36.0]
    targets = [dict(boxes=torch.tensor([gt]), labels=torch.tensor([1]))]
    losses = YoloV1Loss()(box_pred, class_pred, targets, (64, 64))

    # Decoded predictor boxes: cx = (1 + x)/2·64, cy = y/2·64, w = √w²·64, h = √h²·64.
    iou_a = _iou([48 - 2.88, 16 - 2.88, 48 + 2.88, 16 + 2.88], gt)
    iou_b = _iou([41.6 - 6.48, 19.2 - 15.68, 41.6 + 6.48, 19.2 + 15.68], gt)
    assert iou_b > iou_a
    expected = dict(
        loss_box=5 * ((0.3 - 0.25) ** 2 + (0.6 - 0.625) ** 2 + (0.45 - 0.5) ** 2 + (0.7 - math.sqrt(0.5)) ** 2),
        loss_obj=(0.2 - iou_b) ** 2,
        loss_noobj=0.5 * (0.6**2 + 0.1**2),  # the non-responsible predictor of the object's cell counts too
        loss_cls=(0.2 - 0) ** 2 + (0.7 - 1) ** 2,
    )
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name

    # With an extra empty image every term is halved (sums are divided by the batch size).
    two = YoloV1Loss()(torch.cat([box_pred, torch.zeros_like(box_pred)]), class_pred.repeat(2, 1, 1, 1),
                       targets + [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))], (64, 64))
    assert two["loss_box"].item() == pytest.approx(expected["loss_box"] / 2, rel=1e-5)


def test_yolov1_responsible_falls_back_to_nearest_when_no_overlap():
    box_pred = torch.zeros(1, 1, 1, 2, 5)  # S = 1
    box_pred[0, 0, 0, 0] = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.3])  # no overlap, nearer the object
    box_pred[0, 0, 0, 1] = torch.tensor([0.99, 0.99, 0.05, 0.05, 0.4])  # no overlap, farther
    targets = [dict(boxes=torch.tensor([[0.0, 0.0, 16.0, 16.0]]), labels=torch.tensor([0]))]
    losses = YoloV1Loss()(box_pred, torch.zeros(1, 1, 1, 1), targets, (64, 64))
    assert losses["loss_noobj"].item() == pytest.approx(0.5 * 0.4**2)  # predictor 1 is the non-responsible one
    assert losses["loss_obj"].item() == pytest.approx(0.3**2)  # IoU target 0


# Two levels on a 64×64 image: coarse 2×2 (stride 32) with anchors 40×40, 60×30; fine 4×4 (stride 16) with 8×8,
# 12×20. One object of 12×18 centred at (20, 36): best shape IoU is 12×20 (216/240 = 0.9) → fine level, anchor 1,
# cell row 2, column 1, offsets x̂ = 20/16 − 1 = 0.25, ŷ = 36/16 − 2 = 0.25.
LEVEL_ANCHORS = [torch.tensor([[40.0, 40.0], [60.0, 30.0]]), torch.tensor([[8.0, 8.0], [12.0, 20.0]])]
OBJECT = [14.0, 27.0, 26.0, 45.0]


def _zero_outputs(num_classes: int):
    return [torch.zeros(1, 2, 2, 2, 5 + num_classes, requires_grad=True),
            torch.zeros(1, 2, 4, 4, 5 + num_classes, requires_grad=True)]


def test_yolov3_loss_by_hand_and_assignment():
    outputs = _zero_outputs(num_classes=3)
    targets = [dict(boxes=torch.tensor([OBJECT]), labels=torch.tensor([2]))]
    losses = YoloV3Loss(ignore_thresh=0.5)(outputs, LEVEL_ANCHORS, targets, (64, 64))
    sum(losses.values()).backward()
    # Only the assigned slot receives box / class gradients.
    class_grad = outputs[1].grad[..., 5:].abs().sum(-1)
    assert class_grad.nonzero().tolist() == [[0, 1, 2, 1]] and outputs[0].grad[..., 5:].abs().sum() == 0

    size_weight = 2 - 12 * 18 / (64 * 64)
    # Raw zeros: σ(tx) = σ(ty) = 0.5, tw = th = 0 against log(12/12), log(18/20).
    box = size_weight * ((0.5 - 0.25) ** 2 * 2 + 0.0 + math.log(18 / 20) ** 2)
    log2 = math.log(2.0)
    # Every other prediction (2·2·2 + 2·4·4 − 1 = 39) is a negative: none overlaps the object by more than 0.5.
    expected = dict(loss_box=box, loss_obj=log2, loss_noobj=39 * log2, loss_cls=3 * log2)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_yolov3_giou_box_loss():
    # A prediction decoding exactly onto the object has zero GIoU loss.
    outputs = _zero_outputs(num_classes=1)
    with torch.no_grad():
        outputs[1][0, 1, 2, 1, :4] = torch.tensor([math.log(0.25 / 0.75), math.log(0.25 / 0.75), 0.0,
                                                    math.log(18 / 20)])
    targets = [dict(boxes=torch.tensor([OBJECT]), labels=torch.tensor([0]))]
    giou = YoloV3Loss(box_loss="giou")(outputs, LEVEL_ANCHORS, targets, (64, 64))
    mse = YoloV3Loss(box_loss="mse")(outputs, LEVEL_ANCHORS, targets, (64, 64))
    assert giou["loss_box"].item() == pytest.approx(0.0, abs=1e-5)
    assert mse["loss_box"].item() == pytest.approx(0.0, abs=1e-5)


def test_yolov2_loss_by_hand():
    # One level (stride 16 on 64×64, 4×4 cells) with anchors 8×8 and 12×20; the object of test_yolov3 again.
    anchors = [LEVEL_ANCHORS[1]]
    outputs = [torch.zeros(1, 2, 4, 4, 5 + 4)]
    targets = [dict(boxes=torch.tensor([OBJECT]), labels=torch.tensor([1]))]
    losses = YoloV2Loss()(outputs, anchors, targets, (64, 64))
    size_weight = 2 - 12 * 18 / (64 * 64)
    # The assigned prediction decodes to the anchor centred in its cell: 12×20 at (24, 40).
    iou = _iou([18.0, 30.0, 30.0, 50.0], OBJECT)
    expected = dict(
        loss_box=size_weight * ((0.5 - 0.25) ** 2 * 2 + math.log(18 / 20) ** 2),
        loss_obj=5 * (0.5 - iou) ** 2,  # object_scale 5, target = IoU (rescore)
        loss_noobj=31 * 0.5**2,  # the other 2·4·4 − 1 predictions, none above the 0.6 ignore threshold
        loss_cls=math.log(4),  # softmax cross-entropy of uniform logits over 4 classes
    )
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_objects_without_area_are_skipped_and_empty_images_only_have_noobj():
    model = tiny("yolov3_tiny").train()
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 10.0, 30.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    losses = model(torch.rand(2, 3, 64, 64), targets)
    assert losses["loss_box"] == 0 and losses["loss_obj"] == 0 and losses["loss_cls"] == 0
    assert losses["loss_noobj"] > 0


# -------------------------------------------------------------------------------------------------- overfitting


def test_yolov3_tiny_overfits_two_images():
    images, boxes, targets = two_scenes(num_classes=1)

    model = create_model("yolov3_tiny", num_classes=1, image_size=64, width=0.25).train()
    history = train_steps(model, images, targets, 80)
    assert history[0] / history[-1] > 5

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, image_boxes in zip(detections, boxes):
        # The best detection matches an object, and every object is found among the top detections.
        assert box_iou(det["boxes"][:1], image_boxes).max() > 0.5
        assert (box_iou(det["boxes"][: len(image_boxes)], image_boxes).amax(0) > 0.5).all()
