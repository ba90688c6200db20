"""YOLO v1 / v2 / v3 losses: the terms scored on the positives and negatives their assigner picks.

Papers:
    Redmon et al. 2016, "You Only Look Once: Unified, Real-Time Object Detection" (YOLOv1, eq. 3).
    Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (YOLOv2; the loss is only in Darknet's region layer).
    Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (YOLOv3; Darknet's yolo layer).
    Bochkovskiy et al. 2020, "YOLOv4: Optimal Speed and Accuracy of Object Detection" (YOLOv4; AlexeyAB's yolo layer).
    Jocher et al., ultralytics/yolov5 v6.0 (YOLOv5; no paper: ``utils/loss.py``, ``data/hyps/hyp.scratch-low.yaml``).
    Wang, Bochkovskiy & Liao 2022, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time object
    detectors" (YOLOv7; WongKinYiu/yolov7 ``utils/loss.py`` ``ComputeLossOTA`` / ``ComputeLossAuxOTA``).

No library implements the YOLO losses (torchvision ships only generic box ops and detection losses of other
families), so the loss terms are written here by hand; which prediction answers for which object is the job of the
assigners in :mod:`cvlab.ops.assigners`, and IoUs and box formats use ``torchvision.ops`` (``box_convert``,
``generalized_box_iou_loss``, ``complete_box_iou_loss``).

Each loss is a plug-in of the YOLO detectors (``loss=yolov1|yolov2|yolov3|yolov4|yolov5|yolov7``, ``conf/loss/``): the
model calls it with its raw outputs and the targets. Every loss returns ``dict(loss_box, loss_obj, loss_noobj,
loss_cls)`` of scalars summed over the batch and divided by the batch size (Darknet sums; dividing by N makes the scale
independent of the batch). The total loss is their sum. Squared errors are written without Darknet's implicit ½ (its
deltas are gradients of ½·error²): a constant factor only rescales the learning rate.

The logistic terms of YOLOv3, v4, v5 and v7 (objectness and classes, :class:`BinaryTerms`) take two imbalance
options (not in the papers): ``focal_gamma`` > 0 scores them with the sigmoid focal loss (Lin et al. 2017,
``torchvision.ops.sigmoid_focal_loss``; YOLOv5's ``fl_gamma`` hyp, EfficientDet's 1.5) instead of the BCE, and
``class_weights`` (``balanced``: ``n / (k · n_c)`` from the training boxes per class, or a list) weighs each
positive's class term by its object's class.

Each loss lists the box terms it can score with as ``box_losses`` (its ``box_loss`` argument's choices): the
detection task reads them to set the box term of a model's own loss (``loss=default loss.box_loss=ciou``, which
``recipe=modern`` gives every YOLO).

Target boxes come in the detection contract's format: ``targets[i] = dict(boxes=Tensor[M_i, 4] xyxy pixels,
labels=Tensor[M_i] int64)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss, generalized_box_iou_loss, sigmoid_focal_loss

from cvlab.losses.classification import class_weights as parse_class_weights
from cvlab.ops.assigners import (
    AnchorAssignment,
    BestAnchorAssigner,
    GridCellAssigner,
    RatioAnchorAssigner,
    SimOTAAssigner,
    last_occurrence,
)
from cvlab.ops.boxes import paired_box_iou
from cvlab.ops.postprocess import anchor_cell_offsets, decode_anchor_boxes, decode_cell_boxes
from cvlab.utils.validate import check_number

LossDict = dict[str, torch.Tensor]
LOSS_NAMES = ("loss_box", "loss_obj", "loss_noobj", "loss_cls")


def check_box_loss(box_loss: str | None, choices: tuple[str, ...]) -> None:
    if box_loss not in choices:
        raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(choices)}")


class BinaryTerms(nn.Module):
    """The logistic terms of a YOLO loss, element-wise: ``forward(logits, targets) -> Tensor`` of the same shape,
    the targets in [0, 1] (soft ones too: label smoothing, an IoU as objectness target).

    - ``focal_gamma`` 0: ``BCE(σ(x), t)``; > 0: the sigmoid focal loss ``α_t (1 − p_t)^γ BCE`` with
      ``p_t = p t + (1 − p)(1 − t)`` and ``α_t = α t + (1 − α)(1 − t)`` (``torchvision.ops.sigmoid_focal_loss``);
      ``focal_alpha`` α (0.25, RetinaNet's and YOLOv5's) or None (no α weighting). Easy negatives, which outnumber
      the objects by far, then weigh little.
    - ``class_weights`` (``balanced``, a list of ``num_classes`` numbers, or None): :meth:`classes` multiplies the
      terms of each positive by the weight of its object's class; ``balanced`` is ``n / (k · n_c)`` from
      ``class_counts``, the training boxes per class (mean weight of a training box: 1).
    """

    def __init__(self, focal_gamma: float = 0.0, focal_alpha: float | None = 0.25,
                 class_weights: str | list[float] | None = None, num_classes: int | None = None,
                 class_counts: list[int] | None = None):
        super().__init__()
        check_number("loss.focal_gamma", focal_gamma, 0, hint=" (0: the BCE; 1.5: EfficientDet's and YOLOv5's)")
        check_number("loss.focal_alpha", focal_alpha, 0, 1, optional=True,
                     hint=" (the positives' share of the focal weight, 0.25; null: none)")
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)
        if class_weights is not None and num_classes is None:
            raise ValueError("class_weights need num_classes (the detection task gives it)")
        weights = None if class_weights is None else parse_class_weights(class_weights, num_classes, class_counts,
                                                                          "loss.class_weights")
        # Not saved: rebuilt from the config and the data, as the loss itself.
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.focal_gamma:
            alpha = -1.0 if self.focal_alpha is None else self.focal_alpha  # torchvision's "no α"
            return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=self.focal_gamma)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")

    def classes(self, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class terms ``Tensor[P, C]`` of P positives whose objects are of class ``labels: Tensor[P]``."""
        terms = self(logits, targets)
        if self.class_weights is None:
            return terms
        return terms * self.class_weights.to(terms)[labels, None]


