"""YOLOv6-N / S (v3.0): the published parameter and FLOP counts on the deployed form, RepVGG re-parameterisation
(block and whole model), the detection contract, and the loss's pieces: task-aligned assignment, the varifocal loss
and the SIoU / GIoU box losses."""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvlab.engine.export import fuse_for_export
from cvlab.layers.conv import ConvNormAct
from cvlab.layers.rep import RepVGGBlock
from cvlab.losses.yolo import YoloV5Loss
from cvlab.losses.yolov6 import YoloV6Loss, siou_loss, varifocal_loss
from cvlab.models import create_model, list_models
from cvlab.models.backbones.efficientrep import EfficientRep, RepBlock, SimCSPSPPF
from cvlab.models.necks.reppan import BiFusion, UpConcat
from cvlab.ops.assigners import TaskAlignedAssigner
from cvlab.utils.config import read_option
from cvlab.utils.errors import UserError
from detector_checks import (
    assert_detection_contract,
    assert_losses_reach_every_parameter,
    randomise_batch_norms,
    reparameterize,
    sample_targets,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = ["yolov6n", "yolov6s"]
# At 80 classes and 640 px: parameters as trained, deployed (RepVGG blocks fused, BatchNorms folded), and FLOPs
# (torch.utils.flop_counter: 2 · multiply-adds of the deployed convs). meituan/YOLOv6 0.3.0's own model, built from
# its configs and deployed the same way, has 34 parameters more: its head keeps a DFL projection (``proj`` and
# ``proj_conv``, 17 each) that the N and S models (reg_max 0) never use.
COUNTS = {"yolov6n": (5_058_236, 4_646_940, 11_316_019_200), "yolov6s": (20_147_324, 18_537_276, 44_966_707_200)}
# The 0.3.0 README: M parameters and GFLOPs at 640. They are its evaler's model summaries ("Params: 4.65M, Gflops:
# 11.40", thop on the deployed model, two decimals) rounded again to one decimal, and thop counts a transposed conv's
# multiply-adds per output element (``out · in_chs · k²``, 4× the true count for the 2×2 stride-2 upsampling).
README = {"yolov6n": (4.7, 11.4), "yolov6s": (18.5, 45.3)}
LOSS_NAMES = {"loss_cls", "loss_box"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def deployed_form(model: nn.Module) -> bool:
    """Whether every RepVGG block holds only its fused conv and no BatchNorm is left."""
    return not any(isinstance(m, nn.BatchNorm2d) or isinstance(m, RepVGGBlock) and hasattr(m, "conv3x3")
                   for m in model.modules())


# ------------------------------------------------------------------------------------------------- counts
def test_registered_as_detectors():
    assert set(VARIANTS) <= set(list_models(task="detection"))


@pytest.mark.parametrize("name", VARIANTS)
def test_exact_parameters_on_the_deployed_model_and_flops_at_640(name):
    params, deployed, flops = COUNTS[name]
    with torch.device("meta"):
        model = create_model(name)
        assert n_params(model) == params
        model.eval().fuse()
        transposed_excess = []  # thop's count of a transposed conv minus its true multiply-adds

        def thop_excess(module, inputs, output):
            true_macs = inputs[0].numel() * module.out_channels * math.prod(module.kernel_size)
            transposed_excess.append(output.numel() * module.in_channels * math.prod(module.kernel_size) - true_macs)

        hooks = [m.register_forward_hook(thop_excess) for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
        with FlopCounterMode(display=False) as counter:
            levels = model.forward_raw(torch.empty(1, 3, 640, 640))
    for hook in hooks:
        hook.remove()
    assert n_params(model) == deployed
    assert deployed_form(model)
    assert counter.get_total_flops() == flops
    assert [tuple(level.shape) for level in levels] == [(1, 84, 80, 80), (1, 84, 40, 40), (1, 84, 20, 20)]
    readme_params, readme_gflops = README[name]
    assert round(round(deployed / 1e6, 2), 1) == readme_params  # 4.65 -> 4.7, 18.54 -> 18.5
    assert round((flops + 2 * sum(transposed_excess)) / 1e9, 1) == readme_gflops  # 11.40, 45.28


def test_variant_layouts_follow_the_width_and_depth_multiples():
    # yolov6n: width 0.25 -> 16/32/64/128/256; depth 0.33 -> RepBlocks of 2/4/6/2, the neck's of 4.
    trunk = EfficientRep(width_multiple=0.25, depth_multiple=0.33)
    assert trunk.feature_info.channels() == [16, 32, 64, 128, 256]
    assert trunk.feature_info.reductions() == [2, 4, 8, 16, 32]
    assert [len(m) for m in trunk.modules() if isinstance(m, RepBlock)] == [2, 4, 6, 2]
    assert isinstance(trunk.stages[3][-1], SimCSPSPPF) and isinstance(trunk.stem, RepVGGBlock)
    assert (trunk.stem.conv3x3[1].eps, trunk.stem.conv3x3[1].momentum) == (1e-3, 0.03)
    with torch.device("meta"):
        n, s = create_model("yolov6n"), create_model("yolov6s")
    assert n.backbone.feature_info.reductions() == [4, 8, 16, 32]  # v3.0's neck reads P2 (fuse_P2)
    assert [len(m) for m in n.neck.modules() if isinstance(m, RepBlock)] == [4] * 4
    assert n.neck.out_channels == [32, 64, 128] and s.neck.out_channels == [64, 128, 256]
    assert s.backbone.feature_info.channels() == [64, 128, 256, 512]
    assert sum(isinstance(m, BiFusion) for m in n.neck.modules()) == 2


def _activations(part: nn.Module) -> set[str]:
    """The activations of the RepVGG blocks and of the convs outside them (whose branches have none)."""
    branches = {id(m) for block in part.modules() if isinstance(block, RepVGGBlock) for m in block.modules()}
    return ({type(m.act).__name__ for m in part.modules() if isinstance(m, RepVGGBlock)}
            | {type(m[2]).__name__ for m in part.modules() if isinstance(m, ConvNormAct) and id(m) not in branches})


def test_activations_are_relu_in_trunk_and_neck_and_silu_in_the_head_and_the_options_replace_them():
    model = create_model("yolov6n", num_classes=3, image_size=64)
    assert _activations(model.backbone) == _activations(model.neck) == {"ReLU"}
    assert _activations(model.head) == {"Swish"}
    mish = create_model("yolov6n", num_classes=3, image_size=64, act_layer=nn.Mish,
                        norm_layer=lambda c: nn.GroupNorm(1, c))
    assert _activations(mish) == {"Mish"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mish.modules())


# ------------------------------------------------------------------------------------------------- RepVGG block
@pytest.mark.parametrize("in_chs,out_chs,stride", [(8, 8, 1), (8, 16, 1), (8, 8, 2)])
def test_repvgg_block_fuses_into_one_conv_equal_to_its_branches(in_chs, out_chs, stride):
    torch.manual_seed(0)
    block = RepVGGBlock(in_chs, out_chs, stride)
    assert (block.identity is not None) == (in_chs == out_chs and stride == 1)
    randomise_batch_norms(block)
    block.eval()
    x = torch.randn(2, in_chs, 11, 11)
    with torch.no_grad():
        branches = block.forward_branches(x)
        folded = block(x)  # eval mode runs the equivalent conv, folded on the fly
        block.fuse()
        fused = block(x)
    assert fused.shape == (2, out_chs, 11 // stride + 11 % stride, 11 // stride + 11 % stride)
    torch.testing.assert_close(folded, branches, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, branches, rtol=0, atol=1e-5)
    assert [name for name, _ in block.named_children()] == ["act", "reparam"]
    assert n_params(block) == out_chs * in_chs * 9 + out_chs  # one biased 3×3 conv
    block.fuse()  # idempotent
    assert n_params(block) == out_chs * in_chs * 9 + out_chs


def test_repvgg_block_trains_with_its_branches_and_needs_eval_mode_to_fuse():
    block = RepVGGBlock(4, 4)
    assert n_params(block) == 9 * 16 + 16 + 3 * 2 * 4  # 3×3, 1×1, three BatchNorms
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), block.forward_branches(x))  # training: batch statistics, branch by branch
    with pytest.raises(RuntimeError, match="eval"):
        block.fuse()
    grouped = RepVGGBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c)).eval()
    assert not grouped.foldable and reparameterize(grouped) == 0 and hasattr(grouped, "conv3x3")
    torch.testing.assert_close(grouped(x), grouped.forward_branches(x))
    model = nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 8, 2)).eval()
    assert reparameterize(model) == 2 and reparameterize(model) == 0


