"""YOLOv2 and YOLOv2-tiny.

Paper: Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger".

YOLOv2 puts anchor boxes (5 shapes from k-means "dimension clusters") on the stride-32 grid of a Darknet-19 trunk
with batch norm and predicts, per anchor, ``(tx, ty, tw, th, to)`` and softmax class scores, decoded by direct
location prediction (``bx = σ(tx) + cx``, ``bw = pw · exp(tw)``; :func:`~cvlab.ops.postprocess.decode_anchor_boxes`).
The detection head follows the released ``yolov2.cfg``: Darknet-19 without its classifier, two 3×3 1024 convs, and a
passthrough that takes the stride-16 512-channel features through a 1×1 64 conv and a stride-2 space-to-depth
(``reorg``: 26×26×64 → 13×13×256 at 416 px), concatenated before a last 3×3 1024 conv and the 1×1 output conv.
Loss: :class:`~cvlab.losses.yolo.YoloV2Loss`.

The space-to-depth is ``pixel_unshuffle``; Darknet's ``reorg`` orders the 256 channels differently, which changes
nothing for a model trained from scratch. YOLOv2-tiny is the released ``tiny-yolo-voc.cfg``: the 7-conv
:class:`~cvlab.models.backbones.darknet.TinyDarknet` trunk, a 3×3 1024 conv and the output conv.

Multi-scale training: the grid is taken from the input, so any input whose sides are multiples of 32 works (the
paper trains on 320…608 px); anchors stay in pixels.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ActFactory, ConvNormAct, NormFactory
from cvlab.losses.yolo import YoloV2Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import AttnFactory, Darknet, TinyDarknet, leaky_relu, scale_width
from cvlab.models.detectors._yolo_common import AnchorYolo, PredictionHead, anchors_for
from cvlab.ops.postprocess import DetectionPostprocess

STRIDE = 32
# Released anchors, (w, h) in grid cells (32 px) of a 416 px input.
_YOLOV2_ANCHORS = ((0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778),
                   (9.77052, 9.16828))  # yolov2.cfg (COCO)
_TINY_YOLO_VOC_ANCHORS = ((1.08, 1.19), (3.42, 4.41), (6.63, 11.38), (9.42, 5.11), (16.62, 10.52))
_REORG_STRIDE = 2


class YOLOv2Body(nn.Module):
    """Darknet-19 → 2 × conv3×3(1024) ⊕ reorg(conv1×1(64) of the stride-16 features) → conv3×3(1024) → 1×1 out.

    ``forward(x: Tensor[N, 3, H, W]) -> [Tensor[N, A·(5 + C), H/32, W/32]]``.
    """

    def __init__(self, num_anchors: int, num_classes: int, width: float, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        super().__init__()
        self.backbone = Darknet(19, num_classes=0, width=width, norm_layer=norm_layer, act_layer=act_layer,
                                attn_layer=attn_layer)
        c4_chs, c5_chs = (info["num_chs"] for info in self.backbone.feature_info[-2:])
        head_chs, passthrough_chs = scale_width(1024, width), scale_width(64, width)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.extra = nn.Sequential(conv(c5_chs, head_chs, 3), conv(head_chs, head_chs, 3))
        self.passthrough = conv(c4_chs, passthrough_chs, 1)
        self.head = PredictionHead(passthrough_chs * _REORG_STRIDE**2 + head_chs, head_chs, num_anchors,
                                   num_classes, norm_layer, act_layer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, c4, c5 = self.backbone.forward_multiscale(x)
        fine = F.pixel_unshuffle(self.passthrough(c4), _REORG_STRIDE)
        # Darknet's route -1,-4 concatenates the reorganised fine features first.
        return [self.head(torch.cat([fine, self.extra(c5)], dim=1))]


class TinyYOLOv2Body(nn.Module):
    """TinyDarknet → conv3×3(1024) → 1×1 out (tiny-yolo-voc.cfg)."""

    def __init__(self, num_anchors: int, num_classes: int, width: float, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        super().__init__()
        self.trunk = TinyDarknet(width=width, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        head_chs = scale_width(1024, width)
        self.head = PredictionHead(self.trunk.feature_info[-1]["num_chs"], head_chs, num_anchors, num_classes,
                                   norm_layer, act_layer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(self.trunk.forward_multiscale(x)[-1])]


class YOLOv2(AnchorYolo):
    """YOLOv2 / YOLOv2-tiny: one stride-32 level with 5 anchors, softmax classes.

    Measured by cvlab at 416 px (FLOPs = 2 · multiply-adds, ``torch.utils.flop_counter``). The papers give no
    parameter counts; these are the released cfgs' layers (yolov2 at 80 classes counts 50,983,561 when the batch-norm
    running statistics are added, as Keras summaries do).

    ===========  ==================  ============  ============  =================================================
    variant      layout              params @80    params @20    FLOPs
    ===========  ==================  ============  ============  =================================================
    yolov2       yolov2.cfg          50,962,889    50,655,389    29.46 G @80 (62.94 G at 608; Darknet: 62.94 Bn)
    yolov2_tiny  tiny-yolo-voc.cfg   16,169,273    15,861,773    6.97 G @20 (Darknet: 6.97 Bn)
    ===========  ==================  ============  ============  =================================================

    Args:
        tiny: build YOLOv2-tiny.
        anchors: list of (w, h) in pixels at ``img_size`` (e.g. from ``cvlab.ops.anchors.kmeans_anchors``); default:
            the released cfg's anchors (yolov2.cfg's COCO set; tiny-yolo-voc.cfg's for the tiny model) rescaled
            from 416 px to ``img_size``. Any number of anchors works.
        img_size: the training input size (a multiple of 32); it only scales the default anchors.
        ignore_thresh, object_scale, noobject_scale, class_scale, coord_scale, box_loss: see
            :class:`~cvlab.losses.yolo.YoloV2Loss`.
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, num_classes: int = 80, img_size: int = 416, width: float = 1.0, tiny: bool = False,
                 anchors: Sequence[Sequence[float]] | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None,
                 ignore_thresh: float = 0.6, object_scale: float = 5.0, noobject_scale: float = 1.0,
                 class_scale: float = 1.0, coord_scale: float = 1.0, box_loss: str = "mse", **postprocess_kwargs):
        if img_size % STRIDE:
            raise ValueError(f"YOLOv2 needs img_size to be a multiple of {STRIDE}, got {img_size}")
        default_cells = _TINY_YOLO_VOC_ANCHORS if tiny else _YOLOV2_ANCHORS
        anchor_wh = anchors_for(anchors, [(w * STRIDE, h * STRIDE) for w, h in default_cells], img_size)
        body_cls = TinyYOLOv2Body if tiny else YOLOv2Body
        body = body_cls(len(anchor_wh), num_classes, width, norm_layer, act_layer or leaky_relu, attn_layer)
        loss = YoloV2Loss(ignore_thresh, object_scale, noobject_scale, class_scale, coord_scale, box_loss)
        super().__init__(body, anchor_wh, [range(len(anchor_wh))], num_classes, loss, partial(torch.softmax, dim=-1),
                         DetectionPostprocess(**postprocess_kwargs))


@register_model(task="detection")
def yolov2(num_classes: int = 80, img_size: int = 416, width: float = 1.0, norm_layer=None, act_layer=None,
           **kwargs) -> YOLOv2:
    """YOLOv2 (yolov2.cfg layout): Darknet-19 + passthrough, 5 anchors."""
    return YOLOv2(num_classes, img_size, width, norm_layer=norm_layer, act_layer=act_layer, **kwargs)


@register_model(task="detection")
def yolov2_tiny(num_classes: int = 80, img_size: int = 416, width: float = 1.0, norm_layer=None, act_layer=None,
                **kwargs) -> YOLOv2:
    """YOLOv2-tiny (tiny-yolo-voc.cfg layout)."""
    return YOLOv2(num_classes, img_size, width, tiny=True, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