class YoloV1Loss(nn.Module):
    """YOLOv1's sum-squared error (paper eq. 3) on the positives of a :class:`~cvlab.ops.assigners.GridCellAssigner`
    (per object: the cell containing its centre and that cell's responsible predictor). Divided by the batch size:

    - ``loss_box = λcoord Σ_resp [(x − x̂)² + (y − ŷ)² + (√w − √ŵ)² + (√h − √ĥ)²]`` (the net predicts √w, √h);
      ``box_loss="ciou"`` puts ``1 − CIoU`` of the responsible predictor's decoded box in the bracket's place
      (``torchvision.ops.complete_box_iou_loss``; not in the paper: the modern recipe's box term);
    - ``loss_obj = Σ_resp (C − IoU(pred, truth))²`` (the confidence target is the IoU);
    - ``loss_noobj = λnoobj Σ_not-resp C²`` over all other predictors, in object cells too;
    - ``loss_cls = Σ_object-cells Σ_c (p(c) − p̂(c))²`` (one class distribution per cell).

    ``forward(box_pred: Tensor[N, S_h, S_w, B, 5] (x, y, √w, √h, C), class_pred: Tensor[N, S_h, S_w, C],
    targets, image_size=(H, W)) -> LossDict``.
    """

    box_losses = ("mse", "ciou")

    def __init__(self, lambda_coord: float = 5.0, lambda_noobj: float = 0.5, box_loss: str = "mse"):
        super().__init__()
        check_box_loss(box_loss, self.box_losses)
        self.lambda_coord = lambda_coord
        self.lambda_noobj = lambda_noobj
        self.box_loss = box_loss
        self.assigner = GridCellAssigner()

    def forward(self, box_pred: torch.Tensor, class_pred: torch.Tensor, targets: list[dict],
                image_size: tuple[int, int]) -> LossDict:
        box_pred, class_pred = box_pred.float(), class_pred.float()
        batch, grid_h, grid_w = box_pred.shape[:3]
        img_h, img_w = image_size
        with torch.no_grad():
            assigned = self.assigner(decode_cell_boxes(box_pred[..., :4], image_size), targets, image_size)
        cell = (assigned.image, assigned.row, assigned.col)

        resp_pred = box_pred[(*cell, assigned.predictor)]  # Tensor[M, 5]
        if self.box_loss == "ciou":
            loss_box = complete_box_iou_loss(decode_cell_boxes(box_pred[..., :4], image_size)[
                (*cell, assigned.predictor)], assigned.boxes, reduction="sum")
        else:
            centre_size = box_convert(assigned.boxes, "xyxy", "cxcywh") / assigned.boxes.new_tensor(
                [img_w, img_h, img_w, img_h])
            target_xy = torch.stack((centre_size[:, 0] * grid_w - assigned.col,
                                     centre_size[:, 1] * grid_h - assigned.row), -1)
            loss_box = ((resp_pred[:, :2] - target_xy).square().sum()
                        + (resp_pred[:, 2:4] - centre_size[:, 2:].sqrt()).square().sum())
        loss_box = self.lambda_coord * loss_box
        loss_obj = (resp_pred[:, 4] - assigned.iou).square().sum()

        not_responsible = torch.ones(box_pred.shape[:4], dtype=torch.bool, device=box_pred.device)
        not_responsible[(*cell, assigned.predictor)] = False
        loss_noobj = self.lambda_noobj * box_pred[..., 4][not_responsible].square().sum()

        class_target = F.one_hot(assigned.labels, class_pred.shape[-1]).to(class_pred)
        loss_cls = (class_pred[cell] - class_target).square().sum()
        return {name: value / batch for name, value in zip(LOSS_NAMES, (loss_box, loss_obj, loss_noobj, loss_cls))}


