"""The anchor prediction head of YOLOv2 / YOLOv3: per level a 3×3 conv-norm-act and a 1×1 conv to the raw predictions.
YOLOv5's Detect layer is the same head without the 3×3 conv, with its own box decoding and starting biases.

Papers:
    Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger" (anchor boxes, direct location prediction).
    Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement" (one such head per scale).
    Jocher et al., ultralytics/yolov5 (no paper; models/yolo.py ``Detect``).

Layout of a raw output: per level ``Tensor[N, A, H, W, 5 + C]`` holding, for each of the ``A`` anchors of each cell,
``(tx, ty, tw, th, to, class logits…)`` — the channel order of Darknet's region / yolo layers. Decoding is
:func:`~cvlab.ops.postprocess.decode_anchor_boxes` (``bx = σ(tx) + cx``, ``bw = pw · exp(tw)``); the class
probabilities come from the loss the detector trains with (softmax for YOLOv2's, sigmoid for YOLOv3's).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.ops.postprocess import decode_anchor_boxes

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

    ``objectness_bias`` / ``class_bias`` replace those starting biases (logits) when given (YOLOv5 starts its
    objectness at ``log(8 / cells at 640 px)``, 8 objects per 640 px image, and its classes at
    ``log(0.6 / (C − 0.99999))``).
    """

    keeps_own_init = True  # cvlab.models.create_model and the init group re-apply reset_parameters()

    def __init__(self, in_chs: int, num_anchors: int, num_classes: int, objectness_bias: float | None = None,
                 class_bias: float | None = None):
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.objectness_bias, self.class_bias = objectness_bias, class_bias
        super().__init__(in_chs, num_anchors * (5 + num_classes), 1)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        bias = torch.zeros(self.num_anchors, 5 + self.num_classes)
        bias[:, 4] = (torch.logit(torch.tensor(OBJECTNESS_PRIOR)) if self.objectness_bias is None
                      else self.objectness_bias)
        if self.class_bias is not None:
            bias[:, 5:] = self.class_bias
        else:  # logit(1 / C) is infinite for C = 1: a single class starts at ½.
            bias[:, 5:] = torch.logit(torch.tensor(1.0 / self.num_classes)) if self.num_classes > 1 else 0.0
        with torch.no_grad():
            self.bias.copy_(bias.flatten())


class AnchorPredictor(nn.Sequential):
    """One level: 3×3 conv-norm-act to ``hidden_chs`` (None: none, as YOLOv5's Detect), then the
    :class:`AnchorOutputConv` to ``num_anchors`` predictions. ``Tensor[N, in_chs, H, W] → Tensor[N, A·(5 + C), H, W]``.
    """

    def __init__(self, in_chs: int, hidden_chs: int | None, num_anchors: int, num_classes: int,
                 norm_layer: NormFactory | None, act_layer: ActFactory | None, **output_biases):
        hidden = [] if hidden_chs is None else [ConvNormAct(in_chs, hidden_chs, 3, norm_layer=norm_layer,
                                                            act_layer=act_layer)]
        super().__init__(*hidden, AnchorOutputConv(hidden_chs or in_chs, num_anchors, num_classes, **output_biases))


class AnchorHead(nn.Module):
    """One :class:`AnchorPredictor` per level, ``num_anchors`` anchors each.

    Args:
        in_channels: channels of each level's input (the neck's ``out_channels``).
        hidden_channels: width of each level's 3×3 conv; None: no such conv (YOLOv5's Detect).
        objectness_biases: per level, the output conv's starting objectness logit (None: the prior of
            :class:`AnchorOutputConv`); ``class_bias``: its starting class logit.
        xy_scale / bounded_size: the box decoding (:func:`~cvlab.ops.postprocess.decode_anchor_boxes`; YOLOv5:
            2 and True); ``xy_scale`` is one for every level or a list of one per level (YOLOv4: 1.2, 1.1, 1.05 from
            the finest).

    ``forward(levels: list[Tensor[N, C_l, H_l, W_l]]) -> list[Tensor[N, A, H_l, W_l, 5 + C]]`` (the raw layout);
    :meth:`decode` turns those into boxes and class scores.
    """

    def __init__(self, in_channels: Sequence[int], hidden_channels: Sequence[int] | None, num_anchors: int,
                 num_classes: int, norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 objectness_biases: Sequence[float] | None = None, class_bias: float | None = None,
                 xy_scale: float | Sequence[float] = 1.0, bounded_size: bool = False):
        super().__init__()
        hidden_channels = [None] * len(in_channels) if hidden_channels is None else hidden_channels
        objectness_biases = [None] * len(in_channels) if objectness_biases is None else objectness_biases
        if not len(in_channels) == len(hidden_channels) == len(objectness_biases):
            raise ValueError(f"{len(in_channels)} input levels but {len(hidden_channels)} hidden widths and "
                             f"{len(objectness_biases)} objectness biases")
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.xy_scale = xy_scale if isinstance(xy_scale, (int, float)) else tuple(xy_scale)
        self.bounded_size = bounded_size
        self.levels = nn.ModuleList(AnchorPredictor(in_chs, hidden_chs, num_anchors, num_classes, norm_layer,
                                                    act_layer, objectness_bias=objectness_bias, class_bias=class_bias)
                                    for in_chs, hidden_chs, objectness_bias in zip(in_channels, hidden_channels,
                                                                                   objectness_biases))
        if len(self.level_xy_scales()) != len(self.levels):
            raise ValueError(f"{len(self.levels)} levels but {len(self.level_xy_scales())} xy scales")

    def level_xy_scales(self) -> list[float]:
        """The grid sensitivity of each level's centre offsets, in level order (the loss decodes with them too)."""
        if isinstance(self.xy_scale, (int, float)):
            return [float(self.xy_scale)] * len(self.levels)
        return [float(scale) for scale in self.xy_scale]

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for predictor, features in zip(self.levels, levels, strict=True):
            level_map = predictor(features)
            batch, _, height, width = level_map.shape
            outputs.append(level_map.view(batch, self.num_anchors, 5 + self.num_classes, height, width)
                           .permute(0, 1, 3, 4, 2))
        return outputs

    def decode(self, raw: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], image_size: tuple[int, int],
               class_probabilities: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw levels and their anchors ``Tensor[A, 2]`` (pixel w, h) → (boxes ``Tensor[N, P, 4]`` xyxy pixels,
        scores ``Tensor[N, P, C]`` = ``σ(to) · class probability``) over all ``P`` slots of all levels."""
        boxes, scores = [], []
        for level, level_anchors, xy_scale in zip(raw, anchors, self.level_xy_scales(), strict=True):
            batch = level.shape[0]
            level_boxes = decode_anchor_boxes(level[..., :4], level_anchors, image_size, xy_scale,
                                              self.bounded_size)
            boxes.append(level_boxes.reshape(batch, -1, 4))
            level_scores = level[..., 4:5].sigmoid() * class_probabilities(level[..., 5:])
            scores.append(level_scores.reshape(batch, -1, self.num_classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)
