"""Imbalance options of the dense tasks against hand computations (issue 14, loss level): the sigmoid focal loss and
class weights of the YOLO class / objectness terms (v3, v4, v5, v7), pixel OHEM (MMSegmentation's OHEMPixelSampler
rule) and class-weighted pixel cross-entropy for segmentation, OHEM over the RoIs of Fast / Faster R-CNN and the
sigmoid focal loss of their RPN objectness and box classifier; each as a config option that reaches a one-step
training run and takes effect there."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss, sigmoid_focal_loss

from cvlab.data.base import IGNORE_INDEX
from cvlab.losses.segmentation import OHEMPixelCrossEntropy, WeightedPixelCrossEntropy
from cvlab.losses.yolo import BinaryTerms, YoloV3Loss, YoloV4Loss, YoloV5Loss, YoloV7Loss
from cvlab.models.heads.roi_heads import BoxPredictor, RoIHeads, RoIPooler, TwoMLPHead
from cvlab.models.heads.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from cvlab.ops.postprocess import decode_anchor_boxes
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_STEP = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "~callbacks.model_checkpoint",
            "~callbacks.last_checkpoint", "trainer.enable_checkpointing=false"]


def hand_focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Lin et al.'s sigmoid focal loss, element-wise, from its definition."""
    p = logits.sigmoid()
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log())
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = 1.0 if alpha is None else alpha * targets + (1 - alpha) * (1 - targets)
    return weight * (1 - p_t) ** gamma * bce


# ---------------------------------------------------------------------------------------------- focal terms
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.2, 4.0]])
TARGETS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 1.0]])  # a soft target too (an IoU as objectness target)


def test_focal_terms_are_lin_et_al_s_and_torchvision_s():
    for gamma, alpha in ((1.5, 0.25), (2.0, None), (0.5, 0.6)):
        terms = BinaryTerms(focal_gamma=gamma, focal_alpha=alpha)(LOGITS, TARGETS)
        torch.testing.assert_close(terms, hand_focal(LOGITS, TARGETS, gamma, alpha))
        torch.testing.assert_close(terms, sigmoid_focal_loss(LOGITS, TARGETS, -1 if alpha is None else alpha, gamma))
    # gamma 0 (the default): the plain BCE, whatever alpha is.
    bce = F.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none")
    torch.testing.assert_close(BinaryTerms()(LOGITS, TARGETS), bce)
    torch.testing.assert_close(BinaryTerms(focal_alpha=0.9)(LOGITS, TARGETS), bce)
    # The easy negative (-3 against 0) loses most: (1 - 0.953)^1.5 x 0.75 of its BCE.
    ratio = BinaryTerms(focal_gamma=1.5)(LOGITS, TARGETS) / bce
    assert ratio[1, 0].item() == pytest.approx(0.75 * (1 - torch.sigmoid(torch.tensor(3.0)).item()) ** 1.5, rel=1e-5)


def test_class_weights_scale_each_positive_by_its_class():
    labels = torch.tensor([0, 2])
    terms = BinaryTerms(class_weights=[1.0, 5.0, 3.0], num_classes=3).classes(LOGITS, TARGETS, labels)
    bce = F.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none")
    torch.testing.assert_close(terms, bce * torch.tensor([[1.0], [3.0]]))
    balanced = BinaryTerms(class_weights="balanced", num_classes=3, class_counts=[6, 3, 1])
    assert balanced.class_weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])  # n / (k · n_c)
    with pytest.raises(UserError, match="loss.class_weights has 2 weights but the data has 3 classes"):
        BinaryTerms(class_weights=[1.0, 2.0], num_classes=3)
    with pytest.raises(UserError, match="^loss.focal_gamma must be a number >= 0"):
        BinaryTerms(focal_gamma=-1)