class AnchorYoloLoss(nn.Module):
    """The box loss of YOLOv2 and YOLOv3 on the positives and negatives of a
    :class:`~cvlab.ops.assigners.BestAnchorAssigner`; subclasses define the objectness and class terms and the class
    probabilities the detector scores with at eval (:meth:`class_probabilities`, matching the class term).

    Box loss (``box_loss="mse"``, the papers' up to v3): for positives,
    ``(2 − w·h) · [(σ(tx) − x̂)² + (σ(ty) − ŷ)² + (tw − log(w / pw))² + (th − log(h / ph))²]`` with w, h relative to
    the image (the factor favours small boxes) and x̂, ŷ the centre's offset in its cell; ``box_loss="giou"`` uses
    ``1 − GIoU`` of the decoded box instead, ``"ciou"`` (YOLOv4's) ``1 − CIoU`` (IoU less the centre distance and
    aspect-ratio penalties; Zheng et al. 2020), both scale-invariant, so without the factor. Multiplied by
    ``coord_scale``. ``iou_thresh`` < 1 gives an object to every anchor of shape IoU above it as well
    (:class:`~cvlab.ops.assigners.BestAnchorAssigner`; YOLOv4's several anchors per truth).

    ``forward(outputs, anchors, targets, image_size, xy_scales=None) -> LossDict`` with
    ``outputs[l]: Tensor[N, A_l, H_l, W_l, 5+C]`` raw ``(tx, ty, tw, th, to, class logits)``,
    ``anchors[l]: Tensor[A_l, 2]`` pixel (w, h) of level ``l`` and ``xy_scales[l]`` its grid sensitivity (None: 1
    everywhere; :func:`~cvlab.ops.postprocess.anchor_cell_offsets`), the detector's own, so boxes decode as at eval.
    """

    box_losses = ("mse", "giou", "ciou")

    def __init__(self, ignore_thresh: float, box_loss: str = "mse", coord_scale: float = 1.0, iou_thresh: float = 1.0):
        super().__init__()
        check_box_loss(box_loss, self.box_losses)
        self.assigner = BestAnchorAssigner(ignore_thresh, iou_thresh)
        self.box_loss = box_loss
        self.coord_scale = coord_scale

    def objectness_losses(self, pos_logits: torch.Tensor, neg_logits: torch.Tensor,
                          pos_iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_obj, loss_noobj) sums from positives' / negatives' objectness logits; ``pos_iou`` is the IoU of
        each positive's decoded box with its object (no gradient)."""
        raise NotImplementedError

    def class_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed class loss of the positives: ``logits: Tensor[P, C]``, ``labels: Tensor[P]``."""
        raise NotImplementedError

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class logits Tensor[..., C] → the probabilities this loss trains them to be."""
        raise NotImplementedError

    def _box_loss(self, pos_raw: torch.Tensor, pos_boxes: torch.Tensor, anchors: torch.Tensor,
                  assigned: AnchorAssignment, grid: tuple[int, int], image_size: tuple[int, int],
                  xy_scale: float) -> torch.Tensor:
        """Summed box loss of one level's positives: raw ``Tensor[P, 5 + C]``, decoded boxes ``Tensor[P, 4]``."""
        if self.box_loss == "giou":
            return generalized_box_iou_loss(pos_boxes, assigned.boxes, reduction="sum")
        if self.box_loss == "ciou":
            return complete_box_iou_loss(pos_boxes, assigned.boxes, reduction="sum")
        img_h, img_w = image_size
        grid_h, grid_w = grid
        centre_size = box_convert(assigned.boxes, "xyxy", "cxcywh")
        target_xy = torch.stack((centre_size[:, 0] / (img_w / grid_w) - assigned.col,
                                 centre_size[:, 1] / (img_h / grid_h) - assigned.row), -1)
        target_wh = (centre_size[:, 2:] / anchors.to(pos_raw)[assigned.anchor]).log()
        size_weight = 2 - centre_size[:, 2] * centre_size[:, 3] / (img_w * img_h)
        box_error = (anchor_cell_offsets(pos_raw[:, :2], xy_scale) - target_xy).square().sum(1) + (
            pos_raw[:, 2:4] - target_wh).square().sum(1)
        return (size_weight * box_error).sum()

    def forward(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int], xy_scales: list[float] | None = None) -> LossDict:
        outputs = [raw.float() for raw in outputs]
        xy_scales = [1.0] * len(outputs) if xy_scales is None else list(xy_scales)
        pred_boxes = [decode_anchor_boxes(raw[..., :4], level_anchors, image_size, xy_scale)
                      for raw, level_anchors, xy_scale in zip(outputs, anchors, xy_scales, strict=True)]
        assignments = self.assigner([boxes.detach() for boxes in pred_boxes], anchors, targets, image_size)

        totals = dict.fromkeys(LOSS_NAMES, outputs[0].new_zeros(()))
        for raw, level_boxes, level_anchors, assigned, xy_scale in zip(outputs, pred_boxes, anchors, assignments,
                                                                       xy_scales):
            pos_raw, pos_boxes = raw[assigned.slot], level_boxes[assigned.slot]
            loss_box = self._box_loss(pos_raw, pos_boxes, level_anchors, assigned, raw.shape[2:4], image_size,
                                      xy_scale)
            loss_obj, loss_noobj = self.objectness_losses(
                pos_raw[:, 4], raw[..., 4][assigned.negatives], paired_box_iou(pos_boxes.detach(), assigned.boxes))
            totals["loss_box"] = totals["loss_box"] + self.coord_scale * loss_box
            totals["loss_obj"] = totals["loss_obj"] + loss_obj
            totals["loss_noobj"] = totals["loss_noobj"] + loss_noobj
            totals["loss_cls"] = totals["loss_cls"] + self.class_loss(pos_raw[:, 5:], assigned.labels)
        return {name: value / outputs[0].shape[0] for name, value in totals.items()}