@pytest.mark.parametrize("rep", [True, False])
def test_the_whole_model_deployed_equals_its_training_form(monkeypatch, rep):
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=5, image_size=128, rep=rep).eval()
    randomise_batch_norms(model)
    for module in model.head.modules():  # predictors off their zero start, so every branch reaches the outputs
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.bias is not None:
            nn.init.normal_(module.weight, std=0.1)
    images = torch.rand(2, 3, 128, 128)
    deployed = copy.deepcopy(model)
    fused = fuse_for_export(deployed)  # the export path: every fuse() hook, then the detector's
    assert "" in fused and (not rep or "backbone.stem" in fused)
    assert deployed_form(deployed)
    with torch.no_grad():
        folded = model.forward_raw(images)  # eval: the RepVGG blocks fold on the fly
        found, detections = deployed.forward_raw(images), deployed(images)
        with monkeypatch.context() as patch:
            patch.setattr(RepVGGBlock, "forward", RepVGGBlock.forward_branches)
            expected, expected_detections = model.forward_raw(images), model(images)
    for level, folded_level, fused_level in zip(expected, folded, found, strict=True):
        torch.testing.assert_close(folded_level, level, rtol=0, atol=1e-5)
        torch.testing.assert_close(fused_level, level, rtol=0, atol=1e-5)
    for det, fused_det in zip(expected_detections, detections, strict=True):  # (equal scores may swap places)
        torch.testing.assert_close(fused_det["scores"], det["scores"], rtol=0, atol=1e-5)


