"""Convolution building blocks shared by the CNNs: conv-norm-act, depthwise / pointwise / depthwise-separable
convolutions, and the two classifier heads a backbone can end with (global average pooling, or MobileFaceNet's
global depthwise convolution, GDC).

GDC (Chen et al. 2018, MobileFaceNet) replaces average pooling with a depthwise convolution whose kernel covers the
whole final feature map, so each spatial position gets its own learned weight. torchvision has no such head; it is
written here.

:meth:`ConvNormAct.fuse`, the fuse hook (:func:`cvlab.layers.rep.fuse_modules`, which `cvlab export`, `cvlab eval`
and `cvlab predict` of a detector run), folds a conv-norm-act's eval-mode BatchNorm into its conv
(``torch.nn.utils.fusion``): the deployed form of a CNN, one biased conv instead of conv → norm.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cvlab.layers.typing import ActFactory, NormFactory


class ConvNormAct(nn.Sequential):
    """Conv2d → norm → activation. ``groups=in_chs`` makes it depthwise.

    ``norm_layer=None`` means BatchNorm2d; pass ``nn.Identity``-returning factory for no norm.
    ``act_layer=None`` means no activation (a linear bottleneck, as in MobileNetV2's projection).
    ``padding=None`` keeps the size (at stride 1); ``padding=0`` is an unpadded ("valid") convolution.
    ``bias``: False (the default: a norm follows), True, or None for a bias exactly when the norm is the identity
    (mmcv's ``ConvModule(bias="auto")``), so a layout without norm keeps its paper's biases (UNet).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory | None = None,
        padding: int | None = None,
        bias: bool | None = False,
    ):
        norm_layer = norm_layer or nn.BatchNorm2d
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        norm = norm_layer(out_chs)
        if bias is None:
            bias = isinstance(norm, nn.Identity)
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=bias),
            norm,
            act_layer() if act_layer is not None else nn.Identity(),
        )
        self.out_chs = out_chs

    def fuse(self) -> bool:
        """The fuse hook: folds the BatchNorm into the conv, in place (eval mode: its running statistics become the
        conv's scale and bias), and returns whether it did; any other norm (or none, or one folded already) stays as
        it is, so a second call changes nothing."""
        conv, norm = self[0], self[1]
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.track_running_stats:
            return False
        if self.training:
            raise RuntimeError("a conv's BatchNorm folds with its running statistics: call eval() first")
        self[0], self[1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
        return True


def depthwise_conv(chs: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, **kw) -> ConvNormAct:
    """One filter per input channel (groups = channels)."""
    return ConvNormAct(chs, chs, kernel_size, stride, groups=chs, dilation=dilation, **kw)


def pointwise_conv(in_chs: int, out_chs: int, **kw) -> ConvNormAct:
    """1×1 convolution: mixes channels, no spatial extent."""
    return ConvNormAct(in_chs, out_chs, kernel_size=1, **kw)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise 3×3 then pointwise 1×1, each with norm and activation (MobileNetV1's block).

    Costs ``k²·C_in + C_in·C_out`` weights instead of ``k²·C_in·C_out``. ``attn_layer(C_in)``, when given, runs
    between the two (after the depthwise conv, where SE-style MobileNets put their attention).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer=None, act_layer=None, attn_layer=None):
        layers = [depthwise_conv(in_chs, 3, stride, norm_layer=norm_layer, act_layer=act_layer)]
        if attn_layer is not None:
            layers.append(attn_layer(in_chs))
        layers.append(pointwise_conv(in_chs, out_chs, norm_layer=norm_layer, act_layer=act_layer))
        super().__init__(*layers)


class GlobalDepthwiseConv(nn.Module):
    """MobileFaceNet's GDC: a depthwise conv with a kernel the size of the feature map → Tensor[N, C].

    The feature-map size must be known when the model is built (``feature_size``).
    """

    def __init__(self, chs: int, feature_size: int | tuple[int, int], norm_layer: NormFactory | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv = nn.Conv2d(chs, chs, feature_size, groups=chs, bias=False)
        self.norm = norm_layer(chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.norm(self.conv(x)), 1)


def make_global_pool(
    head: str, chs: int, feature_size: int | tuple[int, int] | None = None, norm_layer: NormFactory | None = None
) -> nn.Module:
    """Tensor[N, C, H, W] → Tensor[N, C] by global average pooling (``"gap"``) or GDC (``"gdc"``).

    Backbones that keep torchvision's module names (a top-level ``fc`` or ``classifier``) use this directly;
    the others use :class:`ClassifierHead`.
    """
    if head == "gap":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if head == "gdc":
        if feature_size is None:
            raise ValueError("head='gdc' needs the final feature-map size")
        return GlobalDepthwiseConv(chs, feature_size, norm_layer)
    raise ValueError(f"unknown head {head!r}; choose 'gap' or 'gdc'")


class ClassifierHead(nn.Module):
    """Pool a Tensor[N, C, H, W] to Tensor[N, C] (``head="gap"`` or ``"gdc"``), optional dropout, then a linear
    layer."""

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        head: str = "gap",
        feature_size: int | tuple[int, int] | None = None,
        drop_rate: float = 0.0,
        norm_layer: NormFactory | None = None,
    ):
        super().__init__()
        self.pool = make_global_pool(head, in_chs, feature_size, norm_layer)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x)))