class YoloV2Loss(AnchorYoloLoss):
    """YOLOv2's loss as in Darknet's region layer (yolo-voc.cfg / yolov2.cfg scales):

    - ``loss_box``: the shared box loss (``coord_scale`` 1);
    - ``loss_obj = object_scale · Σ_pos (σ(to) − IoU(pred, truth))²`` (``rescore=1``: the target is the IoU; 5);
    - ``loss_noobj = noobject_scale · Σ_neg σ(to)²`` with negatives the predictions of best IoU ≤ 0.6 (1);
    - ``loss_cls = class_scale · Σ_pos CE(softmax(classes), label)`` (1; Darknet's softmax delta is this
      cross-entropy's gradient), so the classes are scored with a softmax.

    Darknet's extra term that pulls all predictions towards their anchor during the first 12,800 images is left out.
    """

    def __init__(self, ignore_thresh: float = 0.6, object_scale: float = 5.0, noobject_scale: float = 1.0,
                 class_scale: float = 1.0, coord_scale: float = 1.0, box_loss: str = "mse"):
        super().__init__(ignore_thresh, box_loss, coord_scale)
        self.object_scale = object_scale
        self.noobject_scale = noobject_scale
        self.class_scale = class_scale

    def objectness_losses(self, pos_logits, neg_logits, pos_iou):
        loss_obj = self.object_scale * (pos_logits.sigmoid() - pos_iou).square().sum()
        loss_noobj = self.noobject_scale * neg_logits.sigmoid().square().sum()
        return loss_obj, loss_noobj

    def class_loss(self, logits, labels):
        return self.class_scale * F.cross_entropy(logits, labels, reduction="sum")

    def class_probabilities(self, logits):
        return torch.softmax(logits, dim=-1)


