"""YOLOv3 and YOLOv3-tiny.

Paper: Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement".

YOLOv3 predicts at three scales (strides 32, 16, 8: 13, 26, 52 cells at 416 px) from a Darknet-53 trunk, FPN-style:
the coarse branch's features go through a 1×1 conv, are upsampled ×2 and concatenated with the trunk's features of
the next finer stride. Each scale has 3 of the 9 k-means anchors (largest on the coarsest grid) and predicts per
anchor ``(tx, ty, tw, th, to)`` plus one independent logistic classifier per class (BCE, no softmax). Layout as the
released ``yolov3.cfg``: per scale five alternating 1×1 / 3×3 convs (512/1024, 256/512, 128/256 channels), then a
3×3 conv and the 1×1 output conv. Loss: :class:`~cvlab.losses.yolo.YoloV3Loss`.

YOLOv3-tiny is the released ``yolov3-tiny.cfg``: the :class:`~cvlab.models.backbones.darknet.TinyDarknet` trunk,
two scales (strides 32, 16) with 3 of 6 anchors each (the released file's masks 3,4,5 and 0,1,2).

The grid follows the input: any input whose sides are multiples of 32 works (multi-scale training).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ActFactory, ConvNormAct, NormFactory
from cvlab.losses.yolo import YoloV3Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import AttnFactory, Darknet, TinyDarknet, leaky_relu, scale_width
from cvlab.models.detectors._yolo_common import AnchorYolo, PredictionHead, anchors_for
from cvlab.ops.postprocess import DetectionPostprocess

STRIDE = 32
# Released anchors, (w, h) in pixels of a 416 px input, smallest first.
_YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
_YOLOV3_TINY_ANCHORS = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
_LEVEL_CHS = (512, 256, 128)  # per scale, coarse to fine: the 1×1 width of its conv set


def _conv_set(in_chs: int, chs: int, conv) -> nn.Sequential:
    """Five convs alternating 1×1 to ``chs`` and 3×3 to ``2·chs``, ending on the 1×1."""
    return nn.Sequential(conv(in_chs, chs, 1), conv(chs, 2 * chs, 3), conv(2 * chs, chs, 1),
                         conv(chs, 2 * chs, 3), conv(2 * chs, chs, 1))


class YOLOv3Body(nn.Module):
    """Darknet-53 → three scales, coarse to fine; ``forward(x) -> [P5, P4, P3]`` raw maps ``Tensor[N, A·(5 + C), h, w]``
    at strides 32, 16, 8."""

    def __init__(self, num_anchors: int, num_classes: int, width: float, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        super().__init__()
        self.backbone = Darknet(53, num_classes=0, width=width, norm_layer=norm_layer, act_layer=act_layer,
                                attn_layer=attn_layer)
        trunk_chs = [info["num_chs"] for info in reversed(self.backbone.feature_info[-3:])]  # C5, C4, C3
        level_chs = [scale_width(chs, width) for chs in _LEVEL_CHS]
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.conv_sets, self.heads, self.laterals = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level, (feature_chs, chs) in enumerate(zip(trunk_chs, level_chs)):
            in_chs = feature_chs
            if level:
                # The coarser branch is reduced to this level's width, upsampled and concatenated first.
                self.laterals.append(conv(level_chs[level - 1], chs, 1))
                in_chs += chs
            self.conv_sets.append(_conv_set(in_chs, chs, conv))
            self.heads.append(PredictionHead(chs, 2 * chs, num_anchors, num_classes, norm_layer, act_layer))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3, c4, c5 = self.backbone.forward_multiscale(x)
        x = self.conv_sets[0](c5)
        outputs = [self.heads[0](x)]
        for lateral, conv_set, head, skip in zip(self.laterals, self.conv_sets[1:], self.heads[1:], (c4, c3)):
            x = conv_set(torch.cat([self.upsample(lateral(x)), skip], dim=1))
            outputs.append(head(x))
        return outputs


class TinyYOLOv3Body(nn.Module):
    """TinyDarknet → conv1×1(256) → [3×3(512) → out] at stride 32; conv1×1(128), upsample, ⊕ the stride-16
    256-channel trunk features → [3×3(256) → out] at stride 16 (yolov3-tiny.cfg)."""

    def __init__(self, num_anchors: int, num_classes: int, width: float, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        super().__init__()
        self.trunk = TinyDarknet(width=width, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        c4_chs, c5_chs = (info["num_chs"] for info in self.trunk.feature_info)
        reduced_chs, lateral_chs = scale_width(256, width), scale_width(128, width)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.reduce = conv(c5_chs, reduced_chs, 1)
        self.head_coarse = PredictionHead(reduced_chs, scale_width(512, width), num_anchors, num_classes,
                                         norm_layer, act_layer)
        self.lateral = conv(reduced_chs, lateral_chs, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.head_fine = PredictionHead(lateral_chs + c4_chs, scale_width(256, width), num_anchors,
                                       num_classes, norm_layer, act_layer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c4, c5 = self.trunk.forward_multiscale(x)
        x = self.reduce(c5)
        fine = torch.cat([self.upsample(self.lateral(x)), c4], dim=1)
        return [self.head_coarse(x), self.head_fine(fine)]


class YOLOv3(AnchorYolo):
    """YOLOv3 / YOLOv3-tiny: 3 (tiny: 2) scales, 3 anchors each, logistic objectness and classes.

    Measured by cvlab at 416 px and 80 classes (FLOPs = 2 · multiply-adds, ``torch.utils.flop_counter``):

    ===========  ===========  ==========  =================================================================
    variant      params       FLOPs       reference
    ===========  ===========  ==========  =================================================================
    yolov3       61,949,149   65.86 G     yolov3.cfg: 61,949,149 trainable; Darknet: 65.86 Bn operations
    yolov3_tiny  8,852,366    5.56 G      yolov3-tiny.cfg; 8,858,734 when BN running mean / var are counted
    ===========  ===========  ==========  =================================================================

    Args:
        tiny: build YOLOv3-tiny.
        anchors: list of (w, h) in pixels at ``img_size`` (e.g. from ``cvlab.ops.anchors.kmeans_anchors``), a
            multiple of the number of scales; sorted by area, the largest go to the coarsest scale. Default: the
            released cfg's anchors rescaled from 416 px to ``img_size``.
        img_size: the training input size (a multiple of 32); it only scales the default anchors.
        ignore_thresh, box_loss, coord_scale: see :class:`~cvlab.losses.yolo.YoloV3Loss`.
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, num_classes: int = 80, img_size: int = 416, width: float = 1.0, tiny: bool = False,
                 anchors: Sequence[Sequence[float]] | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None,
                 ignore_thresh: float = 0.5, box_loss: str = "mse", coord_scale: float = 1.0, **postprocess_kwargs):
        if img_size % STRIDE:
            raise ValueError(f"YOLOv3 needs img_size to be a multiple of {STRIDE}, got {img_size}")
        num_levels = 2 if tiny else 3
        anchor_wh = anchors_for(anchors, _YOLOV3_TINY_ANCHORS if tiny else _YOLOV3_ANCHORS, img_size)
        if len(anchor_wh) % num_levels:
            raise ValueError(f"{len(anchor_wh)} anchors cannot be split evenly over {num_levels} scales")
        anchor_wh = anchor_wh[anchor_wh.prod(dim=1).argsort()]
        per_level = len(anchor_wh) // num_levels
        # Coarse to fine, like the body's outputs: the coarsest grid gets the largest anchors.
        masks = [range(level * per_level, (level + 1) * per_level) for level in reversed(range(num_levels))]
        body_cls = TinyYOLOv3Body if tiny else YOLOv3Body
        body = body_cls(per_level, num_classes, width, norm_layer, act_layer or leaky_relu, attn_layer)
        super().__init__(body, anchor_wh, masks, num_classes, YoloV3Loss(ignore_thresh, box_loss, coord_scale),
                         torch.sigmoid, DetectionPostprocess(**postprocess_kwargs))


@register_model(task="detection")
def yolov3(num_classes: int = 80, img_size: int = 416, width: float = 1.0, norm_layer=None, act_layer=None,
           **kwargs) -> YOLOv3:
    """YOLOv3 (yolov3.cfg layout): Darknet-53, 3 scales, 9 anchors."""
    return YOLOv3(num_classes, img_size, width, norm_layer=norm_layer, act_layer=act_layer, **kwargs)


@register_model(task="detection")
def yolov3_tiny(num_classes: int = 80, img_size: int = 416, width: float = 1.0, norm_layer=None, act_layer=None,
                **kwargs) -> YOLOv3:
    """YOLOv3-tiny (yolov3-tiny.cfg layout): 2 scales, 6 anchors."""
    return YOLOv3(num_classes, img_size, width, tiny=True, norm_layer=norm_layer, act_layer=act_layer, **kwargs)