# YOLOv3's hand case: two levels on a 64 px image; zero outputs; the object goes to the fine level's anchor 1 in cell
# (2, 1), every other of the 40 predictions is a negative (tests/models/test_yolo.py, test_yolov3_loss_by_hand).
LEVEL_ANCHORS = [torch.tensor([[40.0, 40.0], [60.0, 30.0]]), torch.tensor([[8.0, 8.0], [12.0, 20.0]])]
OBJECT = [dict(boxes=torch.tensor([[14.0, 27.0, 26.0, 45.0]]), labels=torch.tensor([2]))]


def _zero_outputs():
    return [torch.zeros(1, 2, 2, 2, 8), torch.zeros(1, 2, 4, 4, 8)]


def test_yolov3_focal_terms_by_hand():
    plain = YoloV3Loss()(_zero_outputs(), LEVEL_ANCHORS, OBJECT, (64, 64))
    focal = YoloV3Loss(focal_gamma=1.5)(_zero_outputs(), LEVEL_ANCHORS, OBJECT, (64, 64))
    # p = 0.5 everywhere: each BCE is log 2, times (1 - 0.5)^1.5 and α_t (0.25 for a target 1, 0.75 for a 0).
    easy = 0.5 ** 1.5 * math.log(2)
    expected = dict(loss_obj=0.25 * easy, loss_noobj=39 * 0.75 * easy, loss_cls=(0.25 + 2 * 0.75) * easy)
    for name, value in expected.items():
        assert focal[name].item() == pytest.approx(value, rel=1e-5), name
        assert plain[name].item() != pytest.approx(value, rel=1e-2), name  # the option changes the value
    assert focal["loss_box"] == plain["loss_box"]
    weighted = YoloV3Loss(class_weights=[1.0, 1.0, 4.0], num_classes=3)(_zero_outputs(), LEVEL_ANCHORS, OBJECT,
                                                                       (64, 64))
    assert weighted["loss_cls"].item() == pytest.approx(4 * plain["loss_cls"].item(), rel=1e-6)  # the object: class 2
    assert weighted["loss_noobj"] == plain["loss_noobj"]


def single_object_case():
    """tests/models/test_yolov5.py's: one 16 px object in cell (3, 4) of a one-anchor 8 x 8 level, one positive."""
    raw = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    anchors = [torch.tensor([[12.0, 20.0]])]
    targets = [dict(boxes=torch.tensor([[20.0, 28.0, 36.0, 44.0]]), labels=torch.tensor([1]))]
    return [raw], anchors, targets, (64, 64)


def test_yolov5_focal_objectness_by_hand():
    outputs, anchors, targets, size = single_object_case()
    found = YoloV5Loss(balance=(4.0,), focal_gamma=1.5, focal_alpha=0.25)(outputs, anchors, targets, size)
    plain = YoloV5Loss(balance=(4.0,))(outputs, anchors, targets, size)
    raw, slot = outputs[0], (0, 0, 4, 3)
    box = decode_anchor_boxes(raw[..., :4], anchors[0], size, 2.0, True)[slot]
    obj_target = torch.zeros(1, 1, 8, 8)
    obj_target[slot] = (1 - complete_box_iou_loss(box[None], targets[0]["boxes"])).clamp(min=0)
    focal = hand_focal(raw[..., 4], obj_target, 1.5, 0.25)
    obj_gain = 64 * 64 / 640 ** 2 * 3 * 4.0 / 64
    assert found["loss_obj"].item() == pytest.approx(obj_gain * focal[slot].item(), rel=1e-5)
    assert found["loss_noobj"].item() == pytest.approx(obj_gain * (focal.sum() - focal[slot]).item(), rel=1e-5)
    class_focal = hand_focal(raw[slot][5:], torch.tensor([0.0, 1.0, 0.0]), 1.5, 0.25).mean()
    assert found["loss_cls"].item() == pytest.approx(0.5 * 3 / 80 * 3 * class_focal.item(), rel=1e-5)
    assert found["loss_box"] == plain["loss_box"] and found["loss_noobj"] < 0.5 * plain["loss_noobj"]