class YoloV3Loss(AnchorYoloLoss):
    """YOLOv3's loss as in Darknet's yolo layer, with independent logistic outputs:

    - ``loss_box``: the shared box loss;
    - ``loss_obj = Σ_pos BCE(to, 1)``, ``loss_noobj = Σ_neg BCE(to, 0)`` with negatives the predictions of best
      IoU ≤ ``ignore_thresh`` (0.5 as in the paper; the released yolov3.cfg uses 0.7);
    - ``loss_cls = Σ_pos Σ_c BCE(class logit c, target c)`` with target ``[c = label]`` (no softmax: labels may
      overlap), so the classes are scored with a sigmoid each. ``label_smoothing`` ε moves the targets to
      ``1 − ε/2`` and ``ε/2`` (AlexeyAB's yolo layer: ``y · (1 − ε) + ε/2``; Szegedy et al. 2016).

    ``focal_gamma`` / ``focal_alpha`` / ``class_weights``: :class:`BinaryTerms` (the focal loss in place of the
    three BCEs; class weights on ``loss_cls``).
    """

    def __init__(self, ignore_thresh: float = 0.5, box_loss: str = "mse", coord_scale: float = 1.0,
                 iou_thresh: float = 1.0, label_smoothing: float = 0.0, focal_gamma: float = 0.0,
                 focal_alpha: float | None = 0.25, class_weights: str | list[float] | None = None,
                 num_classes: int | None = None, class_counts: list[int] | None = None):
        super().__init__(ignore_thresh, box_loss, coord_scale, iou_thresh)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.binary = BinaryTerms(focal_gamma, focal_alpha, class_weights, num_classes, class_counts)

    def objectness_losses(self, pos_logits, neg_logits, pos_iou):
        loss_obj = self.binary(pos_logits, torch.ones_like(pos_logits)).sum()
        loss_noobj = self.binary(neg_logits, torch.zeros_like(neg_logits)).sum()
        return loss_obj, loss_noobj

    def class_loss(self, logits, labels):
        target = F.one_hot(labels, logits.shape[-1]).to(logits) * (1 - self.label_smoothing) + self.label_smoothing / 2
        return self.binary.classes(logits, target, labels).sum()

    def class_probabilities(self, logits):
        return torch.sigmoid(logits)


class YoloV4Loss(YoloV3Loss):
    """YOLOv4's loss: YOLOv3's terms with the freebies of the released yolov4.cfg's yolo layers
    (``iou_loss=ciou``, ``iou_thresh=0.213``, ``ignore_thresh=.7``; no ``label_smooth_eps``, so 0):

    - ``box_loss="ciou"``: ``1 − CIoU`` of each positive's decoded box (``torchvision.ops.complete_box_iou_loss``);
    - ``iou_thresh=0.213``: several anchors per truth, every anchor of shape IoU above it is a positive too;
    - ``label_smoothing``: off in the cfg; the paper lists it among the freebies (§3.4).

    The cfg's ``iou_normalizer=0.07`` (and ``max_delta=5``) scale Darknet's hand-written CIoU delta, which leaves
    out the chain-rule factors ``1 / grid`` (x, y) and ``anchor / input`` (w, h) of the true gradient, so no constant
    carries over to a true loss; ``coord_scale`` 1 sits between the ~0.9–5 (x, y) and ~0.1–3.5 (w, h) that would
    match Darknet's steps at 608 px. Grid sensitivity (``scale_x_y``) is the detector's (``xy_scales``), since it
    also decodes the boxes at eval.
    """

    def __init__(self, ignore_thresh: float = 0.7, box_loss: str = "ciou", coord_scale: float = 1.0,
                 iou_thresh: float = 0.213, label_smoothing: float = 0.0, focal_gamma: float = 0.0,
                 focal_alpha: float | None = 0.25, class_weights: str | list[float] | None = None,
                 num_classes: int | None = None, class_counts: list[int] | None = None):
        super().__init__(ignore_thresh, box_loss, coord_scale, iou_thresh, label_smoothing, focal_gamma, focal_alpha,
                         class_weights, num_classes, class_counts)


