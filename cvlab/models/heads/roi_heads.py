"""The RoI box head shared by Fast R-CNN and Faster R-CNN: RoI pooling, two FC layers, sibling classifier and
per-class box regressor, their training targets and loss, and the per-class NMS that ends detection.

Papers:
    Girshick 2015, "Fast R-CNN" (§2.1: RoI max pooling of each proposal to a fixed H × W grid (7 × 7) on the conv
    map; §2.2: two FC layers, then a softmax over K + 1 classes and K + 1 class-specific box regressors; §2.3: the
    multi-task loss ``L_cls + λ [u ≥ 1] L_loc`` with smooth-L1 ``L_loc``, mini-batches of RoIs 25 % foreground
    (IoU ≥ 0.5), background IoU in [0.1, 0.5); §4: per-class NMS at test).
    He, Gkioxari, Dollár & Girshick 2017, "Mask R-CNN" (§3: RoIAlign, bilinear sampling without quantisation).
    Lin et al. 2017, "Feature Pyramid Networks for Object Detection" (§4.2, Eq. 1: an RoI of side √(wh) is pooled
    from level ``k = ⌊k0 + log2(√(wh) / 224)⌋``, k0 = 4).
    Shrivastava, Gupta & Girshick 2016, "Training Region-based Object Detectors with Online Hard Example Mining"
    (§4: every RoI goes forward, the ones of highest loss, after NMS at 0.7 among them by loss, form the batch).
    Lin, Goyal, Girshick, He & Dollár 2017, "Focal Loss for Dense Object Detection" (§3.2, §4: the sigmoid focal
    loss over K binary class outputs, background the all-zero target; ``focal_gamma``).

RoI pooling is ``torchvision.ops.roi_pool`` / ``roi_align`` and the boxes maths ``torchvision.ops``; the level
assignment, the head, sampling, loss and post-processing are written here following torchvision's ``RoIHeads`` and
``MultiScaleRoIAlign`` step for step (they are in ``torchvision.models.detection``, which cvlab's models do not import),
so torchvision's weights give the same detections. Class index 0 is the background, as in the papers and in
torchvision; the detections carry cvlab's 0-based foreground labels. OHEM (``ohem_rois``) is written here as well:
torchvision has no hard-example sampler. The focal classifier (``focal_gamma``) is
``torchvision.ops.sigmoid_focal_loss`` on K sigmoid outputs; no library has it for an RoI head.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import (
    batched_nms,
    box_area,
    clip_boxes_to_image,
    nms,
    remove_small_boxes,
    roi_align,
    roi_pool,
    sigmoid_focal_loss,
)

from cvlab.layers.typing import ActFactory
from cvlab.ops.box_coder import BoxCoder
from cvlab.ops.matching import BACKGROUND, FOREGROUND, IoUMatcher, objects_with_area, sample_balanced
from cvlab.utils.validate import check_number

ROI_MODES = ("align", "pool")
# FPN's Eq. 1: an ImageNet-sized RoI (224 px) maps to level 4 (stride 16).
_CANONICAL_SIZE, _CANONICAL_LEVEL = 224, 4


class RoIPooler(nn.Module):
    """Fixed-size features of each RoI: ``forward(levels, boxes) -> Tensor[R, C, S, S]`` for ``levels:
    list[Tensor[N, C, H_l, W_l]]`` (strides ``reductions``) and ``boxes``: one ``Tensor[K_i, 4]`` xyxy per image
    (R = Σ K_i, in that order).

    Args:
        reductions: the stride of each level, finest first: powers of two, each equal to or twice the previous.
            With several levels an RoI is pooled from the level of FPN's Eq. 1 (clamped to the levels there are).
        output_size: S (7 in both papers).
        mode: ``"pool"`` (Fast R-CNN's RoI max pooling, ``torchvision.ops.roi_pool``) or ``"align"`` (RoIAlign,
            ``torchvision.ops.roi_align``, ``sampling_ratio`` points per bin side, ``aligned=False`` as
            torchvision's Faster R-CNN).
    """

    def __init__(self, reductions: Sequence[int], output_size: int = 7, mode: str = "align", sampling_ratio: int = 2):
        super().__init__()
        if mode not in ROI_MODES:
            raise ValueError(f"unknown RoI mode {mode!r}; choose one of {', '.join(ROI_MODES)}")
        log_strides = [math.log2(r) for r in reductions]
        if any(s != round(s) for s in log_strides) or any(b - a not in (0, 1) for a, b in zip(log_strides,
                                                                                             log_strides[1:])):
            raise ValueError(f"RoI pooling needs level strides that are powers of two, each equal to or twice the "
                             f"previous, got {list(reductions)}")
        self.reductions = [int(r) for r in reductions]
        self.output_size, self.mode, self.sampling_ratio = int(output_size), mode, int(sampling_ratio)
        self.k_min, self.k_max = int(log_strides[0]), int(log_strides[-1])
        # The first level of each stride (FPN levels double; equal strides all map to the first of them).
        self._level_of_k = {int(s): log_strides.index(s) for s in log_strides}

    @property
    def num_levels(self) -> int:
        return len(self.reductions)

    def _pool(self, level: torch.Tensor, rois: torch.Tensor, reduction: int) -> torch.Tensor:
        if self.mode == "pool":
            return roi_pool(level, rois, self.output_size, 1.0 / reduction)
        return roi_align(level, rois, self.output_size, 1.0 / reduction, self.sampling_ratio, aligned=False)

    def target_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """FPN's Eq. 1 for ``boxes: Tensor[R, 4]``: the index (into ``levels``) each is pooled from, ``Tensor[R]``."""
        side = torch.sqrt(box_area(boxes))
        k = torch.floor(_CANONICAL_LEVEL + torch.log2(side / _CANONICAL_SIZE) + torch.tensor(1e-6, dtype=side.dtype))
        k = k.clamp(min=self.k_min, max=self.k_max).to(torch.int64)
        table = torch.tensor([self._level_of_k[i] for i in range(self.k_min, self.k_max + 1)], device=boxes.device)
        return table[k - self.k_min]

    def forward(self, levels: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        levels = levels[: self.num_levels]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if self.num_levels == 1:
            return self._pool(levels[0], rois, self.reductions[0])
        target = self.target_levels(rois[:, 1:])
        pooled = rois.new_zeros((len(rois), levels[0].shape[1], self.output_size, self.output_size),
                                dtype=levels[0].dtype)
        for index, (level, reduction) in enumerate(zip(levels, self.reductions)):
            in_level = torch.where(target == index)[0]
            pooled[in_level] = self._pool(level, rois[in_level], reduction).to(pooled.dtype)
        return pooled


class TwoMLPHead(nn.Module):
    """Fast R-CNN's two FC layers (VGG16's fc6 / fc7 in the paper): ``Tensor[R, C, S, S] → Tensor[R,
    representation_size]``, each FC followed by the activation (ReLU)."""

    def __init__(self, in_features: int, representation_size: int, act_layer: ActFactory | None = None):
        super().__init__()
        act_layer = act_layer or partial(nn.ReLU, inplace=True)
        self.fc6 = nn.Linear(in_features, representation_size)
        self.act6 = act_layer()
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.act7 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act7(self.fc7(self.act6(self.fc6(x.flatten(start_dim=1)))))


class BoxPredictor(nn.Module):
    """The sibling outputs: ``cls_score`` (K + 1 logits, background first) and ``bbox_pred`` (4 deltas per class,
    background's included, as the papers' and torchvision's). ``Tensor[R, D] → (Tensor[R, K + 1], Tensor[R,
    4 (K + 1)])``. Init as the Fast R-CNN paper (§2.3): N(0, 0.01²) and N(0, 0.001²), biases 0.

    ``background=False`` (the focal classifier, RetinaNet's form): ``cls_score`` has K logits, one sigmoid each,
    the background being all of them low: ``D + 1`` parameters fewer; ``bbox_pred`` and the init are the same.
    """

    def __init__(self, in_features: int, num_classes: int, background: bool = True):
        super().__init__()
        self.num_classes, self.background = int(num_classes), bool(background)
        self.cls_score = nn.Linear(in_features, num_classes + self.background)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Detections (eval) or the box-head losses (training) of a batch of proposals.

    ``forward(levels, proposals, image_size=(H, W), targets=None)`` with ``proposals`` one ``Tensor[K_i, 4]`` xyxy
    per image: in training ``{"loss_classifier": cross-entropy over the sampled RoIs (with ``focal_gamma`` each
    RoI's focal terms summed over the classes), their mean, "loss_box_reg": smooth-L1 of the foreground RoIs'
    deltas for their class, summed and divided by the number of sampled RoIs}``; in eval one
    ``dict(boxes=Tensor[D, 4], scores=Tensor[D], labels=Tensor[D] int64 0-based)`` per image, scored by the softmax
    (or with ``focal_gamma`` each class's sigmoid).

    Args:
        pooler / box_head / box_predictor: :class:`RoIPooler`, :class:`TwoMLPHead`, :class:`BoxPredictor`.
        fg_iou / bg_iou: foreground at IoU ≥ ``fg_iou``, background with the best IoU in ``[bg_iou[0], bg_iou[1])``,
            the rest ignored (Fast R-CNN 0.5 and [0.1, 0.5); Faster R-CNN, torchvision: 0.5 and [0, 0.5)).
        batch_size_per_image / positive_fraction: RoIs sampled per image and the foreground share (Fast R-CNN 64
            and 0.25; Faster R-CNN 512 and 0.25).
        ohem_rois / ohem_nms: online hard example mining (Shrivastava et al. 2016) in place of that sampling when
            ``ohem_rois`` > 0: every foreground and background RoI goes forward, and each image's ``ohem_rois``
            of highest loss (classification + box regression; the paper's 128 a batch of 2 images is 64 each),
            after NMS at ``ohem_nms`` (0.7) among them ranked by that loss, make up the losses; the rest get no
            gradient. The losses are normalised as without OHEM, by the RoIs kept.
        focal_gamma / focal_alpha: None: the papers' softmax over K + 1 and cross-entropy; a number γ ≥ 0: K
            sigmoid outputs (``box_predictor`` built with ``background=False``), a foreground RoI's target its
            class's one-hot and a background RoI's all zeros, scored by the sigmoid focal loss ``α_t (1 − p_t)^γ
            BCE`` (RetinaNet's γ = 2, α = 0.25; ``focal_alpha`` None: no α weighting, so γ = 0 is the BCE), summed
            over the classes and averaged over the sampled RoIs as the cross-entropy is. That is mmdetection's
            normalisation of a sampled head (its ``BBoxHead``: the sampled RoIs); RetinaNet divides by the
            positives because it scores every anchor, unsampled, and here that divides the background RoIs' sum by
            a count that is small whenever objects are: on two images of three objects (1.5 % foreground RoIs) the
            classifier loss rose from 1.1 to 290 in 18 Adam steps at lr 0.01, where the mean and the cross-entropy
            trained. A detection's score is then its class's sigmoid, not a softmax share.
        add_gt_proposals: the objects' own boxes join the proposals in training (both papers, and torchvision).
        box_coder_weights: the target normalisation (10, 10, 5, 5).
        box_loss_beta: smooth-L1's β (Fast R-CNN: 1; torchvision's Faster R-CNN: 1/9).
        score_thresh / nms_thresh / detections_per_img / min_size: post-processing per class (Fast R-CNN: NMS at
            0.3; torchvision's Faster R-CNN: 0.05, 0.5, 100, 0.01 px).
    """

    def __init__(self, pooler: RoIPooler, box_head: nn.Module, box_predictor: BoxPredictor, fg_iou: float = 0.5,
                 bg_iou: tuple[float, float] = (0.0, 0.5), batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, add_gt_proposals: bool = True,
                 box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), box_loss_beta: float = 1.0 / 9,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 min_size: float = 1e-2, ohem_rois: int = 0, ohem_nms: float = 0.7,
                 focal_gamma: float | None = None, focal_alpha: float | None = 0.25):
        super().__init__()
        check_number("the RoI head's ohem_rois", ohem_rois, 0, integer=True, hint=" (0: off; the paper's 64 an image)")
        check_number("the RoI head's ohem_nms", ohem_nms, 0, 1, hint=" (the paper's 0.7)")
        check_number("the RoI head's focal_gamma", focal_gamma, 0, optional=True,
                     hint=" (null: softmax and cross-entropy; RetinaNet's 2)")
        check_number("the RoI head's focal_alpha", focal_alpha, 0, 1, optional=True, hint=" (RetinaNet's 0.25)")
        if box_predictor.background != (focal_gamma is None):
            raise ValueError("the focal classifier needs a BoxPredictor with background=False, the softmax one with "
                             "background=True")
        self.pooler, self.box_head, self.box_predictor = pooler, box_head, box_predictor
        self.matcher = IoUMatcher(fg_iou, tuple(bg_iou))
        self.box_coder = BoxCoder(box_coder_weights)
        self.batch_size_per_image, self.positive_fraction = int(batch_size_per_image), float(positive_fraction)
        self.add_gt_proposals, self.box_loss_beta = add_gt_proposals, float(box_loss_beta)
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.min_size = int(detections_per_img), float(min_size)
        self.ohem_rois, self.ohem_nms = int(ohem_rois), float(ohem_nms)
        self.focal_gamma = None if focal_gamma is None else float(focal_gamma)
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)

    def forward(self, levels: list[torch.Tensor], proposals: list[torch.Tensor], image_size: tuple[int, int],
                targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads in training mode need targets (list of dict(boxes, labels))")
            proposals, labels, regression_targets = self.sample(proposals, targets)
        class_logits, box_deltas = self.box_predictor(self.box_head(self.pooler(levels, proposals)))
        if not self.training:
            return self.postprocess(class_logits, box_deltas, proposals, image_size)
        if self.ohem_rois:
            hard = self.hardest(class_logits, box_deltas, labels, regression_targets, proposals)
            class_logits, box_deltas, labels, regression_targets = (
                value[hard] for value in (class_logits, box_deltas, labels, regression_targets))
        return self.loss(class_logits, box_deltas, labels, regression_targets)

    def sample(self, proposals: list[torch.Tensor], targets: list[dict]
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The training RoIs of each image, their classes (``Tensor[R]``, 0 = background) and regression targets
        (``Tensor[R, 4]``, zeros for the background)."""
        sampled, labels, regression_targets = [], [], []
        for boxes, target in zip(proposals, targets):
            objects, object_labels = objects_with_area(target, boxes.device)
            boxes = boxes.to(torch.float32)
            if self.add_gt_proposals:
                boxes = torch.cat([boxes, objects])
            match = self.matcher(boxes, objects)
            if self.ohem_rois:  # all of them: the hardest are chosen after the forward pass
                positive, negative = torch.where(match.kind == FOREGROUND)[0], torch.where(match.kind == BACKGROUND)[0]
            else:
                positive, negative = sample_balanced(match.kind, self.batch_size_per_image, self.positive_fraction)
            keep = torch.cat([positive, negative])
            image_labels = torch.zeros(len(keep), dtype=torch.int64, device=boxes.device)
            image_labels[: len(positive)] = object_labels[match.index[positive]] + 1
            image_targets = torch.zeros(len(keep), 4, device=boxes.device)
            image_targets[: len(positive)] = self.box_coder.encode(objects[match.index[positive]], boxes[positive])
            sampled.append(boxes[keep])
            labels.append(image_labels)
            regression_targets.append(image_targets)
        return sampled, torch.cat(labels), torch.cat(regression_targets)

    def roi_losses(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
                   regression_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each RoI's classification and box loss (``Tensor[R]`` each): the cross-entropy (or the focal loss summed
        over the K classes), and the smooth-L1 of its deltas for its class summed over the four (0 for the
        background)."""
        foreground = torch.where(labels > 0)[0]
        deltas = box_deltas.reshape(len(box_deltas), -1, 4)[foreground, labels[foreground]]
        foreground_loss = F.smooth_l1_loss(deltas, regression_targets[foreground], beta=self.box_loss_beta,
                                           reduction="none").sum(1)
        box_loss = foreground_loss.new_zeros(len(labels)).index_put((foreground,), foreground_loss)
        if self.focal_gamma is None:
            return F.cross_entropy(class_logits, labels, reduction="none"), box_loss
        targets = F.one_hot(labels, class_logits.shape[-1] + 1)[:, 1:].to(class_logits)  # background: all zeros
        alpha = -1.0 if self.focal_alpha is None else self.focal_alpha  # torchvision's "no α"
        return sigmoid_focal_loss(class_logits, targets, alpha, self.focal_gamma).sum(1), box_loss

    @torch.no_grad()
    def hardest(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
                regression_targets: torch.Tensor, rois: list[torch.Tensor]) -> torch.Tensor:
        """OHEM's batch: the indices (into the concatenated ``rois``, one ``Tensor[K_i, 4]`` per image) of each
        image's ``ohem_rois`` RoIs of highest total loss left by NMS at ``ohem_nms`` ranked by that loss."""
        total = sum(self.roi_losses(class_logits, box_deltas, labels, regression_targets))
        kept, start = [], 0
        for boxes, losses in zip(rois, total.split([len(r) for r in rois])):
            kept.append(nms(boxes, losses, self.ohem_nms)[: self.ohem_rois] + start)  # nms ranks by loss
            start += len(boxes)
        return torch.cat(kept)

    def loss(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
             regression_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if labels.numel() == 0:  # no RoI in the whole batch: nothing to learn from, but a graph for backward
            zero = class_logits.sum() * 0 + box_deltas.sum() * 0
            return {"loss_classifier": zero, "loss_box_reg": zero}
        classifier, box = self.roi_losses(class_logits, box_deltas, labels, regression_targets)
        return {"loss_classifier": classifier.mean(), "loss_box_reg": box.sum() / labels.numel()}

    def postprocess(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: list[torch.Tensor],
                    image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Per image and class: decode, clip, keep scores above ``score_thresh`` and boxes of at least ``min_size``,
        NMS per class, the best ``detections_per_img``."""
        boxes = self.box_coder.decode(box_deltas.reshape(len(box_deltas), -1, 4), torch.cat(proposals)[:, None])
        # Background (class 0) is no detection: the foreground classes' scores and boxes.
        scores = class_logits.sigmoid() if self.focal_gamma is not None else F.softmax(class_logits, -1)[:, 1:]
        boxes, num_classes = boxes[:, 1:], scores.shape[-1]
        counts = [len(p) for p in proposals]
        detections = []
        for image_boxes, image_scores in zip(boxes.split(counts), scores.split(counts)):
            image_boxes = clip_boxes_to_image(image_boxes, image_size)
            # 1-based in the NMS, as torchvision's (batched_nms offsets the boxes by their label).
            labels = torch.arange(1, num_classes + 1, device=image_scores.device).view(1, -1).expand_as(image_scores)
            image_boxes, image_scores, labels = image_boxes.reshape(-1, 4), image_scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(image_scores > self.score_thresh)[0]
            image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            keep = remove_small_boxes(image_boxes, self.min_size)
            image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            keep = batched_nms(image_boxes, image_scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append(dict(boxes=image_boxes[keep], scores=image_scores[keep], labels=labels[keep] - 1))
        return detections
