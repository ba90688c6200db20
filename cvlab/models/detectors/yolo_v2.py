"""YOLOv2 and YOLOv2-tiny.

Paper: Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger".

YOLOv2 puts anchor boxes (5 shapes from k-means "dimension clusters") on the stride-32 grid of a Darknet-19 trunk
with batch norm and predicts, per anchor, ``(tx, ty, tw, th, to)`` and softmax class scores, decoded by direct
location prediction (``bx = σ(tx) + cx``, ``bw = pw · exp(tw)``; :func:`~cvlab.ops.postprocess.decode_anchor_boxes`).
The layers after the trunk follow the released ``yolov2.cfg``: the passthrough neck
(:class:`~cvlab.models.necks.passthrough.PassthroughNeck`: two 3×3 1024 convs on the stride-32 features, joined by
the space-to-depth reorganised stride-16 features), then the head's 3×3 1024 conv and 1×1 output conv
(:class:`~cvlab.models.heads.anchor_head.AnchorHead`). Loss: :class:`~cvlab.losses.yolo.YoloV2Loss`.

YOLOv2-tiny is the released ``tiny-yolo-voc.cfg``: the 7-conv :class:`~cvlab.models.backbones.darknet.TinyDarknet`
trunk, no neck, and the head (3×3 1024 conv and the output conv).

``backbone=<zoo name>`` replaces the trunk by any classification backbone (for YOLOv2 its last two stages must halve
the resolution: resnet*, mobilenet*, darknet*); the neck or head takes its widths from the backbone's
``feature_info``. Multi-scale training: the grid is taken from the input, so any input whose sides are multiples of
the stride works (the paper trains on 320…608 px); anchors stay in pixels.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import AnchorYoloLoss, YoloV2Loss
from cvlab.models._registry import create_model, register_model
from cvlab.models.backbones.darknet import leaky_relu, scale_width, tiny_darknet_features
from cvlab.models.detectors._yolo_common import AnchorYolo, anchors_for, check_loss, yolo_backbone
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.models.necks.passthrough import PassthroughNeck
from cvlab.ops.postprocess import DetectionPostprocess

STRIDE = 32
# Released anchors, (w, h) in grid cells (32 px) of a 416 px input.
_YOLOV2_ANCHORS = ((0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778),
                   (9.77052, 9.16828))  # yolov2.cfg (COCO)
_TINY_YOLO_VOC_ANCHORS = ((1.08, 1.19), (3.42, 4.41), (6.63, 11.38), (9.42, 5.11), (16.62, 10.52))
# yolov2.cfg: the neck's 3×3 convs and the head's conv are 1024 wide, the passthrough's 1×1 conv 64.
_HEAD_CHS, _PASSTHROUGH_CHS = 1024, 64


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
        image_size: the training input size (a multiple of the stride, 32 for the paper trunk); it scales the
            default anchors.
        width: channel multiplier of the paper trunk, the neck and the head.
        backbone: None for the paper's trunk (Darknet-19; tiny: TinyDarknet), or the name of a zoo classification
            backbone, built with ``features_only`` and this model's ``image_size`` / norm / act / attn factories
            (``act_layer=None`` leaves it its own activation).
        anchors: list of (w, h) in pixels at ``image_size`` (e.g. from ``cvlab.ops.anchors.kmeans_anchors``);
            default: the released cfg's anchors (yolov2.cfg's COCO set; tiny-yolo-voc.cfg's for the tiny model)
            rescaled from 416 px to ``image_size``. Any number of anchors works.
        loss: an :class:`~cvlab.losses.yolo.AnchorYoloLoss`; None = :class:`~cvlab.losses.yolo.YoloV2Loss` with the
            paper's settings.
        norm_layer / act_layer / attn_layer: default BatchNorm2d / LeakyReLU(0.1) / none; the trunk runs
            ``attn_layer``, as Darknet-19 and TinyDarknet do.
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, num_classes: int = 80, image_size: int = 416, width: float = 1.0, tiny: bool = False,
                 backbone: str | None = None, anchors: Sequence[Sequence[float]] | None = None,
                 loss: nn.Module | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None, **postprocess_kwargs):
        name = "yolov2_tiny" if tiny else "yolov2"
        loss = check_loss(loss, AnchorYoloLoss, "loss=yolov2 or loss=yolov3", name, YoloV2Loss)
        default_cells = _TINY_YOLO_VOC_ANCHORS if tiny else _YOLOV2_ANCHORS
        anchor_wh = anchors_for(anchors, [(w * STRIDE, h * STRIDE) for w, h in default_cells], image_size)

        trunk_kwargs = dict(width=width, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        # The paper trunk keeps its stride-32 stem at every size (the classifier's stem=auto shrinks it <= 64 px).
        paper_trunk = (partial(tiny_darknet_features, out_indices=(-1,), **trunk_kwargs) if tiny else
                       partial(create_model, "darknet19", features_only=True, out_indices=(-2, -1),
                               stem="standard", image_size=image_size, **trunk_kwargs))
        trunk = yolo_backbone(backbone, paper_trunk, 1 if tiny else 2, name, image_size, norm_layer=norm_layer,
                              act_layer=act_layer, attn_layer=attn_layer)

        act_layer = act_layer or leaky_relu
        head_chs = scale_width(_HEAD_CHS, width)
        if tiny:
            neck, head_in_chs = nn.Identity(), trunk.feature_info.channels()
        else:
            neck = PassthroughNeck(trunk.feature_info.channels(), head_chs, scale_width(_PASSTHROUGH_CHS, width),
                                   norm_layer, act_layer)
            head_in_chs = neck.out_channels
        head = AnchorHead(head_in_chs, [head_chs], len(anchor_wh), num_classes, norm_layer, act_layer)
        super().__init__(trunk, neck, head, anchor_wh, [range(len(anchor_wh))], loss,
                         DetectionPostprocess(**postprocess_kwargs))


@register_model(task="detection")
def yolov2(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
           norm_layer=None, act_layer=None, **kwargs) -> YOLOv2:
    """YOLOv2 (yolov2.cfg layout): Darknet-19 (or ``backbone``) + passthrough, 5 anchors."""
    return YOLOv2(num_classes, image_size, width, backbone=backbone, norm_layer=norm_layer, act_layer=act_layer,
                  **kwargs)


@register_model(task="detection")
def yolov2_tiny(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
                norm_layer=None, act_layer=None, **kwargs) -> YOLOv2:
    """YOLOv2-tiny (tiny-yolo-voc.cfg layout): TinyDarknet (or ``backbone``), 5 anchors."""
    return YOLOv2(num_classes, image_size, width, tiny=True, backbone=backbone, norm_layer=norm_layer,
                  act_layer=act_layer, **kwargs)