class YoloV5Loss(nn.Module):
    """YOLOv5's loss (``utils/loss.py`` ``ComputeLoss``, gains of ``hyp.scratch-low.yaml``) on the positives of a
    :class:`~cvlab.ops.assigners.RatioAnchorAssigner` (``anchor_t``: 4), boxes decoded as the detector does
    (``2σ(t) − 0.5`` in the cell, ``pw · (2σ(tw))²``). Per level ``l`` (means, not sums):

    - ``loss_box = box_gain' · Σ_l mean_pos (1 − CIoU(pred, truth))`` (``torchvision.ops.complete_box_iou_loss``);
      ``box_loss="mse"`` puts the squared error of the raw parameterisation in its place, ``(2σ(tx) − 0.5 − x̂)²``
      for the centre offset in the cell and ``(2σ(tw) − √(w / pw))²`` for the size, summed over the 4 (ablation);
    - objectness ``obj_gain' · Σ_l balance_l · mean_slots BCE(to, target)``, the target of a positive slot its box's
      IoU with the object (``(1 − iou_ratio) + iou_ratio · max(CIoU, 0)``, no gradient: YOLOv5's ``gr = 1``), of the
      other slots 0; ``loss_obj`` is the positive slots' part of that mean and ``loss_noobj`` the others';
    - ``loss_cls = cls_gain' · Σ_l mean_{pos, c} BCE(class logit c, [c = label])``, none for a single class.

    ``balance`` weighs the levels finest first (P3, P4, P5: 4, 1, 0.4). The gains are YOLOv5's train.py scaling of
    the hyp file's: ``box_gain' = box_gain · 3 / L``, ``cls_gain' = cls_gain · C / 80 · 3 / L``,
    ``obj_gain' = obj_gain · (H · W / 640²) · 3 / L`` for L levels, C classes and an H×W input. YOLOv5 trains on the
    sum of the three multiplied by the batch size; per image, as every cvlab loss, that is the sum itself. A slot
    claimed twice keeps the later claim's IoU as its objectness target. ``focal_gamma`` / ``focal_alpha`` /
    ``class_weights``: :class:`BinaryTerms` (YOLOv5's ``fl_gamma`` wraps the class and objectness BCEs alike).

    ``forward(outputs, anchors, targets, image_size, xy_scales=None) -> LossDict`` as
    :class:`AnchorYoloLoss`'s (``xy_scales``: the detector's, 2 per level for YOLOv5).
    """

    #: YOLOv5's box decoding (:func:`~cvlab.ops.postprocess.decode_anchor_boxes`), which the detector's head shares.
    BOX_DECODING = {"xy_scale": 2.0, "bounded_size": True}
    REFERENCE_SIZE = 640  # the input size the hyp file's objectness gain is for
    box_losses = ("ciou", "mse")

    def __init__(self, anchor_t: float = 4.0, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5,
                 balance: tuple[float, ...] = (4.0, 1.0, 0.4), iou_ratio: float = 1.0, box_loss: str = "ciou",
                 focal_gamma: float = 0.0, focal_alpha: float | None = 0.25,
                 class_weights: str | list[float] | None = None, num_classes: int | None = None,
                 class_counts: list[int] | None = None):
        super().__init__()
        check_box_loss(box_loss, self.box_losses)
        if not 0.0 <= iou_ratio <= 1.0:
            raise ValueError(f"iou_ratio must be in [0, 1], got {iou_ratio}")
        self.assigner = RatioAnchorAssigner(anchor_t)
        self.box_gain, self.obj_gain, self.cls_gain = box_gain, obj_gain, cls_gain
        self.balance = tuple(float(weight) for weight in balance)
        self.iou_ratio = iou_ratio
        self.box_loss = box_loss
        self.binary = BinaryTerms(focal_gamma, focal_alpha, class_weights, num_classes, class_counts)

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def _box_terms(self, pos_raw: torch.Tensor, pos_boxes: torch.Tensor, anchors: torch.Tensor,
                   assigned: AnchorAssignment, xy_scale: float, stride: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per positive box loss Tensor[P], IoU with its object Tensor[P], no gradient, ≥ 0)."""
        if self.box_loss == "ciou":
            loss = complete_box_iou_loss(pos_boxes, assigned.boxes, reduction="none")
            return loss, (1 - loss).detach().clamp(min=0)
        centre_size = box_convert(assigned.boxes, "xyxy", "cxcywh")
        target_xy = centre_size[:, :2] / stride - torch.stack((assigned.col, assigned.row), 1)
        target_root_wh = (centre_size[:, 2:] / anchors.to(pos_raw)[assigned.anchor]).sqrt()
        loss = ((anchor_cell_offsets(pos_raw[:, :2], xy_scale) - target_xy).square().sum(1)
                + (2 * pos_raw[:, 2:4].sigmoid() - target_root_wh).square().sum(1))
        return loss, paired_box_iou(pos_boxes.detach(), assigned.boxes)

    def forward(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int], xy_scales: list[float] | None = None) -> LossDict:
        outputs = [raw.float() for raw in outputs]
        xy_scales = [self.BOX_DECODING["xy_scale"]] * len(outputs) if xy_scales is None else list(xy_scales)
        assignments = self.assigner([tuple(raw.shape[2:4]) for raw in outputs], anchors, targets, image_size)
        return self.score(outputs, anchors, assignments, image_size, xy_scales)

    def score(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], assignments: list[AnchorAssignment],
              image_size: tuple[int, int], xy_scales: list[float]) -> LossDict:
        """The loss terms of float ``outputs`` on their levels' ``assignments``."""
        num_levels, num_classes = len(outputs), outputs[0].shape[-1] - 5
        if len(self.balance) != num_levels:
            raise ValueError(f"balance has {len(self.balance)} level weights for {num_levels} levels")
        grids = [tuple(raw.shape[2:4]) for raw in outputs]
        finest_first = sorted(range(num_levels), key=lambda level: -grids[level][0] * grids[level][1])
        balance = {level: self.balance[rank] for rank, level in enumerate(finest_first)}
        box_gain = self.box_gain * 3 / num_levels
        cls_gain = self.cls_gain * num_classes / 80 * 3 / num_levels
        obj_gain = self.obj_gain * image_size[0] * image_size[1] / self.REFERENCE_SIZE ** 2 * 3 / num_levels

        totals = dict.fromkeys(LOSS_NAMES, outputs[0].new_zeros(()))
        for level, (raw, level_anchors, assigned, xy_scale) in enumerate(zip(outputs, anchors, assignments,
                                                                               xy_scales, strict=True)):
            obj_target = torch.zeros_like(raw[..., 4])
            if len(assigned.image):
                pos_raw = raw[assigned.slot]
                pos_boxes = decode_anchor_boxes(raw[..., :4], level_anchors, image_size, xy_scale,
                                                self.BOX_DECODING["bounded_size"])[assigned.slot]
                stride = pos_raw.new_tensor([image_size[1] / grids[level][1], image_size[0] / grids[level][0]])
                box_loss, iou = self._box_terms(pos_raw, pos_boxes, level_anchors, assigned, xy_scale, stride)
                totals["loss_box"] = totals["loss_box"] + box_gain * box_loss.mean()
                slot_keys = ((assigned.image * raw.shape[1] + assigned.anchor) * grids[level][0]
                             + assigned.row) * grids[level][1] + assigned.col
                last = last_occurrence(slot_keys)
                obj_target[tuple(index[last] for index in assigned.slot)] = (
                    (1 - self.iou_ratio) + self.iou_ratio * iou[last])
                if num_classes > 1:
                    class_target = F.one_hot(assigned.labels, num_classes).to(pos_raw)
                    totals["loss_cls"] = totals["loss_cls"] + cls_gain * self.binary.classes(
                        pos_raw[:, 5:], class_target, assigned.labels).mean()
            obj_terms = self.binary(raw[..., 4], obj_target)
            obj_weight = obj_gain * balance[level] / obj_terms.numel()
            totals["loss_obj"] = totals["loss_obj"] + obj_weight * obj_terms[~assigned.negatives].sum()
            totals["loss_noobj"] = totals["loss_noobj"] + obj_weight * obj_terms[assigned.negatives].sum()
        return totals


