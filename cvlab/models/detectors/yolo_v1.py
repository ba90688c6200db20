"""YOLOv1 and Fast YOLO.

Paper: Redmon, Divvala, Girshick & Farhadi 2016, "You Only Look Once: Unified, Real-Time Object Detection".

The image is divided into an S×S grid (S = 7 at 448 px); each cell predicts B = 2 boxes ``(x, y, √w, √h, C)`` and
one class distribution, all as one linear output of the last fully connected layer, trained with the sum-squared
loss of :class:`~cvlab.losses.yolo.YoloV1Loss`. The network (paper Figure 3) is 24 convolutional layers — 1×1
reductions followed by 3×3 convs, four 2×2 max-pools and a stride-2 conv, total stride 64 — then FC 4096 with
dropout 0.5 and FC S·S·(5B + C). Every layer but the last uses LeakyReLU(0.1).

Fast YOLO is the paper's 9-layer variant; its layout here is the released ``yolov1-tiny.cfg``: eight 3×3 convs
(16 … 1024, 256), six 2×2 max-pools, and one FC straight to the predictions (the paper counts 9 layers).

The paper used no normalisation, so by default the convs have biases and no norm; ``norm_layer`` (e.g.
``BatchNorm2d``, as the later released cfgs do) adds a norm after every conv, which then drops its bias.
"""
from __future__ import annotations

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import YoloV1Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import init_darknet_weights, leaky_relu, scale_width
from cvlab.models.detectors._yolo_common import YoloDetector, check_loss
from cvlab.ops.postprocess import DetectionPostprocess, decode_cell_boxes

# Trunks as (out_chs, kernel, stride) convs and "M" for a 2×2 max-pool.
_YOLOV1_TRUNK = (
    (64, 7, 2), "M", (192, 3, 1), "M",
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
    *((256, 1, 1), (512, 3, 1)) * 4, (512, 1, 1), (1024, 3, 1), "M",
    *((512, 1, 1), (1024, 3, 1)) * 2, (1024, 3, 1), (1024, 3, 2),
    (1024, 3, 1), (1024, 3, 1),
)
_FAST_YOLO_TRUNK = (
    (16, 3, 1), "M", (32, 3, 1), "M", (64, 3, 1), "M", (128, 3, 1), "M", (256, 3, 1), "M", (512, 3, 1), "M",
    (1024, 3, 1), (256, 3, 1),
)
_OUTPUT_STRIDE = 64


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int, norm_layer: NormFactory | None,
          act_layer: ActFactory) -> nn.Module:
    if norm_layer is not None:
        return ConvNormAct(in_chs, out_chs, kernel, stride, norm_layer=norm_layer, act_layer=act_layer)
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2), act_layer())


def _make_trunk(layout, width: float, norm_layer: NormFactory | None, act_layer: ActFactory,
                attn_layer: AttnFactory | None) -> tuple[nn.Sequential, int]:
    """Build a trunk from its layout; ``attn_layer`` runs before every max-pool. Returns (trunk, out channels)."""
    layers: list[nn.Module] = []
    in_chs = 3
    for spec in layout:
        if spec == "M":
            if attn_layer is not None:
                layers.append(attn_layer(in_chs))
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out_chs, kernel, stride = spec
            out_chs = scale_width(out_chs, width)
            layers.append(_conv(in_chs, out_chs, kernel, stride, norm_layer, act_layer))
            in_chs = out_chs
    return nn.Sequential(*layers), in_chs


