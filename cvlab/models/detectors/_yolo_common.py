"""Pieces shared by the YOLO detectors: the train/eval forward of the detection contract, the anchor-based detector
(YOLOv2 / YOLOv3 and their tiny variants) and its prediction head.

Layout of a raw anchor-based output: per level ``Tensor[N, A, H, W, 5 + C]`` holding, for each of the ``A`` anchors
of each cell, ``(tx, ty, tw, th, to, class logits…)`` — the channel order of Darknet's region / yolo layers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cvlab.layers.conv import ActFactory, ConvNormAct, NormFactory
from cvlab.layers.init import restore_own_inits
from cvlab.losses.yolo import AnchorYoloLoss
from cvlab.models.backbones.darknet import init_darknet_weights
from cvlab.ops.postprocess import DetectionPostprocess, decode_anchor_boxes

# Anchor sets of the released cfgs are for 416×416 inputs; cvlab scales them to the model's img_size.
RELEASE_IMG_SIZE = 416


def anchors_for(anchors: Sequence[Sequence[float]] | None, default_at_416: Sequence[Sequence[float]],
                img_size: int) -> torch.Tensor:
    """Tensor[K, 2] anchor (w, h) in pixels: the user's list as given (pixels at the model's img_size), else the
    released default rescaled from 416 px to ``img_size``."""
    if anchors is not None:
        # Plain floats first: Hydra hands the list over as nested ListConfig.
        wh = torch.tensor([(float(w), float(h)) for w, h in anchors], device="cpu")
    else:
        wh = torch.as_tensor(default_at_416, dtype=torch.float32, device="cpu") * (img_size / RELEASE_IMG_SIZE)
    if (wh <= 0).any():
        raise ValueError(f"anchor sizes must be positive, got {wh.tolist()}")
    return wh


class YoloDetector(nn.Module):
    """The detection contract for every YOLO: ``forward(images: Tensor[N, 3, H, W], targets=None)``.

    Training returns the loss dict (``loss_box``, ``loss_obj``, ``loss_noobj``, ``loss_cls``); eval returns one
    ``dict(boxes=Tensor[K, 4] xyxy pixels, scores=Tensor[K], labels=Tensor[K] int64)`` per image.
    Subclasses implement ``forward_raw(images)``, ``compute_loss(raw, targets, image_size)`` and
    ``decode(raw, image_size) -> (boxes Tensor[N, P, 4], scores Tensor[N, P, C])``.
    """

    def __init__(self, postprocess: DetectionPostprocess):
        super().__init__()
        self.postprocess = postprocess

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        raw = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("a YOLO model in training mode needs targets (list of dict(boxes, labels))")
            return self.compute_loss(raw, targets, image_size)
        boxes, scores = self.decode(raw, image_size)
        return self.postprocess(boxes, scores, image_size)


# Starting probabilities of the output conv: an object in ~1 % of the anchor slots (Lin et al. 2017, "Focal Loss for
# Dense Object Detection", §4.1), every class equally likely.
OBJECTNESS_PRIOR = 0.01


class AnchorOutputConv(nn.Conv2d):
    """The biased 1×1 conv to the raw predictions ``A·(tx, ty, tw, th, to, C class logits)``, started at the prior.

    Darknet starts it like every other conv, so the first steps predict an object with probability ~½ in every
    slot and the no-object term, summed over hundreds of slots, swamps the few positives' box and class gradients.
    Here the weights start small (std 0.01) and the biases at the prior: ``σ(to) = 0.01`` and every class logit
    ``logit(1 / C)``, which gives ``1 / C`` under the sigmoid (YOLOv3) and a uniform softmax (YOLOv2) alike. On
    shapes_det this is what lets yolov3_tiny learn its classes in minutes (BENCHMARKS.md).
    """

    keeps_own_init = True  # cvlab.models.create_model and the init group re-apply reset_parameters()

    def __init__(self, in_chs: int, num_anchors: int, num_classes: int):
        self.num_anchors, self.num_classes = num_anchors, num_classes
        super().__init__(in_chs, num_anchors * (5 + num_classes), 1)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        bias = torch.zeros(self.num_anchors, 5 + self.num_classes)
        bias[:, 4] = torch.logit(torch.tensor(OBJECTNESS_PRIOR))
        # logit(1 / C) is infinite for C = 1: a single class starts at ½.
        bias[:, 5:] = torch.logit(torch.tensor(1.0 / self.num_classes)) if self.num_classes > 1 else 0.0
        with torch.no_grad():
            self.bias.copy_(bias.flatten())


class PredictionHead(nn.Sequential):
    """3×3 conv-norm-act to ``hidden_chs``, then the :class:`AnchorOutputConv` to ``num_anchors`` predictions."""

    def __init__(self, in_chs: int, hidden_chs: int, num_anchors: int, num_classes: int,
                 norm_layer: NormFactory | None, act_layer: ActFactory):
        super().__init__(ConvNormAct(in_chs, hidden_chs, 3, norm_layer=norm_layer, act_layer=act_layer),
                         AnchorOutputConv(hidden_chs, num_anchors, num_classes))


class AnchorYolo(YoloDetector):
    """A YOLO with anchors (v2, v3): ``body(images)`` gives one raw map per level, ``Tensor[N, A_l·(5+C), H, W]``,
    each from an :class:`AnchorOutputConv`.

    Args:
        body: the network; its ``forward`` returns the level maps in the order of ``anchor_masks``.
        anchors: Tensor[K, 2] (w, h) in pixels.
        anchor_masks: for each level, the indices of its anchors in ``anchors``.
        loss: the :class:`~cvlab.losses.yolo.AnchorYoloLoss` to train with.
        class_activation: ``torch.softmax``-like map from class logits Tensor[..., C] to probabilities.

    Eval scores are ``σ(to) · class probability``; the grid follows the input, so any size that is a multiple of
    the largest stride works.
    """

    def __init__(self, body: nn.Module, anchors: torch.Tensor, anchor_masks: Sequence[Sequence[int]],
                 num_classes: int, loss: AnchorYoloLoss,
                 class_activation: Callable[[torch.Tensor], torch.Tensor], postprocess: DetectionPostprocess):
        super().__init__(postprocess)
        self.body = body
        self.num_classes = num_classes
        self.register_buffer("anchors", anchors)
        self.anchor_masks = [list(mask) for mask in anchor_masks]
        self.loss = loss
        self.class_activation = class_activation
        init_darknet_weights(self)
        restore_own_inits(self)  # the output convs' prior

    def level_anchors(self) -> list[torch.Tensor]:
        return [self.anchors[mask] for mask in self.anchor_masks]

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tensor[N, 3, H, W] → per level Tensor[N, A, H_l, W_l, 5 + C]."""
        levels = []
        for level_map, mask in zip(self.body(images), self.anchor_masks):
            batch, _, height, width = level_map.shape
            levels.append(level_map.view(batch, len(mask), 5 + self.num_classes, height, width).permute(0, 1, 3, 4, 2))
        return levels

    def compute_loss(self, raw: list[torch.Tensor], targets: list[dict], image_size: tuple[int, int]):
        return self.loss(raw, self.level_anchors(), targets, image_size)

    def decode(self, raw: list[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = [], []
        for level, anchors in zip(raw, self.level_anchors()):
            batch = level.shape[0]
            boxes.append(decode_anchor_boxes(level[..., :4], anchors, image_size).reshape(batch, -1, 4))
            level_scores = level[..., 4:5].sigmoid() * self.class_activation(level[..., 5:])
            scores.append(level_scores.reshape(batch, -1, self.num_classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)