def test_rep_false_trains_the_deployed_layout_and_bic_false_is_the_v2_neck():
    with torch.device("meta"):
        plain = create_model("yolov6n", rep=False)
        v2 = create_model("yolov6n", bic=False)
    assert not any(isinstance(m, RepVGGBlock) for m in plain.modules())
    plain.eval().fuse()
    assert n_params(plain) == COUNTS["yolov6n"][1]  # the same deployed network, without the branches in training
    assert v2.backbone.feature_info.reductions() == [8, 16, 32]
    assert not any(isinstance(m, BiFusion) for m in v2.modules())
    assert sum(isinstance(m, UpConcat) for m in v2.modules()) == 2


# ------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name,size,options", [("yolov6n", 64, {}), ("yolov6s", 96, {"bic": False}),
                                               ("yolov6n", 128, {"rep": False})])
def test_train_losses_and_gradients_reach_every_parameter(name, size, options):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=size, width=0.5, depth=0.5, **options).train()
    losses = model(torch.rand(2, 3, size, size), sample_targets())
    assert_losses_reach_every_parameter(model, losses, LOSS_NAMES)
    # The predictors start at zero weights, so only they (and their biases) move on the first step.
    assert model.head.levels[0].cls_pred.weight.grad.abs().sum() > 0
    assert model.head.levels[0].reg_pred.weight.grad.abs().sum() > 0