@pytest.mark.parametrize("loss_type", [YoloV3Loss, YoloV4Loss, YoloV5Loss, YoloV7Loss])
def test_every_logistic_yolo_loss_takes_the_options(loss_type):
    outputs, anchors, targets, size = single_object_case()
    levels = dict(balance=(4.0,)) if issubclass(loss_type, YoloV5Loss) else {}
    plain = loss_type(**levels)(outputs, anchors, targets, size)
    assert loss_type(**levels, focal_gamma=0.0)(outputs, anchors, targets, size) == plain
    focal = loss_type(**levels, focal_gamma=2.0)(outputs, anchors, targets, size)
    assert focal["loss_box"] == plain["loss_box"]
    assert focal["loss_noobj"] < 0.75 * plain["loss_noobj"] and focal["loss_cls"] < plain["loss_cls"]
    weighted = loss_type(**levels, class_weights=[1.0, 3.0, 1.0], num_classes=3)(outputs, anchors, targets, size)
    assert weighted["loss_cls"].item() == pytest.approx(3 * plain["loss_cls"].item(), rel=1e-5)  # class 1


def _detection_run(train_cfg, *overrides):
    from cvlab.cli import complete_task
    from cvlab.engine import run_train

    cfg = train_cfg(*complete_task(["model=yolov3_tiny", "model.width=0.125", "data=shapes_det", "data.image_size=32",
                                    "data.train_size=8", "data.val_size=2", "data.batch_size=2", *ONE_STEP,
                                    *overrides]))
    return run_train(cfg)


def test_a_yolo_run_trains_with_the_focal_class_weighted_terms(train_cfg):
    metrics, built = _detection_run(train_cfg, "loss=yolov3", "loss.focal_gamma=1.5", "loss.class_weights=balanced")
    task, datamodule = built["task"], built["datamodule"]
    binary = task.model.loss.binary
    counts = torch.tensor(datamodule.info.class_counts, dtype=torch.float64)  # training boxes per class
    assert (binary.focal_gamma, binary.focal_alpha) == (1.5, 0.25)
    assert binary.class_weights.tolist() == pytest.approx((counts.sum() / (5 * counts)).tolist())
    # The trained model's loss on a validation batch: the focal terms, not the BCEs.
    images, targets = next(iter(datamodule.val_dataloader()))
    task.model.train()
    with torch.no_grad():
        focal = task.model(images, targets)
        task.model.loss.binary = BinaryTerms()
        bce = task.model(images, targets)
    assert focal["loss_box"] == bce["loss_box"] and focal["loss_noobj"] < 0.75 * bce["loss_noobj"]
    assert math.isfinite(metrics["val/map_50"])


