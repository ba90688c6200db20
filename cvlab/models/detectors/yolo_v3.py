"""YOLOv3 and YOLOv3-tiny.

Paper: Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement".

YOLOv3 predicts at three scales (strides 32, 16, 8: 13, 26, 52 cells at 416 px) from a Darknet-53 trunk through an
FPN-style neck (:class:`~cvlab.models.necks.yolo_fpn.YoloV3FPN`): the coarse branch's features go through a 1×1
conv, are upsampled ×2 and concatenated with the trunk's features of the next finer stride. Each scale has 3 of the
9 k-means anchors (largest on the coarsest grid) and predicts per anchor ``(tx, ty, tw, th, to)`` plus one
independent logistic classifier per class (BCE, no softmax). Layout as the released ``yolov3.cfg``: per scale five
alternating 1×1 / 3×3 convs (512/1024, 256/512, 128/256 channels), then the head's 3×3 conv and 1×1 output conv
(:class:`~cvlab.models.heads.anchor_head.AnchorHead`). Loss: :class:`~cvlab.losses.yolo.YoloV3Loss`.

YOLOv3-tiny is the released ``yolov3-tiny.cfg``: the :class:`~cvlab.models.backbones.darknet.TinyDarknet` trunk,
two scales (strides 32, 16) with 3 of 6 anchors each (the released file's masks 3,4,5 and 0,1,2); its neck is the
same top-down path with one 1×1 conv (256) at the coarse scale and none at the fine one.

``backbone=<zoo name>`` replaces the trunk by any classification backbone whose last stages halve the resolution
(resnet*, mobilenet*, darknet*); the neck takes its widths from the backbone's ``feature_info``. The grid follows the
input: any input whose sides are multiples of the coarsest stride works (multi-scale training).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import AnchorYoloLoss, YoloV3Loss
from cvlab.models._registry import create_model, register_model
from cvlab.models.backbones.darknet import leaky_relu, scale_width, tiny_darknet_features
from cvlab.models.detectors._yolo_common import AnchorYolo, anchors_for, check_loss, yolo_backbone
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.models.necks.yolo_fpn import YoloV3FPN
from cvlab.ops.postprocess import DetectionPostprocess

# Released anchors, (w, h) in pixels of a 416 px input, smallest first.
_YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
_YOLOV3_TINY_ANCHORS = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
# Per scale, coarse to fine: the 1×1 width of the neck's conv set, and its number of convs.
_LEVEL_CHS, _DEPTHS = (512, 256, 128), (5, 5, 5)
_TINY_LEVEL_CHS, _TINY_DEPTHS = (256, 128), (1, 0)
# The head's 3×3 conv per scale, coarse to fine: twice the conv set's width (yolov3.cfg), 512 and 256 (tiny).
_HIDDEN_CHS = (1024, 512, 256)
_TINY_HIDDEN_CHS = (512, 256)


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
        image_size: the training input size (a multiple of the coarsest stride, 32 for the paper trunk); it scales
            the default anchors.
        width: channel multiplier of the paper trunk, the neck and the head.
        backbone: None for the paper's trunk (Darknet-53; tiny: TinyDarknet), or the name of a zoo classification
            backbone, built with ``features_only`` and this model's ``image_size`` / norm / act / attn factories
            (``act_layer=None`` leaves it its own activation).
        anchors: list of (w, h) in pixels at ``image_size`` (e.g. from ``cvlab.ops.anchors.kmeans_anchors``), a
            multiple of the number of scales; sorted by area, the largest go to the coarsest scale. Default: the
            released cfg's anchors rescaled from 416 px to ``image_size``.
        loss: an :class:`~cvlab.losses.yolo.AnchorYoloLoss`; None = :class:`~cvlab.losses.yolo.YoloV3Loss` with the
            paper's settings.
        norm_layer / act_layer / attn_layer: default BatchNorm2d / LeakyReLU(0.1) / none; the trunk runs
            ``attn_layer``, as Darknet-53 and TinyDarknet do.
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, num_classes: int = 80, image_size: int = 416, width: float = 1.0, tiny: bool = False,
                 backbone: str | None = None, anchors: Sequence[Sequence[float]] | None = None,
                 loss: nn.Module | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None, **postprocess_kwargs):
        name = "yolov3_tiny" if tiny else "yolov3"
        loss = check_loss(loss, AnchorYoloLoss, "loss=yolov3 or loss=yolov2", name, YoloV3Loss)
        num_levels = 2 if tiny else 3
        anchor_wh = anchors_for(anchors, _YOLOV3_TINY_ANCHORS if tiny else _YOLOV3_ANCHORS, image_size)
        if len(anchor_wh) % num_levels:
            raise ValueError(f"{len(anchor_wh)} anchors cannot be split evenly over {num_levels} scales")
        anchor_wh = anchor_wh[anchor_wh.prod(dim=1).argsort()]
        per_level = len(anchor_wh) // num_levels
        # Coarse to fine, like the neck's outputs: the coarsest grid gets the largest anchors.
        masks = [range(level * per_level, (level + 1) * per_level) for level in reversed(range(num_levels))]

        trunk_kwargs = dict(width=width, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        # The paper trunk keeps its stride-32 stem at every size (the classifier's stem=auto shrinks it <= 64 px).
        # TinyDarknet's levels: the 256-channel stride-16 conv output and the last (stride-32) map.
        paper_trunk = (partial(tiny_darknet_features, out_indices=(-3, -1), **trunk_kwargs) if tiny else
                       partial(create_model, "darknet53", features_only=True, out_indices=(-3, -2, -1),
                               stem="standard", image_size=image_size, **trunk_kwargs))
        trunk = yolo_backbone(backbone, paper_trunk, num_levels, name, image_size, norm_layer=norm_layer,
                              act_layer=act_layer, attn_layer=attn_layer)

        act_layer = act_layer or leaky_relu
        level_chs, depths = (_TINY_LEVEL_CHS, _TINY_DEPTHS) if tiny else (_LEVEL_CHS, _DEPTHS)
        neck = YoloV3FPN(trunk.feature_info.channels(), [scale_width(chs, width) for chs in level_chs], depths,
                         norm_layer, act_layer)
        hidden_chs = [scale_width(chs, width) for chs in (_TINY_HIDDEN_CHS if tiny else _HIDDEN_CHS)]
        head = AnchorHead(neck.out_channels, hidden_chs, per_level, num_classes, norm_layer, act_layer)
        super().__init__(trunk, neck, head, anchor_wh, masks, loss, DetectionPostprocess(**postprocess_kwargs))


@register_model(task="detection")
def yolov3(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
           norm_layer=None, act_layer=None, **kwargs) -> YOLOv3:
    """YOLOv3 (yolov3.cfg layout): Darknet-53 (or ``backbone``), 3 scales, 9 anchors."""
    return YOLOv3(num_classes, image_size, width, backbone=backbone, norm_layer=norm_layer, act_layer=act_layer,
                  **kwargs)


@register_model(task="detection")
def yolov3_tiny(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
                norm_layer=None, act_layer=None, **kwargs) -> YOLOv3:
    """YOLOv3-tiny (yolov3-tiny.cfg layout): TinyDarknet (or ``backbone``), 2 scales, 6 anchors."""
    return YOLOv3(num_classes, image_size, width, tiny=True, backbone=backbone, norm_layer=norm_layer,
                  act_layer=act_layer, **kwargs)
