"""YOLOv6's efficient decoupled head: per level a shared 1×1 stem, then separate 3×3 convs and 1×1 predictors for the
classes and the box, anchor-free (one prediction per cell).

References:
    Li et al. 2022, "YOLOv6: A Single-Stage Object Detection Framework for Industrial Applications" (§2.1: the
    efficient decoupled head, a hybrid-channel form of YOLOX's; §2.2: anchor-free, as FCOS).
    meituan/YOLOv6 0.3.0: ``yolov6/models/effidehead.py`` (``Detect``, ``build_effidehead_layer``,
    ``initialize_biases``).

Per level (``effidehead.py`` names): ``stem`` 1×1, ``cls_conv`` and ``reg_conv`` 3×3 (all ``C_l → C_l``
conv-BN-SiLU), ``cls_pred`` 1×1 to the C class logits, ``reg_pred`` 1×1 to the distances ``(l, t, r, b)`` from the
cell's centre to the box's sides, in strides (v3.0's N and S: ``reg_max=0``, no DFL distribution, the raw values are
the distances). Both predictors start with zero weights, the class biases at ``logit(0.01)`` and the box biases at 1
(a 2×2-stride box around every centre), as YOLOv6's ``initialize_biases``.

Layout of a raw output: per level ``Tensor[N, 4 + C, H, W]``, the distances then the class logits. Decoding is
:func:`~cvlab.ops.postprocess.decode_distance_boxes` at the cell centres of
:func:`~cvlab.ops.postprocess.grid_points`; the scores are the class sigmoids (there is no objectness).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory
from cvlab.models.backbones.yolov5 import silu, yolov5_batch_norm
from cvlab.ops.postprocess import decode_distance_boxes, flatten_levels, grid_points

CLASS_PRIOR = 0.01  # initialize_biases' prior_prob
BOX_DISTANCE_PRIOR = 1.0  # initialize_biases' reg_preds bias: one stride to every side


class ZeroStartConv(nn.Conv2d):
    """A biased 1×1 predictor that starts with zero weights and every bias at ``bias_value`` (YOLOv6's
    ``initialize_biases``), so every cell starts with the same prediction."""

    keeps_own_init = True  # cvlab.models.create_model and the init group re-apply reset_parameters()

    def __init__(self, in_chs: int, out_chs: int, bias_value: float):
        self.bias_value = bias_value
        super().__init__(in_chs, out_chs, 1)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.constant_(self.bias, self.bias_value)


class DecoupledLevel(nn.Module):
    """One level: ``Tensor[N, C_l, H, W] → Tensor[N, 4 + num_classes, H, W]`` (distances, then class logits)."""

    def __init__(self, chs: int, num_classes: int, norm_layer: NormFactory, act_layer: ActFactory):
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.stem = conv(chs, chs, 1)
        self.cls_conv, self.reg_conv = conv(chs, chs, 3), conv(chs, chs, 3)
        self.cls_pred = ZeroStartConv(chs, num_classes, math.log(CLASS_PRIOR / (1 - CLASS_PRIOR)))
        self.reg_pred = ZeroStartConv(chs, 4, BOX_DISTANCE_PRIOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.cat((self.reg_pred(self.reg_conv(x)), self.cls_pred(self.cls_conv(x))), 1)


class EfficientDecoupledHead(nn.Module):
    """One :class:`DecoupledLevel` per input level (finest first).

    Args:
        in_channels: channels of each level (the neck's ``out_channels``); each level keeps its width.
        norm_layer / act_layer: default YOLOv6's BatchNorm (eps 1e-3, momentum 0.03) / SiLU (its ``Conv``).

    ``forward(levels: list[Tensor[N, C_l, H_l, W_l]]) -> list[Tensor[N, 4 + C, H_l, W_l]]`` (the raw layout);
    :meth:`decode` turns those into boxes and class scores.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.levels = nn.ModuleList(DecoupledLevel(chs, num_classes, norm_layer or yolov5_batch_norm,
                                                   act_layer or silu) for chs in in_channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [predictor(features) for predictor, features in zip(self.levels, levels, strict=True)]

    @staticmethod
    def decode(raw: Sequence[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw levels → (boxes ``Tensor[N, P, 4]`` xyxy pixels, scores ``Tensor[N, P, C]`` class sigmoids) over the
        ``P`` cells of all levels."""
        points, strides = grid_points([tuple(level.shape[-2:]) for level in raw], image_size, raw[0].device,
                                      raw[0].dtype)
        dense = flatten_levels(list(raw))
        return decode_distance_boxes(dense[..., :4], points, strides), dense[..., 4:].sigmoid()