def test_eval_returns_one_detection_dict_per_image_from_the_starting_prior():
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=3, image_size=64, max_det=20).eval()
    with torch.no_grad():
        raw = model.forward_raw(torch.rand(2, 3, 64, 64))
        boxes, scores = model.decode(raw, (64, 64))
        detections = model(torch.rand(2, 3, 64, 64))
    # initialize_biases: every class at 0.01, every distance 1 stride: the first cell's box is (4 ± 8, 4 ± 8).
    assert boxes.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 4) and scores.shape == (2, 84, 3)
    torch.testing.assert_close(scores, torch.full_like(scores, 0.01))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([-4.0, -4.0, 12.0, 12.0]))
    torch.testing.assert_close(boxes[0, 64], torch.tensor([-8.0, -8.0, 24.0, 24.0]))  # stride 16
    assert_detection_contract(detections, images=2, max_det=20, num_classes=3, size=64)


# ------------------------------------------------------------------------------------------------- assignment
def _hand_case():
    """Five points, two classes: points 0-3 inside object A = [0, 0, 4, 4] (class 1), point 4 outside; points 0 and 1
    also inside object B = [0, 0, 4, 2] (class 0). Predicted boxes: IoU with A 1, 0.5, 0.5, 0.25, 1."""
    points = torch.tensor([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [3.0, 3.0], [5.0, 5.0]])
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 2], [0, 0, 2, 4], [0, 0, 2, 2], [0, 0, 4, 4]])
    scores = torch.tensor([[0.3, 0.2], [0.6, 0.9], [0.1, 0.5], [0.1, 0.8], [0.1, 0.9]])
    return points, boxes, scores


def test_task_aligned_assignment_numbers_on_a_hand_made_case():
    points, boxes, scores = _hand_case()
    assigner = TaskAlignedAssigner(topk=2)
    a = dict(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]), labels=torch.tensor([1]))
    both = dict(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 2.0]]), labels=torch.tensor([1, 0]))
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    result = assigner(scores.expand(3, -1, -1), boxes.expand(3, -1, -1), points, [a, both, empty])

    # Image 0: t = s · u⁶ = 0.2, 0.9/64, 0.5/64, 0.8/4096 (point 4 is outside); the top 2 are points 0 and 1.
    metric, iou = assigner.alignment(scores, boxes, a["boxes"], a["labels"])
    torch.testing.assert_close(metric[0], torch.tensor([0.2, 0.9 / 64, 0.5 / 64, 0.8 / 4096, 0.9]))
    torch.testing.assert_close(iou[0], torch.tensor([1.0, 0.5, 0.5, 0.25, 1.0]))
    assert result.foreground[0].tolist() == [True, True, False, False, False]
    assert result.labels[0, :2].tolist() == [1, 1]
    # Soft targets t · max_u / max_t: 0.2 · 1 / 0.2 and (0.9 / 64) · 1 / 0.2, at class 1 only.
    expected = torch.zeros(5, 2)
    expected[0, 1], expected[1, 1] = 1.0, 0.9 / 64 / 0.2
    torch.testing.assert_close(result.scores[0], expected)
    torch.testing.assert_close(result.boxes[0, :2], a["boxes"].expand(2, 4))

    # Image 1: B's candidates are points 0 and 1 too; each contested point goes to the object its box overlaps
    # most: point 0 (IoU 1 with A, 0.5 with B) to A, point 1 (0.5, 1) to B. Each is its object's only positive.
    assert result.foreground[1].tolist() == [True, True, False, False, False]
    assert result.labels[1, :2].tolist() == [1, 0]
    expected = torch.zeros(5, 2)
    expected[0, 1], expected[1, 0] = 1.0, 1.0
    torch.testing.assert_close(result.scores[1], expected)
    torch.testing.assert_close(result.boxes[1, 1], both["boxes"][1])

    # Image 2 has no objects: no positives, zero targets.
    assert not result.foreground[2].any() and not result.scores[2].any()

    # α and β are the exponents of t.
    metric, _ = TaskAlignedAssigner(alpha=0.5, beta=2.0).alignment(scores, boxes, a["boxes"], a["labels"])
    torch.testing.assert_close(metric[0], scores[:, 1].sqrt() * iou[0].square())


