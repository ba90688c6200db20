"""YOLOv4 / YOLOv4-tiny and their parts: exact sizes and FLOPs against the released cfgs, the CSPDarknet53, SPP and
PAN layouts, the detection contract, and each freebie option (CIoU, several anchors per truth, grid sensitivity,
label smoothing, DropBlock) changing what it should."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DropBlock2d

from cvlab.losses.yolo import YoloV1Loss, YoloV3Loss, YoloV4Loss
from cvlab.models import create_model, list_models
from cvlab.models.backbones.cspdarknet import CSPStage, TinyCSPDarknet
from cvlab.models.necks.pan import ConvSetPAN, SpatialPyramidPooling
from cvlab.ops.postprocess import anchor_cell_offsets
from cvlab.utils.config import read_option
from cvlab.utils.errors import UserError
from detector_checks import configurable_defaults

torch.set_num_threads(1)

# (name, classes, image size): trainable params, with BN running mean / var, FLOPs (2·MACs of forward_raw), convs
SIZES = {
    # yolov4.cfg: 64,363,101 (64,429,405 with BN statistics); Darknet: 60.1 BFlops at 416
    ("yolov4", 80, 416): (64_363_101, 64_429_405, 60_104_771_584, 110),
    # yolov4-tiny.cfg: 6,056,606 (6,062,814); Darknet: 6.9 BFlops
    ("yolov4_tiny", 80, 416): (6_056_606, 6_062_814, 6_907_876_352, 21),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def small(name: str, **kw) -> nn.Module:
    return create_model(name, num_classes=3, image_size=64, width=0.125, **kw)


def sample_targets():
    return [
        dict(boxes=torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 20.0, 30.0, 28.0]]), labels=torch.tensor([0, 2])),
        dict(boxes=torch.tensor([[30.0, 10.0, 62.0, 60.0]]), labels=torch.tensor([1])),
    ]


def test_registered_and_configured():
    assert {"yolov4", "yolov4_tiny"} <= set(list_models(task="detection"))
    assert "cspdarknet53" in list_models(task="classification")
    for name in ("yolov4", "yolov4_tiny"):
        config = read_option("model", name)
        assert (config["name"], config["task"], config["xy_scales"]) == (name, "detection", None)
    assert read_option("model", "yolov4")["dropblock"] == 0.0  # off, as in the released cfg


def test_loss_config_is_the_yolov4_loss_with_every_setting_written_out():
    config = read_option("loss", "yolov4")
    assert (config.pop("name"), config.pop("task"), config.pop("_target_")) == (
        "yolov4", "detection", "cvlab.losses.yolo.YoloV4Loss")
    assert config == configurable_defaults(YoloV4Loss)
    assert config["box_loss"] == "ciou" and config["iou_thresh"] == 0.213 and config["ignore_thresh"] == 0.7


@pytest.mark.parametrize("key", SIZES, ids=lambda k: k[0])
def test_exact_size_and_flops_of_the_released_cfgs(key):
    name, classes, size = key
    params, with_bn_stats, flops, convs = SIZES[key]
    with torch.device("meta"):
        model = create_model(name, num_classes=classes, image_size=size)
        with FlopCounterMode(display=False) as counter:
            raw = model.forward_raw(torch.empty(1, 3, size, size))
    assert n_params(model) == params
    bn_stats = sum(b.numel() for buffer, b in model.named_buffers() if buffer.endswith(("running_mean", "running_var")))
    assert params + bn_stats == with_bn_stats
    assert counter.get_total_flops() == flops
    assert count(model, nn.Conv2d) == convs
    grids = [13, 26] if name == "yolov4_tiny" else [52, 26, 13]
    assert [tuple(level.shape) for level in raw] == [(1, 3, g, g, 85) for g in grids]


def test_yolov4_activations_mish_in_the_trunk_leaky_after_it():
    with torch.device("meta"):
        model = create_model("yolov4", num_classes=80)
        tiny = create_model("yolov4_tiny", num_classes=80)
    # 72 trunk convs with Mish; 35 neck and head convs with LeakyReLU(0.1); 3 linear output convs.
    assert (count(model.backbone, nn.Mish), count(model.backbone, nn.LeakyReLU)) == (72, 0)
    assert (count(model.neck, nn.LeakyReLU) + count(model.head, nn.LeakyReLU), count(model, nn.Mish)) == (35, 72)
    assert (count(tiny, nn.LeakyReLU), count(tiny, nn.Mish)) == (19, 0)
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))


def test_cspdarknet53_classifier_size_stages_and_features():
    with torch.device("meta"):
        model = create_model("cspdarknet53", num_classes=1000, image_size=256)
        with FlopCounterMode(display=False) as counter:
            assert model(torch.empty(1, 3, 256, 256)).shape == (1, 1000)
    assert n_params(model) == 27_642_184  # csdarknet53-omega.cfg
    assert counter.get_total_flops() == 13_067_304_960
    assert [len(stage.blocks) for stage in model.stages] == [1, 2, 8, 8, 4]
    first, second = model.stages[0], model.stages[1]
    # The first stage keeps 64 channels in its splits and halves to 32 in its block; later ones split to half.
    assert (first.split_main[0].out_channels, first.blocks[0].reduce[0].out_channels) == (64, 32)
    assert (second.split_main[0].out_channels, second.blocks[0].reduce[0].out_channels) == (64, 64)

    features = create_model("cspdarknet53", features_only=True, out_indices=(-3, -2, -1), width=0.125,
                            stem="standard")
    assert [o.shape[1:] for o in features(torch.zeros(1, 3, 64, 64))] == [(32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert features.feature_info.reductions() == [8, 16, 32]


def test_csp_stage_concatenates_the_blocks_part_and_the_shortcut_part():
    stage = CSPStage(4, 8, 1, first=False, downsample=True, norm_layer=None, act_layer=nn.ReLU).eval()
    x = torch.randn(1, 4, 8, 8)
    down = stage.down(x)
    expected = stage.fuse(torch.cat([stage.transition(stage.blocks(stage.split_main(down))),
                                     stage.split_shortcut(down)], 1))
    assert torch.equal(stage(x), expected)
    assert stage(x).shape == (1, 8, 4, 4)


def test_tiny_trunk_levels_are_the_last_blocks_partial_output_and_the_last_conv():
    trunk = TinyCSPDarknet(width=0.25).eval()
    x = torch.randn(1, 3, 64, 64)
    c4, c5 = trunk(x)
    assert (c4.shape, c5.shape) == ((1, 64, 4, 4), (1, 128, 2, 2))
    assert trunk.feature_info.channels() == [64, 128] and trunk.feature_info.reductions() == [16, 32]
    # The partial output is the block's fused 1×1 conv of its split half; the block passes on [conv out, partial].
    y = trunk.stem(x)
    for block in trunk.blocks[:2]:
        y, _ = block(y)
    block = trunk.blocks[2]
    conv_out = block.conv(y)
    first = block.part1(conv_out[:, block.half:])
    partial = block.fuse(torch.cat([block.part2(first), first], 1))
    assert torch.equal(c4, partial)
    assert torch.equal(c5, trunk.final_conv(F.max_pool2d(torch.cat([conv_out, partial], 1), 2)))


def test_spp_concatenates_13_9_5_pools_then_the_input():
    x = torch.randn(1, 2, 16, 16)
    out = SpatialPyramidPooling((5, 9, 13))(x)
    expected = [F.max_pool2d(x, k, 1, k // 2) for k in (13, 9, 5)] + [x]
    assert torch.equal(out, torch.cat(expected, 1))
    with pytest.raises(ValueError, match="odd"):
        SpatialPyramidPooling((4,))


def test_pan_levels_widths_and_the_spp_option():
    levels = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]
    pan = ConvSetPAN([8, 16, 32], [4, 8, 16])
    assert [o.shape for o in pan(levels)] == [(1, 4, 16, 16), (1, 8, 8, 8), (1, 16, 4, 4)]
    assert pan.out_channels == [4, 8, 16]
    assert count(pan, SpatialPyramidPooling) == 1
    plain = ConvSetPAN([8, 16, 32], [4, 8, 16], spp_pool_sizes=())
    assert count(plain, SpatialPyramidPooling) == 0 and len(plain.top) == 5
    # Without SPP the top is one 5-conv set (32 → 16 ...) instead of 3 + SPP(×4 channels) + 3 convs.
    assert n_params(plain) < n_params(pan)


@pytest.mark.parametrize("name", ["yolov4", "yolov4_tiny"])
@pytest.mark.parametrize("size", [64, 96])
def test_losses_backward_and_detection_contract(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=size, width=0.125).train()
    images = torch.rand(2, 3, size, size)
    losses = model(images, sample_targets())
    assert set(losses) == {"loss_box", "loss_obj", "loss_noobj", "loss_cls"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "scores", "labels"}
        assert found["boxes"].shape == (len(found["scores"]), 4) and found["labels"].dtype == torch.int64
        assert ((found["labels"] >= 0) & (found["labels"] < 3)).all()


def test_default_losses_follow_the_cfgs():
    v4, tiny = small("yolov4").loss, small("yolov4_tiny").loss
    assert type(v4) is YoloV4Loss and type(tiny) is YoloV4Loss
    assert (v4.box_loss, v4.assigner.iou_thresh, v4.assigner.ignore_thresh) == ("ciou", 0.213, 0.7)
    assert (tiny.box_loss, tiny.assigner.iou_thresh, tiny.assigner.ignore_thresh) == ("ciou", 1.0, 0.7)
    assert type(small("yolov4", loss=YoloV3Loss()).loss) is YoloV3Loss
    with pytest.raises(UserError, match="loss=yolov4"):
        small("yolov4", loss=YoloV1Loss())


def test_anchors_masks_and_xy_scales_of_the_cfgs():
    v4 = create_model("yolov4", num_classes=3, image_size=512, width=0.125)
    # yolov4.cfg's anchors are for 512 px: unchanged there, and 9 anchors 3 per scale from the finest.
    assert v4.anchors[0].tolist() == [12, 16] and v4.anchors[-1].tolist() == [459, 401]
    assert v4.anchor_masks == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert v4.head.level_xy_scales() == [1.2, 1.1, 1.05]
    assert torch.allclose(small("yolov4").anchors, v4.anchors * 64 / 512)
    tiny = create_model("yolov4_tiny", num_classes=3, image_size=416, width=0.125)
    assert tiny.anchors[0].tolist() == [10, 14] and tiny.anchor_masks == [[3, 4, 5], [1, 2, 3]]
    assert tiny.head.level_xy_scales() == [1.05, 1.05]
    own = small("yolov4_tiny", anchors=[[4, 4], [8, 8], [12, 12], [16, 16], [24, 24], [40, 40]])
    assert own.anchor_masks == [[3, 4, 5], [0, 1, 2]]  # user anchors: split evenly, largest on the coarse scale


def test_zoo_backbone_replaces_the_trunk():
    model = create_model("yolov4", num_classes=3, image_size=64, width=0.125, backbone="resnet18").train()
    assert model.neck.laterals[-1][0].in_channels == 128  # resnet18's C3 (finest level) feeds the last lateral
    losses = model(torch.rand(1, 3, 64, 64), sample_targets()[:1])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(UserError, match="classification model"):
        small("yolov4", backbone="yolov3")


# ------------------------------------------------------------------------------------------------- the freebies
def _one_level(iou_thresh: float = 1.0, **kw):
    """A 4×4 grid at 128 px with anchors 32², 64², 16×48, raw outputs 0 and one object in cell (2, 2)."""
    loss = YoloV4Loss(iou_thresh=iou_thresh, **kw)
    outputs = [torch.zeros(1, 3, 4, 4, 5 + 2)]
    anchors = [torch.tensor([[32.0, 32.0], [64.0, 64.0], [16.0, 48.0]])]
    targets = [dict(boxes=torch.tensor([[40.0, 40.0, 90.0, 100.0]]), labels=torch.tensor([1]))]
    return loss, outputs, anchors, targets


def test_ciou_box_loss_is_one_minus_ciou_of_the_decoded_box():
    loss, outputs, anchors, targets = _one_level()
    found = loss(outputs, anchors, targets, (128, 128))["loss_box"].item()
    # The best anchor (64×64, IoU 0.73) decodes at raw 0 to the cell's centre (80, 80): box [48, 48, 112, 112].
    inter, union = 42 * 52, 64 * 64 + 50 * 60 - 42 * 52
    iou = inter / union
    centre_distance = (80 - 65) ** 2 + (80 - 70) ** 2
    enclosing_diagonal = 72**2 + 72**2
    v = 4 / math.pi**2 * (math.atan(50 / 60) - math.atan(64 / 64)) ** 2
    expected = 1 - iou + centre_distance / enclosing_diagonal + v**2 / (1 - iou + v)
    assert found == pytest.approx(expected, rel=1e-5)
    mse, *_ = _one_level(box_loss="mse")
    assert mse(outputs, anchors, targets, (128, 128))["loss_box"].item() != pytest.approx(found, rel=1e-3)


def _positives_per_level(loss, anchors, targets, image_size, grids):
    pred = [torch.zeros(1, len(a), g, g, 4) for a, g in zip(anchors, grids)]
    return [len(a.image) for a in loss.assigner(pred, anchors, targets, image_size)]


def test_iou_thresh_gives_an_object_to_every_anchor_above_it():
    model = create_model("yolov4", num_classes=3, image_size=416, width=0.125)
    anchors = model.level_anchors()
    targets = [dict(boxes=torch.tensor([[100.0, 100.0, 130.0, 160.0]]), labels=torch.tensor([0]))]
    # A 30×60 box: shape IoU 0.96 with anchor 3; above 0.213 also anchors 1, 2 (finest scale), 4 and 5.
    several = _positives_per_level(YoloV4Loss(), anchors, targets, (416, 416), [52, 26, 13])
    best_only = _positives_per_level(YoloV4Loss(iou_thresh=1.0), anchors, targets, (416, 416), [52, 26, 13])
    assert several == [2, 3, 0] and best_only == [0, 1, 0]
    torch.manual_seed(0)
    model.train()
    images = torch.rand(1, 3, 416, 416)
    with torch.no_grad():
        raw = model.forward_raw(images)
    assert (model.loss(raw, anchors, targets, (416, 416))["loss_obj"]
            > YoloV4Loss(iou_thresh=1.0)(raw, anchors, targets, (416, 416))["loss_obj"])


def test_an_anchor_on_two_levels_is_a_positive_on_both():
    tiny = create_model("yolov4_tiny", num_classes=3, image_size=416, width=0.125)
    anchors = tiny.level_anchors()  # coarse [3, 4, 5], fine [1, 2, 3]: anchor 3 (81×82) on both
    loss = tiny.loss
    on_anchor_3 = [dict(boxes=torch.tensor([[100.0, 100.0, 180.0, 180.0]]), labels=torch.tensor([0]))]
    on_anchor_0 = [dict(boxes=torch.tensor([[100.0, 100.0, 110.0, 114.0]]), labels=torch.tensor([0]))]
    assert _positives_per_level(loss, anchors, on_anchor_3, (416, 416), [13, 26]) == [1, 1]
    assert _positives_per_level(loss, anchors, on_anchor_0, (416, 416), [13, 26]) == [0, 1]


def test_grid_sensitivity_scales_the_decoded_centres_in_eval_and_training():
    assert anchor_cell_offsets(torch.tensor([0.0, 20.0, -20.0]), 1.2).tolist() == pytest.approx([0.5, 1.1, -0.1])
    torch.manual_seed(0)
    paper = small("yolov4")
    plain = small("yolov4", xy_scales=[1.0, 1.0, 1.0])
    plain.load_state_dict(paper.state_dict())
    images = torch.rand(2, 3, 64, 64)
    paper.eval(), plain.eval()
    with torch.no_grad():
        raw = paper.forward_raw(images)
        (paper_boxes, _), (plain_boxes, _) = paper.decode(raw, (64, 64)), plain.decode(raw, (64, 64))
    # Finest level (stride 8, s = 1.2): the centre moves by 0.2 · (σ(t) − ½) · 8; the sizes stay.
    finest = raw[0].numel() // raw[0].shape[-1] // 2
    shift = 0.2 * (raw[0][..., 0].sigmoid() - 0.5).reshape(2, -1) * 8
    centre_x = (paper_boxes[..., 0] + paper_boxes[..., 2]) / 2 - (plain_boxes[..., 0] + plain_boxes[..., 2]) / 2
    assert torch.allclose(centre_x[:, :finest], shift, atol=1e-5) and shift.abs().max() > 0.01
    assert torch.allclose(paper_boxes[..., 2] - paper_boxes[..., 0], plain_boxes[..., 2] - plain_boxes[..., 0])
    # The loss decodes with the model's scales too.
    paper.train(), plain.train()
    assert paper(images, sample_targets())["loss_box"] != plain(images, sample_targets())["loss_box"]


def test_label_smoothing_moves_the_class_targets_to_half_epsilon():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    smoothed = YoloV4Loss(label_smoothing=0.2).class_loss(logits, labels)
    target = torch.full((4, 3), 0.1)
    target[torch.arange(4), labels] = 0.9
    assert smoothed == pytest.approx(F.binary_cross_entropy_with_logits(logits, target, reduction="sum").item())
    assert smoothed != pytest.approx(YoloV4Loss().class_loss(logits, labels).item())
    with pytest.raises(ValueError, match="label_smoothing"):
        YoloV4Loss(label_smoothing=1.0)


def test_dropblock_drops_neck_features_in_training_only():
    torch.manual_seed(0)
    plain = small("yolov4")
    dropped = small("yolov4", dropblock=0.3)
    dropped.load_state_dict(plain.state_dict())  # DropBlock has no weights and keeps every state_dict key
    # After the first 3×3 of each conv set that follows a concatenation: SPP's second set, 2 top-down, 2 bottom-up.
    assert count(dropped.neck, DropBlock2d) == 5
    assert all(m.p == 0.3 and m.block_size == 3 for m in dropped.modules() if isinstance(m, DropBlock2d))
    plain.eval(), dropped.eval()
    with torch.no_grad():
        levels = plain.backbone(torch.rand(2, 3, 64, 64))
        assert all(torch.equal(a, b) for a, b in zip(plain.neck(levels), dropped.neck(levels)))
        plain.train(), dropped.train()
        assert not torch.equal(plain.neck(levels)[0], dropped.neck(levels)[0])
    with pytest.raises(ValueError, match="DropBlock"):
        small("yolov4_tiny", dropblock=0.1)