class YOLOv1(YoloDetector):
    """YOLOv1 / Fast YOLO: conv trunk (stride 64) → flatten → [FC hidden → LeakyReLU → dropout] → FC S·S·(5B + C).

    Measured by cvlab at 448 px, S = 7, B = 2, default (no) norm; FLOPs = 2 · multiply-adds
    (``torch.utils.flop_counter``). The paper gives no parameter count; these are the paper's layers exactly.

    ===========  ==============  ==============  ==============  ===========  ======================
    variant      layers          params @20 cls  params @80 cls  FLOPs @20    paper
    ===========  ==============  ==============  ==============  ===========  ======================
    yolov1       24 conv + 2 FC  271,703,550     283,748,730     40.57 G      24 conv + 2 FC, 45 fps
    yolov1_tiny  8 conv + 1 FC   27,093,086      63,975,386      3.22 G       "Fast YOLO", 155 fps
    ===========  ==============  ==============  ==============  ===========  ======================

    Args:
        layout: the trunk, as (out_chs, kernel, stride) convs and ``"M"`` pools (total stride 64).
        hidden_features: width of the first FC layer (4096 in YOLOv1, scaled by ``width``); None for Fast YOLO's
            single FC layer.
        image_size: input size, a multiple of 64; the grid is S = image_size / 64. The FC layers fix the input size.
        num_boxes: B, the boxes predicted per cell.
        loss: a :class:`~cvlab.losses.yolo.YoloV1Loss`; None = its paper settings (λcoord 5, λnoobj 0.5).
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).

    Raw outputs (``forward_raw``): boxes ``Tensor[N, S, S, B, 5]`` as (x, y, √w, √h, C) and class scores
    ``Tensor[N, S, S, C]``; eval scores are ``C · p(class)`` (linear outputs, as trained).
    """

    def __init__(self, layout=_YOLOV1_TRUNK, hidden_features: int | None = 4096, num_classes: int = 80,
                 image_size: int = 448, width: float = 1.0, num_boxes: int = 2, drop_rate: float = 0.5,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None, loss: nn.Module | None = None, **postprocess_kwargs):
        super().__init__(DetectionPostprocess(**postprocess_kwargs))
        if image_size % _OUTPUT_STRIDE:
            raise ValueError(f"YOLOv1 needs image_size to be a multiple of {_OUTPUT_STRIDE}, got {image_size}")
        self.loss = check_loss(loss, YoloV1Loss, "loss=yolov1", "YOLOv1", YoloV1Loss)
        act_layer = act_layer or leaky_relu
        self.grid_size = image_size // _OUTPUT_STRIDE
        self.image_size = image_size
        self.num_boxes = num_boxes
        self.num_classes = num_classes
        self.trunk, trunk_chs = _make_trunk(layout, width, norm_layer, act_layer, attn_layer)

        num_outputs = self.grid_size**2 * (5 * num_boxes + num_classes)
        in_features = trunk_chs * self.grid_size**2
        fc_layers: list[nn.Module] = [nn.Flatten(1)]
        if hidden_features is not None:
            hidden_features = scale_width(hidden_features, width)
            fc_layers += [nn.Linear(in_features, hidden_features), act_layer(), nn.Dropout(drop_rate)]
            in_features = hidden_features
        fc_layers.append(nn.Linear(in_features, num_outputs))
        self.head = nn.Sequential(*fc_layers)
        init_darknet_weights(self)

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor[N, 3, image_size, image_size] → (boxes Tensor[N, S, S, B, 5], class scores Tensor[N, S, S, C])."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"YOLOv1's FC layers fix its input to {self.image_size}×{self.image_size}, "
                             f"got {tuple(images.shape[-2:])}")
        grid = self.grid_size
        out = self.head(self.trunk(images)).view(-1, grid, grid, 5 * self.num_boxes + self.num_classes)
        boxes = out[..., : 5 * self.num_boxes].reshape(-1, grid, grid, self.num_boxes, 5)
        return boxes, out[..., 5 * self.num_boxes:]

    def compute_loss(self, raw, targets: list[dict], image_size: tuple[int, int]):
        return self.loss(*raw, targets, image_size)

    def decode(self, raw, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        box_pred, class_pred = raw
        batch = box_pred.shape[0]
        boxes = decode_cell_boxes(box_pred[..., :4], image_size).reshape(batch, -1, 4)
        scores = box_pred[..., 4:5] * class_pred[..., None, :]  # Tensor[N, S, S, B, C]
        return boxes, scores.reshape(batch, -1, self.num_classes)


def _yolov1(layout, hidden_features: int | None, num_classes: int, image_size: int, width: float,
            norm_layer: NormFactory | None, act_layer: ActFactory | None, **kwargs) -> YOLOv1:
    return YOLOv1(layout, hidden_features, num_classes, image_size, width, norm_layer=norm_layer, act_layer=act_layer,
                  **kwargs)


@register_model(task="detection")
def yolov1(num_classes: int = 80, image_size: int = 448, width: float = 1.0, norm_layer=None, act_layer=None,
           **kwargs) -> YOLOv1:
    """YOLOv1: 24 conv + FC 4096 + FC S·S·(5B + C); S = image_size / 64."""
    return _yolov1(_YOLOV1_TRUNK, 4096, num_classes, image_size, width, norm_layer, act_layer, **kwargs)


@register_model(task="detection")
def yolov1_tiny(num_classes: int = 80, image_size: int = 448, width: float = 1.0, norm_layer=None, act_layer=None,
                **kwargs) -> YOLOv1:
    """Fast YOLO (released yolov1-tiny.cfg): 8 conv + one FC."""
    return _yolov1(_FAST_YOLO_TRUNK, None, num_classes, image_size, width, norm_layer, act_layer, **kwargs)