# ------------------------------------------------------------------------------------------- segmentation
def _pixels(probabilities: list[list[float]], truth: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits [N, 2, 1, W] whose softmax gives each pixel's true class the probability given
    (truth 255: ignored, probability 0.01 of class 0)."""
    p = torch.tensor(probabilities)
    target = torch.tensor(truth)
    class_one = torch.where(target == 1, torch.log(p / (1 - p)), -torch.log(p / (1 - p)))
    logits = torch.stack([torch.zeros_like(class_one), class_one], 1)[:, :, None]
    return logits, target[:, None]


# One image, six pixels: the true class's probabilities 0.9, 0.6, 0.3, 0.8, 0.5 and an ignored pixel (0.01).
LOGITS_1, TARGET_1 = _pixels([[0.9, 0.6, 0.3, 0.8, 0.5, 0.01]], [[0, 1, 1, 0, 0, IGNORE_INDEX]])


def test_pixel_ohem_keeps_mmsegmentation_s_pixels_by_hand():
    hard = OHEMPixelCrossEntropy(num_classes=2, thresh=0.7, min_kept=2)
    # k = 2 x 1 image: the 3rd smallest probability (0-based 2) is 0.6, below 0.7: the bar stays 0.7.
    assert hard.kept(LOGITS_1, TARGET_1).tolist() == [[[False, True, True, False, True, False]]]
    expected = -(math.log(0.6) + math.log(0.3) + math.log(0.5)) / 3
    assert hard(LOGITS_1, TARGET_1).item() == pytest.approx(expected, rel=1e-5)
    # k = 4: the bar rises to the 5th smallest, 0.9: four pixels, all but the most confident.
    assert int(OHEMPixelCrossEntropy(2, thresh=0.7, min_kept=4).kept(LOGITS_1, TARGET_1).sum()) == 4
    # More than there are: the last (the largest, 0.9) is the bar, as MMSegmentation's min(k, count - 1).
    assert int(OHEMPixelCrossEntropy(2, thresh=0.7, min_kept=100_000).kept(LOGITS_1, TARGET_1).sum()) == 4
    # Plain cross-entropy counts all five: a different value.
    plain = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(LOGITS_1, TARGET_1).item()
    assert plain == pytest.approx(-(math.log(0.9 * 0.6 * 0.3 * 0.8 * 0.5)) / 5, rel=1e-5) != pytest.approx(expected)


def test_pixel_ohem_counts_min_kept_per_image_and_never_an_ignored_pixel():
    logits, target = _pixels([[0.9, 0.95, 0.97], [0.99, 0.98, 0.01]], [[0, 1, 0], [1, 0, IGNORE_INDEX]])
    # All confident (> 0.7): k = 1 x 2 images: the bar is the 3rd smallest (0.97), two pixels kept (0.9 and 0.95).
    kept = OHEMPixelCrossEntropy(2, thresh=0.7, min_kept=1).kept(logits, target)
    assert kept.tolist() == [[[True, True, False]], [[False, False, False]]]
    assert not OHEMPixelCrossEntropy(2, thresh=1.0, min_kept=1).kept(logits, target)[1, 0, 2]  # ignored stays out
    logits.requires_grad_(True)
    OHEMPixelCrossEntropy(2, thresh=0.7, min_kept=1)(logits, target).backward()
    assert (logits.grad.abs().sum(1) > 0).tolist() == kept.tolist()  # gradients reach the kept pixels only


def test_class_weights_of_the_pixel_losses_by_hand():
    # Pixel counts 6 / 2 / 1: balanced weights 9 / (3 x count) = 0.5, 1.5, 3.
    weighted = WeightedPixelCrossEntropy(num_classes=3, class_counts=[6, 2, 1])
    assert weighted.weight.tolist() == pytest.approx([0.5, 1.5, 3.0]) and weighted.ignore_index == IGNORE_INDEX
    logits = torch.randn(1, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[[0, 1, 2], [0, IGNORE_INDEX, 1]]])
    losses = -logits.log_softmax(1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    counted = target != IGNORE_INDEX
    w = torch.tensor([0.5, 1.5, 3.0])[target.clamp(max=2)]
    expected = (w * losses)[counted].sum() / w[counted].sum()
    assert weighted(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    listed = WeightedPixelCrossEntropy(num_classes=3, weights=[1.0, 1.0, 1.0])
    assert listed(logits, target).item() == pytest.approx(losses[counted].mean().item(), rel=1e-5)
    # With OHEM: the weighted mean over the kept pixels.
    hard = OHEMPixelCrossEntropy(num_classes=3, class_counts=[6, 2, 1], thresh=0.5, min_kept=1, weights="balanced")
    kept = hard.kept(logits, target)
    assert 0 < int(kept.sum()) < int(counted.sum())
    assert hard(logits, target).item() == pytest.approx(((w * losses)[kept].sum() / w[kept].sum()).item(), rel=1e-5)
    with pytest.raises(UserError, match="^loss.thresh must be a number in"):
        OHEMPixelCrossEntropy(num_classes=3, thresh=0.0)


SEGMENTATION = ["task=segmentation", "model=unet", "model.width=0.125", "data=shapes_seg", "data.image_size=32",
                "data.train_size=4", "data.val_size=2", "data.batch_size=2", *ONE_STEP]


def test_the_segmentation_options_reach_the_task_and_are_refused_elsewhere(train_cfg):
    from cvlab.engine import build_datamodule, build_task

    cfg = train_cfg(*SEGMENTATION, "loss=weighted_pixel_ce", "data.train_size=16")  # every class has pixels
    datamodule = build_datamodule(cfg)
    criterion = build_task(cfg, datamodule).criterion
    counts = torch.tensor(datamodule.info.class_counts, dtype=torch.float64)  # training pixels per class
    assert type(criterion) is WeightedPixelCrossEntropy and criterion.ignore_index == IGNORE_INDEX
    assert criterion.weight.tolist() == pytest.approx((counts.sum() / (len(counts) * counts)).tolist())
    ohem = build_task(train_cfg(*SEGMENTATION, "loss=ohem_pixel"), datamodule).criterion
    assert (type(ohem), ohem.thresh, ohem.min_kept, ohem.weight) == (OHEMPixelCrossEntropy, 0.7, 100_000, None)
    cfg = train_cfg("loss=ohem_pixel")  # resnet18 on digits
    with pytest.raises(UserError, match="loss=ohem_pixel is a segmentation loss; task=classification cannot use it"):
        build_task(cfg, build_datamodule(cfg))


def test_a_segmentation_run_trains_on_the_hard_pixels(train_cfg):
    from cvlab.engine import run_train

    # 2 images of 32 x 32: min_kept 50 a image keeps the 100 hardest pixels of a batch whose every pixel is above
    # thresh 0.01 (an untrained 6-class network gives each class about 1/6).
    metrics, built = run_train(train_cfg(*SEGMENTATION, "loss=ohem_pixel", "loss.thresh=0.01", "loss.min_kept=50"))
    task = built["task"]
    images, masks = next(iter(built["datamodule"].val_dataloader()))
    task.eval()
    with torch.no_grad():
        logits = task.model(images)
    kept, counted = task.criterion.kept(logits, masks), masks != IGNORE_INDEX
    probability = logits.softmax(1).gather(1, masks.where(counted, 0)[:, None])[:, 0]
    assert probability[counted].min() > 0.01 and int(kept.sum()) == 100
    hard = task.criterion(logits, masks).item()
    assert hard == pytest.approx(-probability[kept].log().mean().item(), rel=1e-4)
    plain = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(logits, masks).item()
    assert hard > plain  # the hardest pixels cost more than the mean
    assert math.isfinite(metrics["val/loss"])


# ------------------------------------------------------------------------------------------------- R-CNN OHEM
def _roi_heads(ohem_rois: int, ohem_nms: float = 0.7) -> RoIHeads:
    torch.manual_seed(0)
    return RoIHeads(RoIPooler([8], 2, "align"), TwoMLPHead(4 * 2 * 2, 16), BoxPredictor(16, 2),
                    batch_size_per_image=4, positive_fraction=0.25, ohem_rois=ohem_rois, ohem_nms=ohem_nms)


def test_ohem_picks_the_hardest_rois_after_nms_by_hand():
    heads = _roi_heads(ohem_rois=2)
    # Background RoIs (label 0, no box loss): cross-entropies -log softmax(logits)[0] of 2.41, 1.55, 0.69, 2.76.
    logits = torch.tensor([[-1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -10.0], [-2.0, 0.0, 0.0]])
    boxes = [torch.tensor([[0.0, 0.0, 10, 10], [0.0, 0.0, 10, 11], [20, 20, 30, 30]]),  # the first two: IoU 0.91
             torch.tensor([[0.0, 0.0, 8, 8]])]
    labels, targets = torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4)
    classifier, box = heads.roi_losses(logits, torch.zeros(4, 12), labels, targets)
    torch.testing.assert_close(classifier, -logits.log_softmax(1)[:, 0])
    assert box.tolist() == [0.0] * 4
    # Image 1: RoI 0 (2.41) then RoI 2 (0.69): RoI 1 (1.55) overlaps RoI 0 by more than 0.7. Image 2: its one RoI.
    assert heads.hardest(logits, torch.zeros(4, 12), labels, targets, boxes).tolist() == [0, 2, 3]
    # Without NMS (threshold 1), the two highest of image 1.
    assert _roi_heads(2, 1.0).hardest(logits, torch.zeros(4, 12), labels, targets, boxes).tolist() == [0, 1, 3]
    # A foreground RoI's box loss counts too: smooth-L1 (β 1/9) of its class's deltas, summed over the four.
    fg_labels = torch.tensor([0, 0, 1, 0])
    deltas = torch.zeros(4, 12)
    fg_targets = torch.zeros(4, 4)
    fg_targets[2] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    _, box = heads.roi_losses(logits, deltas, fg_labels, fg_targets)
    assert box.tolist() == pytest.approx([0.0, 0.0, 2.0 - 0.5 / 9, 0.0])


def test_ohem_trains_the_head_on_the_hardest_rois_only():
    levels = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0]]), "labels": torch.tensor([0])}]
    proposals = [torch.tensor([[8.0, 8, 40, 36], [9, 9, 41, 35], [0, 40, 20, 60], [40, 40, 60, 60], [30, 0, 60, 20],
                               [0, 0, 30, 30]])] * 2
    heads = _roi_heads(ohem_rois=3).train()
    sampled, labels, regression = heads.sample(proposals, targets)
    assert [len(s) for s in sampled] == [7, 7]  # every RoI (ground truth joined) is foreground or background
    logits, deltas = heads.box_predictor(heads.box_head(heads.pooler(levels, sampled)))
    hard = heads.hardest(logits, deltas, labels, regression, sampled)
    assert len(hard) == 6
    expected = heads.loss(logits[hard], deltas[hard], labels[hard], regression[hard])
    found = heads(levels, proposals, (64, 64), targets)
    for name in ("loss_classifier", "loss_box_reg"):
        assert found[name].item() == pytest.approx(expected[name].item(), rel=1e-6)
    # The hardest RoIs cost more than all of them on average.
    everyone = heads.loss(logits, deltas, labels, regression)
    assert found["loss_classifier"] > everyone["loss_classifier"]
    with pytest.raises(UserError, match="ohem_rois must be an integer >= 0"):
        _roi_heads(ohem_rois=-1)


def test_a_faster_rcnn_run_backpropagates_the_hardest_rois(train_cfg, monkeypatch):
    from cvlab.cli import complete_task
    from cvlab.engine import run_train

    counted = []
    loss = RoIHeads.loss

    def recorded(self, class_logits, *args):
        if self.training:
            counted.append(len(class_logits))
        return loss(self, class_logits, *args)

    monkeypatch.setattr(RoIHeads, "loss", recorded)
    metrics, built = run_train(train_cfg(*complete_task(
        ["model=faster_rcnn", "data.image_size=64", "data.train_size=4", "data.val_size=2", "data.batch_size=2",
         "model.box_ohem_rois=8", *ONE_STEP])))
    assert built["task"].model.roi_heads.ohem_rois == 8
    assert counted == [16]  # one step: 8 RoIs of each of the 2 images, of the 512 sampled per image without OHEM
    assert math.isfinite(metrics["val/map_50"])


# ------------------------------------------------------------------------------------------------ R-CNN focal
def test_the_rpn_focal_objectness_by_hand():
    rpn = RegionProposalNetwork(AnchorGenerator([[8]], [1.0]), RPNHead(4, 1))
    # One object; anchor 0 is it (positive), anchors 1 and 2 miss it (negative, IoU 0), anchor 3 half covers it
    # (IoU 0.5: neither, never scored). The 256-anchor budget samples all three.
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 10, 20]])
    objectness = torch.tensor([[1.5, -2.0, 0.5, 3.0]])
    deltas, targets = torch.zeros(1, 4, 4), [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    scored, labels = objectness[0, :3], torch.tensor([1.0, 0.0, 0.0])
    plain = rpn.loss(objectness, deltas, anchors, targets)
    bce = F.binary_cross_entropy_with_logits(scored, labels, reduction="none")
    assert plain["loss_objectness"].item() == pytest.approx(bce.mean().item(), rel=1e-6)  # the paper's, as before
    for gamma, alpha in ((2.0, 0.25), (1.5, None), (0.0, 0.5)):
        rpn.focal_gamma, rpn.focal_alpha = gamma, alpha
        found = rpn.loss(objectness, deltas, anchors, targets)
        # averaged over the 3 sampled anchors, as the BCE is
        expected = hand_focal(scored, labels, gamma, alpha).mean()
        assert found["loss_objectness"].item() == pytest.approx(expected.item(), rel=1e-6)
        reference = sigmoid_focal_loss(scored, labels, -1 if alpha is None else alpha, gamma, reduction="mean")
        assert found["loss_objectness"].item() == pytest.approx(reference.item(), rel=1e-6)
        assert found["loss_objectness"].item() != pytest.approx(bce.mean().item(), rel=1e-2)
        assert found["loss_rpn_box_reg"] == plain["loss_rpn_box_reg"]
    # γ = 0 without α: the BCE itself
    rpn.focal_gamma, rpn.focal_alpha = 0.0, None
    assert rpn.loss(objectness, deltas, anchors, targets)["loss_objectness"].item() == pytest.approx(bce.mean().item())
    with pytest.raises(UserError, match="^the RPN's focal_gamma must be a number >= 0 or null"):
        RegionProposalNetwork(AnchorGenerator([[8]], [1.0]), RPNHead(4, 1), focal_gamma=-1.0)


def _focal_roi_heads(gamma: float | None, alpha: float | None = 0.25) -> RoIHeads:
    torch.manual_seed(0)
    return RoIHeads(RoIPooler([8], 2, "align"), TwoMLPHead(4 * 2 * 2, 16), BoxPredictor(16, 2, background=False),
                    focal_gamma=gamma, focal_alpha=alpha)


# Four RoIs of a K = 2 head: class 0 (label 1), background, class 1 (label 2), background.
ROI_LOGITS = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.2, 0.1], [-1.0, -2.0]])
ROI_LABELS = torch.tensor([1, 0, 2, 0])
ONE_HOT = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # background: all zeros


def test_the_focal_box_classifier_by_hand():
    deltas, regression = torch.zeros(4, 12), torch.zeros(4, 4)
    regression[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    softmax_heads = _roi_heads(ohem_rois=0)
    plain = softmax_heads.loss(torch.zeros(4, 3), deltas, ROI_LABELS, regression)
    for gamma, alpha in ((2.0, 0.25), (1.5, None), (0.0, 0.75)):
        heads = _focal_roi_heads(gamma, alpha)
        found = heads.loss(ROI_LOGITS, deltas, ROI_LABELS, regression)
        terms = hand_focal(ROI_LOGITS, ONE_HOT, gamma, alpha)
        # summed over the classes, averaged over the 4 sampled RoIs (as the cross-entropy is)
        assert found["loss_classifier"].item() == pytest.approx(terms.sum().item() / 4, rel=1e-6)
        reference = sigmoid_focal_loss(ROI_LOGITS, ONE_HOT, -1 if alpha is None else alpha, gamma, reduction="sum")
        assert found["loss_classifier"].item() == pytest.approx(reference.item() / 4, rel=1e-6)
        # OHEM ranks each RoI by its focal terms summed over the classes; the box loss is the softmax head's
        classifier, box = heads.roi_losses(ROI_LOGITS, deltas, ROI_LABELS, regression)
        torch.testing.assert_close(classifier, terms.sum(1))
        assert found["loss_box_reg"] == plain["loss_box_reg"] and found["loss_box_reg"] > 0
    # γ = 0 without α: the BCE of the K sigmoid outputs, summed over the classes, averaged over the RoIs
    bce = F.binary_cross_entropy_with_logits(ROI_LOGITS, ONE_HOT, reduction="sum") / 4
    assert _focal_roi_heads(0.0, None).loss(ROI_LOGITS, deltas, ROI_LABELS, regression)[
        "loss_classifier"].item() == pytest.approx(bce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="background=False"):
        RoIHeads(RoIPooler([8], 2), TwoMLPHead(16, 16), BoxPredictor(16, 2), focal_gamma=2.0)
    with pytest.raises(UserError, match="^the RoI head's focal_alpha must be a number in"):
        _focal_roi_heads(2.0, 1.5)


def test_the_focal_box_classifier_scores_each_class_by_its_sigmoid():
    heads = _focal_roi_heads(2.0).eval()
    proposals = [torch.tensor([[10.0, 10, 30, 30], [40, 40, 60, 60]])]
    logits = torch.tensor([[3.0, 2.5], [-4.0, 0.0]])
    (found,) = heads.postprocess(logits, torch.zeros(2, 12), proposals, (64, 64))
    # The RoIs' classes above 0.05, best first, 0-based: sigmoid(3), sigmoid(2.5), sigmoid(0). A softmax would
    # share one RoI's probability among its classes (0.62 and 0.38 for the first).
    assert found["labels"].tolist() == [0, 1, 1]
    assert found["scores"].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, 2.5, 0.0])).tolist())
    torch.testing.assert_close(found["boxes"], proposals[0][[0, 0, 1]])  # zero deltas: the proposals


def test_a_faster_rcnn_run_trains_with_the_focal_heads(train_cfg, monkeypatch):
    from cvlab.cli import complete_task
    from cvlab.engine import run_train

    recorded = []
    loss = RoIHeads.loss

    def recording(self, class_logits, box_deltas, labels, regression_targets):
        found = loss(self, class_logits, box_deltas, labels, regression_targets)
        if self.training:
            recorded.append((class_logits.detach(), labels, found["loss_classifier"].item()))
        return found

    monkeypatch.setattr(RoIHeads, "loss", recording)
    metrics, built = run_train(train_cfg(*complete_task(
        ["model=faster_rcnn", "data.image_size=64", "data.train_size=4", "data.val_size=2", "data.batch_size=2",
         "model.rpn_focal_gamma=2.0", "model.box_focal_gamma=1.5", "model.box_focal_alpha=null", *ONE_STEP])))
    model = built["task"].model
    assert (model.rpn.focal_gamma, model.rpn.focal_alpha) == (2.0, 0.25)
    assert model.roi_heads.box_predictor.cls_score.out_features == model.num_classes == 5  # no background logit
    # The step's classifier loss: the focal terms of its K = 5 sigmoid outputs, summed per RoI, averaged.
    ((logits, labels, found),) = recorded
    one_hot = F.one_hot(labels, 6)[:, 1:].float()
    assert logits.shape[1] == 5 and 0 < int((labels > 0).sum()) < len(labels)
    expected = hand_focal(logits, one_hot, 1.5, None).sum(1).mean()
    assert found == pytest.approx(expected.item(), rel=1e-5)
    assert found != pytest.approx(F.cross_entropy(F.pad(logits, (1, 0)), labels).item(), rel=1e-2)
    # The RPN's objectness on a validation batch, the same anchors sampled: focal, not the BCE.
    images, targets = next(iter(built["datamodule"].val_dataloader()))
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        focal = model(images, targets)
        model.rpn.focal_gamma = None
        torch.manual_seed(0)
        bce = model(images, targets)
    assert focal["loss_rpn_box_reg"] == bce["loss_rpn_box_reg"]
    assert focal["loss_objectness"].item() != pytest.approx(bce["loss_objectness"].item(), rel=1e-2)
    # Eval keeps the detection contract: a list of dicts, 0-based labels, scores in (0, 1] (every score: after one
    # step most are below the 0.05 threshold).
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images) and all(set(d) == {"boxes", "scores", "labels"} for d in detections)
    for found in detections:
        assert 0 < len(found["scores"]) <= 100 and found["labels"].dtype == torch.int64
        assert ((found["labels"] >= 0) & (found["labels"] < 5)).all()
        assert ((found["scores"] > 0) & (found["scores"] <= 1)).all()
        assert (found["scores"][:-1] >= found["scores"][1:]).all()
    assert math.isfinite(metrics["val/map_50"])