class YoloV7Loss(YoloV5Loss):
    """YOLOv7's loss (``utils/loss.py`` ``ComputeLossOTA``, gains of ``hyp.scratch.p5.yaml``): YOLOv5's terms (CIoU
    boxes, the IoU as objectness target, level balance 4 / 1 / 0.4, train.py's gain scaling) on the positives of a
    :class:`~cvlab.ops.assigners.SimOTAAssigner`. YOLOv5's positives (``anchor_t`` 4, the two nearest neighbour
    cells) are the candidates; each object keeps the ``k = max(1, ⌊Σ of its topk (10) best IoUs⌋)`` of lowest cost
    ``class BCE + iou_weight (3) · −log IoU`` under the current predictions, and each slot answers for at most one
    object. yolov7-tiny trains with ``hyp.scratch.tiny.yaml``'s gains instead (``obj_gain=1.0, cls_gain=0.5``), its
    detector's default; ``loss=yolov5`` trains either without the dynamic-k selection (the hyp files' ``loss_ota: 0``).

    The auxiliary head (``aux_outputs``, ComputeLossAuxOTA's lead-guided assignment): its levels are scored with the
    same terms, times ``aux_weight`` (0.25), on a coarser assignment made from the *lead* head's predictions: the
    candidates lie in all four neighbour cells (``neighbour_reach`` 1, ``find_5_positive``) and ``k`` comes from the
    ``aux_topk`` (20) best IoUs. (ComputeLossAuxOTA takes the lead's own ``k`` from its 20 best IoUs too; here the
    lead's assignment is the same with the auxiliary head or without it.)

    ``forward(outputs, anchors, targets, image_size, xy_scales=None, aux_outputs=None) -> LossDict`` as
    :class:`YoloV5Loss`'s; ``aux_outputs`` are raw levels laid out as ``outputs``.
    """

    def __init__(self, anchor_t: float = 4.0, box_gain: float = 0.05, obj_gain: float = 0.7, cls_gain: float = 0.3,
                 balance: tuple[float, ...] = (4.0, 1.0, 0.4), iou_ratio: float = 1.0, box_loss: str = "ciou",
                 topk: int = 10, iou_weight: float = 3.0, aux_weight: float = 0.25, aux_topk: int = 20,
                 focal_gamma: float = 0.0, focal_alpha: float | None = 0.25,
                 class_weights: str | list[float] | None = None, num_classes: int | None = None,
                 class_counts: list[int] | None = None):
        super().__init__(anchor_t, box_gain, obj_gain, cls_gain, balance, iou_ratio, box_loss, focal_gamma,
                         focal_alpha, class_weights, num_classes, class_counts)
        self.assigner = SimOTAAssigner(anchor_t, topk, iou_weight)
        self.aux_assigner = SimOTAAssigner(anchor_t, aux_topk, iou_weight, neighbour_reach=1.0)
        self.aux_weight = aux_weight

    def _predictions(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], image_size: tuple[int, int],
                     xy_scales: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The levels' decoded boxes and (objectness, class) logits, without gradient: what the cost reads."""
        boxes = [decode_anchor_boxes(raw[..., :4].detach(), level_anchors, image_size, xy_scale,
                                     self.BOX_DECODING["bounded_size"])
                 for raw, level_anchors, xy_scale in zip(outputs, anchors, xy_scales, strict=True)]
        return boxes, [raw[..., 4:].detach() for raw in outputs]

    def forward(self, outputs: list[torch.Tensor], anchors: list[torch.Tensor], targets: list[dict],
                image_size: tuple[int, int], xy_scales: list[float] | None = None,
                aux_outputs: list[torch.Tensor] | None = None) -> LossDict:
        outputs = [raw.float() for raw in outputs]
        xy_scales = [self.BOX_DECODING["xy_scale"]] * len(outputs) if xy_scales is None else list(xy_scales)
        predictions = self._predictions(outputs, anchors, image_size, xy_scales)
        assignments = self.assigner(*predictions, anchors, targets, image_size)
        totals = self.score(outputs, anchors, assignments, image_size, xy_scales)
        if aux_outputs is None:
            return totals
        guided = self.aux_assigner(*predictions, anchors, targets, image_size)  # from the lead head's predictions
        aux = self.score([raw.float() for raw in aux_outputs], anchors, guided, image_size, xy_scales)
        return {name: totals[name] + self.aux_weight * aux[name] for name in totals}