def test_task_aligned_assignment_keeps_the_topk_13_best_aligned_inside_points():
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="xy"), -1).reshape(-1, 2) + 0.5
    centre = grid.repeat(1, 2)
    boxes = centre + torch.tensor([-3.0, -3.0, 3.0, 3.0]) * torch.rand(64, 4, generator=generator)
    scores = torch.rand(64, 3, generator=generator)
    target = dict(boxes=torch.tensor([[0.0, 0.0, 6.0, 6.0]]), labels=torch.tensor([2]))  # 36 points inside
    assigner = TaskAlignedAssigner()
    assert (assigner.topk, assigner.alpha, assigner.beta) == (13, 1.0, 6.0)
    result = assigner(scores[None], boxes[None], grid, [target])
    metric, iou = assigner.alignment(scores, boxes, target["boxes"], target["labels"])
    inside = ((grid > 0) & (grid < 6)).all(1)
    best = (metric[0] * inside).topk(13).indices
    assert result.foreground[0].sum() == 13 and set(result.foreground[0].nonzero().flatten().tolist()) == set(
        best.tolist())
    # The best-aligned positive's target is its own IoU.
    top = best[0]
    torch.testing.assert_close(result.scores[0, top, 2], iou[0, best].max())


# ------------------------------------------------------------------------------------------------- loss terms
def test_varifocal_loss_equals_its_formula():
    logits = torch.tensor([[1.2, -0.4, 0.3], [-2.0, 0.5, 2.5]])
    q = torch.tensor([[0.7, 0.0, 0.0], [0.0, 0.0, 0.2]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    p = logits.sigmoid()
    bce = -(q * p.log() + (1 - q) * (1 - p).log())
    expected = (bce * (0.75 * p.pow(2.0) * (1 - y) + q * y)).sum()
    torch.testing.assert_close(varifocal_loss(logits, q, y), expected)
    torch.testing.assert_close(varifocal_loss(logits, q, y, weighted=False), bce.sum())
    torch.testing.assert_close(varifocal_loss(logits, q, y, alpha=0.5, gamma=1.0),
                               (bce * (0.5 * p * (1 - y) + q * y)).sum())


def test_siou_values():
    square = torch.tensor([0.0, 0.0, 2.0, 2.0])
    torch.testing.assert_close(siou_loss(square, square), torch.tensor(0.0), atol=1e-6, rtol=0)
    # Shifted along x: IoU 1/3, angle 0 (Λ = 0, γ = 2), ρx = (1/3)², no shape cost.
    shifted = torch.tensor([1.0, 0.0, 3.0, 2.0])
    torch.testing.assert_close(siou_loss(square, shifted), torch.tensor(1 - 1 / 3 + (1 - math.exp(-2 / 9)) / 2))
    # Shifted along the diagonal: IoU 1/7, angle 45° (Λ = 1, γ = 1), ρx = ρy = (1/3)².
    diagonal = torch.tensor([1.0, 1.0, 3.0, 3.0])
    torch.testing.assert_close(siou_loss(square, diagonal), torch.tensor(1 - 1 / 7 + (1 - math.exp(-1 / 9))))
    # Same centre, twice as wide: IoU 1/2, no distance cost, shape cost (1 − e^(−1/2))⁴.
    wide = torch.tensor([[1.0, 0.0, 3.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    torch.testing.assert_close(siou_loss(*wide), torch.tensor([0.5 + (1 - math.exp(-0.5)) ** 4 / 2]))


def test_box_loss_follows_the_variant_and_giou_values():
    with torch.device("meta"):
        n, s = create_model("yolov6n"), create_model("yolov6s")
        configured = create_model("yolov6s", loss=YoloV6Loss())  # loss=yolov6 leaves box_loss to the variant
        chosen = create_model("yolov6s", loss=YoloV6Loss(box_loss="siou"))
    assert (n.loss.box_loss, s.loss.box_loss, configured.loss.box_loss, chosen.loss.box_loss) == (
        "siou", "giou", "giou", "siou")
    loss = YoloV6Loss(box_loss="giou")
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    truth = torch.tensor([[1.0, 0.0, 3.0, 2.0], [2.0, 0.0, 3.0, 1.0]])
    # IoU 1/3 filling its enclosing box (loss 2/3); disjoint, enclosing box 3 for a union of 2 (1 + 1/3).
    torch.testing.assert_close(loss._box_losses(pred, truth), torch.tensor([2 / 3, 4 / 3]))
    with pytest.raises(UserError, match="loss=yolov6"):
        create_model("yolov6n", num_classes=3, image_size=64, loss=YoloV5Loss())


def test_loss_config_holds_the_class_defaults():
    config = {k: v for k, v in read_option("loss", "yolov6").items() if k not in ("_target_", "name", "task")}
    defaults = {name: p.default for name, p in inspect.signature(YoloV6Loss).parameters.items()}
    assert config == defaults  # every argument, at YOLOv6's values
    assert (defaults["topk"], defaults["alpha"], defaults["beta"], defaults["box_weight"]) == (13, 1.0, 6.0, 2.5)


def test_an_image_without_objects_scores_only_the_varifocal_negatives():
    torch.manual_seed(0)
    levels = [torch.randn(1, 4 + 2, 8, 8), torch.randn(1, 4 + 2, 4, 4)]
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    losses = YoloV6Loss(box_loss="siou")(levels, empty, (64, 64))
    logits = torch.cat([level[:, 4:].flatten(2) for level in levels], 2)
    p = logits.sigmoid()
    expected = (0.75 * p.square() * -torch.log(1 - p)).sum()  # no positives: nothing to divide by
    torch.testing.assert_close(losses["loss_cls"], expected)
    assert losses["loss_box"] == 0
    bce = YoloV6Loss(box_loss="siou", cls_loss="bce")(levels, empty, (64, 64))
    torch.testing.assert_close(bce["loss_cls"], F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                                   reduction="sum"))


def test_positives_weigh_their_box_losses_by_their_soft_targets():
    levels = [torch.zeros(1, 4 + 1, 4, 4)]
    levels[0][:, :4] = 1.0  # every cell's box is its centre ± one stride (16 px at 64 px)
    target = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]), labels=torch.tensor([0]))]
    loss = YoloV6Loss(topk=1, box_loss="giou")
    losses = loss(levels, target, (64, 64))
    # The one positive: the cell centred at (24, 24), its box (8, 8, 40, 40) is the object: GIoU loss 0.
    assert losses["loss_box"] == 0
    # Its soft target is its IoU, 1; σ(0) = ½ everywhere: VFL = (q·BCE(½, 1) + Σ_15 0.75·¼·BCE(½, 0)) / q.
    expected = math.log(2) * (1 + 15 * 0.75 * 0.25)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(expected))


def test_loss_weights_and_varifocal_settings_act():
    torch.manual_seed(0)
    levels = [torch.randn(2, 4 + 3, 8, 8), torch.randn(2, 4 + 3, 4, 4)]
    levels[0][:, :4], levels[1][:, :4] = 1.5, 1.5  # boxes of 3 strides around each centre: overlaps to assign
    targets = sample_targets()
    reference = YoloV6Loss(box_loss="siou")(levels, targets, (64, 64))
    assert reference["loss_box"] > 0 and reference["loss_cls"] > 0
    weighted = YoloV6Loss(box_loss="siou", cls_weight=2.0, box_weight=1.0)(levels, targets, (64, 64))
    torch.testing.assert_close(weighted["loss_cls"], 2 * reference["loss_cls"])
    torch.testing.assert_close(weighted["loss_box"], reference["loss_box"] / 2.5)
    for setting in ({"vfl_alpha": 0.5}, {"vfl_gamma": 1.0}, {"topk": 1}, {"beta": 2.0}):
        changed = YoloV6Loss(box_loss="siou", **setting)(levels, targets, (64, 64))
        assert not torch.isclose(changed["loss_cls"], reference["loss_cls"]), setting
