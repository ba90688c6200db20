"""Segmentation heads shared by the segmentors: the per-pixel classifier and the FCN head.

Papers:
    Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation" (a conv head on a
    feature map, classifying every position with a 1×1 convolution).

The layout is MMSegmentation's (``FCNHead`` with ``num_convs=1, concat_input=False``, and the ``cls_seg`` of every
decode head: ``Dropout2d`` then a biased 1×1 conv), which BiSeNet V1 uses for its decode and auxiliary heads and
DANet for its auxiliary head, so their parameter counts can be compared with MMSegmentation's configs. Every head
returns logits at its input's resolution; the segmentor resizes them to the image
(:class:`~cvlab.models.segmentors.Segmentor`).
"""
from __future__ import annotations

from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.backbones.resnet import init_conv_norm_

# MMSegmentation's decode heads drop whole channels with p = 0.1 before the classifier (dropout_ratio=0.1).
HEAD_DROPOUT = 0.1
# MMSegmentation starts every classifier (cls_seg) at N(0, 0.01²), bias 0.
CLASSIFIER_INIT_STD = 0.01


class SegmentationClassifier(nn.Sequential):
    """``Dropout2d(dropout)`` (none at 0) → biased 1×1 conv to the class logits.
    ``Tensor[N, C, H, W] → Tensor[N, num_classes, H, W]``; ``C·num_classes + num_classes`` parameters."""

    def __init__(self, in_chs: int, num_classes: int, dropout: float = HEAD_DROPOUT):
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(in_chs, num_classes, 1))

    @property
    def conv(self) -> nn.Conv2d:
        return self[-1]


class FCNHead(nn.Sequential):
    """3×3 conv-norm-act ``in_chs → hidden_chs``, then the :class:`SegmentationClassifier`.
    ``Tensor[N, in_chs, H, W] → Tensor[N, num_classes, H, W]``.

    At 19 classes: BiSeNet's decode head (256 → 256) has 595,219 parameters, its auxiliary heads (128 → 64) 75,091
    each, DANet's auxiliary head (1024 → 256) 2,364,691.
    """

    def __init__(self, in_chs: int, hidden_chs: int, num_classes: int, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, dropout: float = HEAD_DROPOUT):
        super().__init__(
            ConvNormAct(in_chs, hidden_chs, 3, norm_layer=norm_layer, act_layer=act_layer or nn.ReLU, bias=None),
            SegmentationClassifier(hidden_chs, num_classes, dropout),
        )


def init_decode_head_(module: nn.Module) -> None:
    """MMSegmentation's init of everything but the backbone: convs Kaiming-normal (fan_out, ReLU gain, mmcv's
    ``ConvModule``), norms weight 1 / bias 0, then every classifier conv N(0, 0.01²) with bias 0."""
    init_conv_norm_(module)
    for classifier in module.modules():
        if isinstance(classifier, SegmentationClassifier):
            nn.init.normal_(classifier.conv.weight, std=CLASSIFIER_INIT_STD)
            nn.init.zeros_(classifier.conv.bias)
