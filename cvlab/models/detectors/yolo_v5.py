"""YOLOv5 n / s / m / l / x (the v6.0+ architecture and loss).

Reference: Jocher et al., ultralytics/yolov5 v6.0 (2021; no paper): ``models/yolov5{n,s,m,l,x}.yaml``,
``models/common.py``, ``models/yolo.py`` (``Detect``), ``utils/loss.py``, ``data/hyps/hyp.scratch-low.yaml``.

YOLOv5 predicts at three scales (strides 8, 16, 32: P3, P4, P5) with 3 anchors each, YOLOv3's nine anchor shapes
for a 640 px input. Its parts:

- trunk: :class:`~cvlab.models.backbones.yolov5.CSPDarknetV5` (6×6 stem conv, C3 stages, SPPF; SiLU);
- neck: :class:`~cvlab.models.necks.yolov5_pan.YoloV5PAN` (top-down and bottom-up paths with C3 blocks);
- head: ``Detect``, one 1×1 conv per level (:class:`~cvlab.models.heads.anchor_head.AnchorHead` without its 3×3
  conv), decoding ``bx = (2σ(tx) − 0.5 + cx) · stride``, ``bw = pw · (2σ(tw))²``; its biases start as YOLOv5's
  (objectness ``log(8 / (640 / stride)²)``, 8 objects per 640 px image; classes ``log(0.6 / (C − 0.99999))``), its
  weights small (std 0.01) as every cvlab YOLO's;
- loss: :class:`~cvlab.losses.yolo.YoloV5Loss`: anchor-ratio matching (``anchor_t = 4``) in the centre's cell and its
  two nearest neighbours, CIoU boxes, objectness with the IoU as target and level balance 4 / 1 / 0.4.

The variants differ only in their width and depth multiples (``width`` and ``depth`` multiply them further). The
trunk and neck start with PyTorch's default init and YOLOv5's BatchNorm (eps 1e-3, momentum 0.03), as YOLOv5's
``initialize_weights`` leaves them. :meth:`YOLOv5.fuse` folds every BatchNorm into its conv (the detectors' fuse
hook, :meth:`~cvlab.models.detectors._yolo_common.YoloDetector.fuse`), the deployed form the published tables count.
``backbone=<zoo name>`` replaces the trunk.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

from torch import nn

from cvlab.layers.init import reset_to_pytorch_defaults
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import YoloV5Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.yolov5 import yolov5_depth, yolov5_features, yolov5_width
from cvlab.models.detectors._yolo_common import AnchorYolo, anchors_for, check_loss, yolo_backbone
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.models.necks.yolov5_pan import YoloV5PAN
from cvlab.ops.postprocess import DetectionPostprocess

# models/yolov5*.yaml's anchors, (w, h) in pixels of a 640 px input, P3 to P5 (YOLOv3's nine shapes).
_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
RELEASE_IMAGE_SIZE = 640
# Per variant: (depth_multiple, width_multiple) of models/yolov5{n,s,m,l,x}.yaml.
MULTIPLES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
_NECK_CHS = (256, 512, 1024)  # PAN outputs P3, P4, P5 at width multiple 1
_NECK_DEPTH = 3  # bottlenecks of each neck C3 at depth multiple 1
_NUM_LEVELS = 3
_PRIOR_OBJECTS = 8  # Detect's objectness bias: 8 objects per 640 px image


class YOLOv5(AnchorYolo):
    """YOLOv5: CSP-Darknet trunk with C3 and SPPF, PAN neck, 3 scales with 3 anchors each.

    Measured by cvlab at 640 px and 80 classes; parameters fused (:meth:`fuse`: BatchNorm folded into the convs, as
    YOLOv5's model summaries count them after "Fusing layers"); FLOPs = 2 · multiply-adds of the convs
    (``torch.utils.flop_counter``, the same fused or not):

    ========  ===========  ===========  ========  =============================================
    variant   params       fused        FLOPs     published: README (M, G at 640); fused summary
    ========  ===========  ===========  ========  =============================================
    yolov5n   1,872,157    1,867,405    4.47 G    1.9 M, 4.5 G; 1,867,405 params, 4.5 G
    yolov5s   7,235,389    7,225,885    16.43 G   7.2 M, 16.5 G; 7,225,885 params, 16.4 G
    yolov5m   21,190,557   21,172,173   48.87 G   21.2 M, 49.0 G; 21,172,173 params, 48.9 G
    yolov5l   46,563,709   46,533,693   108.99 G  46.5 M, 109.1 G; 46,533,693 params, 109.0 G
    yolov5x   86,749,405   86,705,005   205.45 G  86.7 M, 205.7 G; 86,705,005 params, 205.5 G
    ========  ===========  ===========  ========  =============================================

    The README's FLOPs add one multiply-add per BatchNorm output element to the convs' (thop counting the unfused
    BatchNorms, or the fused convs' biases): 4.49 / 16.48 / 48.96 / 109.14 / 205.66 G, which round to them.

    Args:
        depth_multiple / width_multiple: the variant's (:data:`MULTIPLES`).
        image_size: the training input size (a multiple of 32); it scales the default anchors from 640 px.
        width / depth: further multipliers of the variant's multiples (1.0 = the published variant).
        backbone: None for YOLOv5's trunk, or the name of a zoo classification backbone (its last three stages).
        anchors: list of (w, h) in pixels at ``image_size`` (a multiple of 3; sorted by area, the smallest go to
            the finest scale). Default: YOLOv5's rescaled from 640 px to ``image_size``.
        loss: a :class:`~cvlab.losses.yolo.YoloV5Loss`; None = YOLOv5's settings.
        norm_layer / act_layer / attn_layer: default YOLOv5's BatchNorm / SiLU / none (the trunk's bottlenecks run
            ``attn_layer``).
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, depth_multiple: float, width_multiple: float, num_classes: int = 80, image_size: int = 640,
                 width: float = 1.0, depth: float = 1.0, backbone: str | None = None,
                 anchors: Sequence[Sequence[float]] | None = None, loss: nn.Module | None = None,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None, name: str = "yolov5", **postprocess_kwargs):
        loss = check_loss(loss, YoloV5Loss, "loss=yolov5", name, YoloV5Loss)
        anchor_wh = anchors_for(anchors, _ANCHORS, image_size, RELEASE_IMAGE_SIZE)
        if len(anchor_wh) % _NUM_LEVELS:
            raise ValueError(f"{len(anchor_wh)} anchors cannot be split evenly over {_NUM_LEVELS} scales")
        anchor_wh = anchor_wh[anchor_wh.prod(dim=1).argsort()]
        per_level = len(anchor_wh) // _NUM_LEVELS
        masks = [range(level * per_level, (level + 1) * per_level) for level in range(_NUM_LEVELS)]  # P3 first

        width_multiple, depth_multiple = width_multiple * width, depth_multiple * depth
        layer_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        paper_trunk = partial(yolov5_features, out_indices=(-3, -2, -1), width_multiple=width_multiple,
                              depth_multiple=depth_multiple, **layer_kwargs)
        trunk = yolo_backbone(backbone, paper_trunk, _NUM_LEVELS, name, image_size, **layer_kwargs)
        neck = YoloV5PAN(trunk.feature_info.channels(), [yolov5_width(chs, width_multiple) for chs in _NECK_CHS],
                         yolov5_depth(_NECK_DEPTH, depth_multiple), norm_layer, act_layer)
        objectness_biases = [math.log(_PRIOR_OBJECTS * (stride / RELEASE_IMAGE_SIZE) ** 2)
                             for stride in trunk.feature_info.reductions()]
        head = AnchorHead(neck.out_channels, None, per_level, num_classes, objectness_biases=objectness_biases,
                          class_bias=math.log(0.6 / (num_classes - 0.99999)), **loss.BOX_DECODING)
        super().__init__(trunk, neck, head, anchor_wh, masks, loss, DetectionPostprocess(**postprocess_kwargs))
        for part in (neck, head):  # AnchorYolo starts them with Darknet's init; YOLOv5 keeps PyTorch's
            reset_to_pytorch_defaults(part)


def _yolov5(variant: str, **kwargs) -> YOLOv5:
    depth_multiple, width_multiple = MULTIPLES[variant]
    return YOLOv5(depth_multiple, width_multiple, name=f"yolov5{variant}", **kwargs)


@register_model(task="detection")
def yolov5n(**kwargs) -> YOLOv5:
    """YOLOv5n (depth 0.33, width 0.25)."""
    return _yolov5("n", **kwargs)


@register_model(task="detection")
def yolov5s(**kwargs) -> YOLOv5:
    """YOLOv5s (depth 0.33, width 0.50)."""
    return _yolov5("s", **kwargs)


@register_model(task="detection")
def yolov5m(**kwargs) -> YOLOv5:
    """YOLOv5m (depth 0.67, width 0.75)."""
    return _yolov5("m", **kwargs)


@register_model(task="detection")
def yolov5l(**kwargs) -> YOLOv5:
    """YOLOv5l (depth 1.0, width 1.0)."""
    return _yolov5("l", **kwargs)


@register_model(task="detection")
def yolov5x(**kwargs) -> YOLOv5:
    """YOLOv5x (depth 1.33, width 1.25)."""
    return _yolov5("x", **kwargs)
