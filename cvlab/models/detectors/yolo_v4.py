"""YOLOv4 and YOLOv4-tiny.

Paper: Bochkovskiy, Wang & Liao 2020, "YOLOv4: Optimal Speed and Accuracy of Object Detection"; YOLOv4-tiny:
Wang, Bochkovskiy & Liao 2021, "Scaled-YOLOv4: Scaling Cross Stage Partial Network" (§4.1).

YOLOv4 is CSPDarknet53 with Mish (:class:`~cvlab.models.backbones.cspdarknet.CSPDarknet`), an SPP block and a PANet
neck (:class:`~cvlab.models.necks.pan.ConvSetPAN`) and YOLOv3's heads
(:class:`~cvlab.models.heads.anchor_head.AnchorHead`): three scales (strides 8, 16, 32), three of the nine anchors
each, logistic objectness and classes. Layout as the released ``yolov4.cfg``: neck and heads use LeakyReLU(0.1),
the trunk Mish; the heads' 3×3 convs have 256, 512, 1024 channels.

Its "bag of freebies", each an option:

- grid sensitivity, ``xy_scales`` (the cfg's ``scale_x_y``: 1.2, 1.1, 1.05 from the finest scale): the centre
  offset is ``s · σ(t) − (s − 1) / 2`` in training and at eval;
- CIoU box loss, several anchors per truth (``iou_thresh=0.213``) and ``ignore_thresh=0.7``:
  :class:`~cvlab.losses.yolo.YoloV4Loss` (``loss=yolov4 loss.box_loss=mse loss.iou_thresh=1`` turns them off),
  which also has class label smoothing (``loss.label_smoothing``; not in the cfg);
- DropBlock in the neck (``dropblock``, ``dropblock_size``; not in the released cfg, so 0);
- Mosaic is data augmentation: ``data.mosaic=1`` (yolov4.cfg's ``mosaic=1``; the model config cannot set it).

YOLOv4-tiny is the released ``yolov4-tiny.cfg``: the :class:`~cvlab.models.backbones.cspdarknet.TinyCSPDarknet`
trunk and YOLOv3-tiny's neck and heads (:class:`~cvlab.models.necks.yolo_fpn.YoloV3FPN`), two scales (strides 32,
16), LeakyReLU throughout; ``scale_x_y=1.05`` on both, CIoU, ``ignore_thresh=.7``, no ``iou_thresh`` and no mosaic.
Its masks are the released file's: anchors 3, 4, 5 on the coarse scale and 1, 2, 3 on the fine one (anchor 0 is
unused and anchor 3 shared); an object whose best anchor is 0 goes to the best of the anchors in use here, where
Darknet gives it to none. Anchors given by the user (``anchors=auto``) are split evenly, largest to the coarsest.

Anchors are pixels at the input size: yolov4.cfg's are YOLOv3's scaled to the 512 px input the paper trained at
(12 ≈ 10 · 512 / 416, …), so they are rescaled from 512 px; yolov4-tiny.cfg's are YOLOv3-tiny's, for 416 px.
``backbone=<zoo name>`` replaces the trunk as for YOLOv3.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import AnchorYoloLoss, YoloV4Loss
from cvlab.models._registry import create_model, register_model
from cvlab.models.backbones.cspdarknet import TinyCSPDarknet
from cvlab.models.backbones.darknet import leaky_relu, scale_width
from cvlab.models.detectors._yolo_common import AnchorYolo, anchors_for, check_loss, yolo_backbone
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.models.necks.pan import ConvSetPAN
from cvlab.models.necks.yolo_fpn import YoloV3FPN
from cvlab.ops.postprocess import DetectionPostprocess

# Released anchors, (w, h) in pixels, smallest first: yolov4.cfg's for 512 px, yolov4-tiny.cfg's for 416 px.
_YOLOV4_ANCHORS = ((12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401))
_YOLOV4_ANCHOR_SIZE = 512
_YOLOV4_TINY_ANCHORS = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
_YOLOV4_TINY_ANCHOR_SIZE = 416
# yolov4-tiny.cfg's masks, coarse to fine as its neck's outputs.
_TINY_MASKS = ((3, 4, 5), (1, 2, 3))
# Per scale, in the neck's output order (YOLOv4: fine to coarse; tiny: coarse to fine): scale_x_y, the conv sets'
# 1×1 width, the head's 3×3 width.
_XY_SCALES, _TINY_XY_SCALES = (1.2, 1.1, 1.05), (1.05, 1.05)
_LEVEL_CHS, _HIDDEN_CHS = (128, 256, 512), (256, 512, 1024)
# The tiny neck is YOLOv3-tiny's: one 1×1 conv (256) at the coarse scale, none at the fine one.
_TINY_LEVEL_CHS, _TINY_DEPTHS, _TINY_HIDDEN_CHS = (256, 128), (1, 0), (512, 256)


def _even_masks(num_anchors: int, num_levels: int, finest_first: bool) -> list[range]:
    """Anchors sorted by area split evenly over the levels, the largest on the coarsest, in output-level order."""
    if num_anchors % num_levels:
        raise ValueError(f"{num_anchors} anchors cannot be split evenly over {num_levels} scales")
    per_level = num_anchors // num_levels
    order = range(num_levels) if finest_first else reversed(range(num_levels))
    return [range(level * per_level, (level + 1) * per_level) for level in order]


class YOLOv4(AnchorYolo):
    """YOLOv4 / YOLOv4-tiny: 3 (tiny: 2) scales, 3 anchors each, logistic objectness and classes, CIoU.

    Measured by cvlab at 416 px and 80 classes (FLOPs = 2 · multiply-adds, ``torch.utils.flop_counter``):

    ===========  ===========  ==========  ======================================================================
    variant      params       FLOPs       reference
    ===========  ===========  ==========  ======================================================================
    yolov4       64,363,101   60.10 G     yolov4.cfg: 64,363,101 trainable (64,429,405 with BN mean / var);
                                          Darknet: 60.1 BFlops at 416 px
    yolov4_tiny  6,056,606    6.91 G      yolov4-tiny.cfg: 6,056,606 trainable (6,062,814 with BN mean / var);
                                          Darknet: 6.9 BFlops
    ===========  ===========  ==========  ======================================================================

    Args:
        tiny: build YOLOv4-tiny.
        image_size: the training input size (a multiple of 32); it scales the default anchors.
        width: channel multiplier of the paper trunk, the neck and the head.
        backbone: None for the paper's trunk (CSPDarknet53; tiny: TinyCSPDarknet), or the name of a zoo
            classification backbone, as for :class:`~cvlab.models.detectors.yolo_v3.YOLOv3`.
        anchors: list of (w, h) in pixels at ``image_size``, a multiple of the number of scales; sorted by area, the
            largest go to the coarsest scale. Default: the released cfg's, rescaled to ``image_size``.
        xy_scales: grid sensitivity per scale, finest first (None: the cfg's; 1 everywhere turns it off).
        dropblock / dropblock_size: DropBlock probability (0: off, as the cfgs) and block size in YOLOv4's neck
            (:class:`~cvlab.models.necks.pan.ConvSetPAN`); YOLOv4-tiny has no conv set to put it in.
        loss: an :class:`~cvlab.losses.yolo.AnchorYoloLoss`; None = :class:`~cvlab.losses.yolo.YoloV4Loss` with the
            cfg's settings (tiny: without ``iou_thresh``).
        norm_layer / act_layer / attn_layer: default BatchNorm2d / Mish in the trunk and LeakyReLU(0.1) after it
            (tiny: LeakyReLU throughout) / none; a given activation replaces every one.
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, num_classes: int = 80, image_size: int = 416, width: float = 1.0, tiny: bool = False,
                 backbone: str | None = None, anchors: Sequence[Sequence[float]] | None = None,
                 xy_scales: Sequence[float] | None = None, dropblock: float = 0.0, dropblock_size: int = 3,
                 loss: nn.Module | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None, **postprocess_kwargs):
        name = "yolov4_tiny" if tiny else "yolov4"
        default_loss = partial(YoloV4Loss, iou_thresh=1.0) if tiny else YoloV4Loss
        loss = check_loss(loss, AnchorYoloLoss, "loss=yolov4 or loss=yolov3", name, default_loss)
        num_levels = 2 if tiny else 3
        if tiny and dropblock > 0:
            raise ValueError("yolov4_tiny has no neck conv sets to put DropBlock in; use dropblock with yolov4")
        anchor_wh = (anchors_for(anchors, _YOLOV4_TINY_ANCHORS, image_size, _YOLOV4_TINY_ANCHOR_SIZE) if tiny else
                     anchors_for(anchors, _YOLOV4_ANCHORS, image_size, _YOLOV4_ANCHOR_SIZE))
        anchor_wh = anchor_wh[anchor_wh.prod(dim=1).argsort()]
        masks = (_TINY_MASKS if tiny and anchors is None else
                 _even_masks(len(anchor_wh), num_levels, finest_first=not tiny))

        trunk_kwargs = dict(width=width, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        # CSPDarknet53's C3, C4, C5, with its stride-32 stem at every size (stem=auto shrinks it <= 64 px).
        paper_trunk = (partial(TinyCSPDarknet, **trunk_kwargs) if tiny else
                       partial(create_model, "cspdarknet53", features_only=True, out_indices=(-3, -2, -1),
                               stem="standard", image_size=image_size, **trunk_kwargs))
        trunk = yolo_backbone(backbone, paper_trunk, num_levels, name, image_size, norm_layer=norm_layer,
                              act_layer=act_layer, attn_layer=attn_layer)

        act_layer = act_layer or leaky_relu
        if tiny:
            neck = YoloV3FPN(trunk.feature_info.channels(), [scale_width(chs, width) for chs in _TINY_LEVEL_CHS],
                             _TINY_DEPTHS, norm_layer, act_layer)
        else:
            neck = ConvSetPAN(trunk.feature_info.channels(), [scale_width(chs, width) for chs in _LEVEL_CHS],
                              dropblock=dropblock, dropblock_size=dropblock_size, norm_layer=norm_layer,
                              act_layer=act_layer)
        hidden_chs = [scale_width(chs, width) for chs in (_TINY_HIDDEN_CHS if tiny else _HIDDEN_CHS)]
        xy_scales = [float(s) for s in xy_scales] if xy_scales is not None else (
            _TINY_XY_SCALES if tiny else _XY_SCALES)
        head = AnchorHead(neck.out_channels, hidden_chs, len(masks[0]), num_classes, norm_layer, act_layer,
                          xy_scale=list(xy_scales))
        super().__init__(trunk, neck, head, anchor_wh, masks, loss, DetectionPostprocess(**postprocess_kwargs))


@register_model(task="detection")
def yolov4(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
           norm_layer=None, act_layer=None, **kwargs) -> YOLOv4:
    """YOLOv4 (yolov4.cfg layout): CSPDarknet53 (or ``backbone``), SPP + PANet, 3 scales, 9 anchors."""
    return YOLOv4(num_classes, image_size, width, backbone=backbone, norm_layer=norm_layer, act_layer=act_layer,
                  **kwargs)


@register_model(task="detection")
def yolov4_tiny(num_classes: int = 80, image_size: int = 416, width: float = 1.0, backbone: str | None = None,
                norm_layer=None, act_layer=None, **kwargs) -> YOLOv4:
    """YOLOv4-tiny (yolov4-tiny.cfg layout): TinyCSPDarknet (or ``backbone``), 2 scales, 6 anchors."""
    return YOLOv4(num_classes, image_size, width, tiny=True, backbone=backbone, norm_layer=norm_layer,
                  act_layer=act_layer, **kwargs)
