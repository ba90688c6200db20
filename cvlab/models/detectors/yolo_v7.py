"""YOLOv7 and YOLOv7-tiny.

Paper: Wang, Bochkovskiy & Liao 2022, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time
object detectors" (CVPR 2023). Reference: WongKinYiu/yolov7 ``cfg/training/yolov7.yaml``, ``yolov7-tiny.yaml``,
``cfg/deploy/*.yaml``, ``models/common.py`` (``RepConv``, ``ImplicitA`` / ``ImplicitM``), ``models/yolo.py``
(``IDetect``, ``IAuxDetect``, ``fuse``), ``utils/loss.py`` (``ComputeLossOTA``, ``ComputeLossAuxOTA``),
``data/hyp.scratch.p5.yaml`` / ``hyp.scratch.tiny.yaml``.

YOLOv7 predicts at three scales (strides 8, 16, 32) with 3 anchors each. Its parts:

- trunk: :class:`~cvlab.models.backbones.elan.ELANNet` (ELAN blocks, MP down-sampling; SiLU, tiny LeakyReLU(0.1));
- neck: :class:`~cvlab.models.necks.yolov7_pan.ELANPAN` (SPPCSPC, then a PAN of ELAN joins);
- head: ``IDetect`` (:class:`IDetectHead`): per level a 3×3 block that doubles the width (yolov7: RepConv,
  :class:`~cvlab.layers.rep.RepVGGBlock`, ``rep_conv``; tiny: a conv), then the *implicit knowledge* of YOLOR
  (Wang, Yeh & Liao 2021, "You Only Learn One Representation"): a learned per-channel offset added to the output
  conv's input (:class:`ImplicitAdd`, ``ImplicitA``) and a learned per-channel scale of its output
  (:class:`ImplicitMul`, ``ImplicitM``), both trained without weight decay (:meth:`YOLOv7.no_weight_decay`);
  ``implicit=False`` is the plain ``Detect``. Boxes decode as YOLOv5's (``2σ(t) − 0.5`` in the cell,
  ``pw · (2σ(tw))²``); the output biases start as YOLOv7's (objectness ``log(8 / (640 / stride)²)``, classes
  ``log(0.6 / (C − 0.99))``), its weights small (std 0.01);
- loss: :class:`~cvlab.losses.yolo.YoloV7Loss`, YOLOv5's terms on SimOTA-style dynamic-k positives.

``aux_head=True`` adds the auxiliary head of YOLOv7's P6 training cfgs (``IAuxDetect``, yolov7-w6.yaml): per level
a 3×3 conv 1.25× as wide as the lead's and an output conv, fed from the neck's top-down path (the SPPCSPC output at
the coarsest level), trained with the lead-guided assignment of ``ComputeLossAuxOTA`` at a quarter of the lead's
weight. It runs in training only and is dropped from the deployed form, as the deploy cfgs have none.

:meth:`YOLOv7.fuse` gives the deploy form (``cfg/deploy``, ``reparameterization.ipynb``): RepConv re-parameterised
into one 3×3 conv, the implicit layers folded into the output convs (``IDetect.fuse``: ``W(x + a) + b =
Wx + (Wa + b)``, then ``m ⊙ (Wx + b') = (m ⊙ W)x + m ⊙ b'``), every BatchNorm folded into its conv and the auxiliary
head removed; its outputs equal the training form's eval outputs up to float rounding. Anchors are pixels at the
input size: the cfgs' (yolov7: YOLOv4's; tiny: YOLOv5's) keep their sizes at every ``image_size``, as the
reference's do (SimOTA's dynamic k needs anchors at least as large as their cells; see ``YOLOv7.__init__``).
``backbone=<zoo name>`` replaces the trunk.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.init import reset_to_pytorch_defaults
from cvlab.layers.rep import RepVGGBlock
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.losses.yolo import YoloV5Loss, YoloV7Loss
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import leaky_relu
from cvlab.models.backbones.elan import elan_features
from cvlab.models.backbones.yolov5 import silu, yolov5_batch_norm, yolov5_width
from cvlab.models.detectors._yolo_common import AnchorYolo, anchors_for, check_loss, yolo_backbone
from cvlab.models.heads.anchor_head import AnchorHead, AnchorOutputConv
from cvlab.models.necks.yolov7_pan import ELANPAN
from cvlab.ops.postprocess import DetectionPostprocess
from cvlab.utils.errors import UserError

# The cfgs' anchors, (w, h) in pixels (at any input size), P3 to P5.
_ANCHORS = {
    "yolov7": ((12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401)),
    "yolov7_tiny": ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)),
}
RELEASE_IMAGE_SIZE = 640
_NECK_CHS = {"yolov7": (128, 256, 512), "yolov7_tiny": (64, 128, 256)}  # P3, P4, P5 at width 1
_HEAD_EXPANSION = 2  # the lead head's 3×3 block doubles the neck's width (RepConv 256 / 512 / 1024)
_AUX_EXPANSION = 1.25  # yolov7-w6.yaml's auxiliary 3×3 convs: 320 / 640 / 960 / 1280 beside the lead's 256 … 1024
_NUM_LEVELS = 3
_PRIOR_OBJECTS = 8  # the objectness bias: 8 objects per 640 px image


class Implicit(nn.Module):
    """YOLOR's implicit knowledge: a learned ``Tensor[1, C, 1, 1]``, started at N(``mean``, 0.02²), that the
    subclasses add to their input or multiply it by."""

    keeps_own_init = True  # cvlab.models.create_model and the init group re-apply reset_parameters()
    mean = 0.0

    def __init__(self, chs: int):
        super().__init__()
        self.implicit = nn.Parameter(torch.empty(1, chs, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.implicit, mean=self.mean, std=0.02)


class ImplicitAdd(Implicit):
    """``ImplicitA``: ``x + a``, ``a`` started at N(0, 0.02²)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.implicit


class ImplicitMul(Implicit):
    """``ImplicitM``: ``m ⊙ x``, ``m`` started at N(1, 0.02²)."""

    mean = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.implicit


class ImplicitPredictor(nn.Sequential):
    """One IDetect level: ``implicit_mul(output(implicit_add(hidden(x))))``. ``Tensor[N, in_chs, H, W] →
    Tensor[N, A·(5 + C), H, W]``; without ``implicit`` (``Detect``) the two implicit layers are identities.
    :meth:`fuse` folds them into ``output``."""

    def __init__(self, hidden: nn.Module, output: AnchorOutputConv, implicit: bool = True):
        super().__init__(OrderedDict(
            hidden=hidden,
            implicit_add=ImplicitAdd(output.in_channels) if implicit else nn.Identity(),
            output=output,
            implicit_mul=ImplicitMul(output.out_channels) if implicit else nn.Identity()))

    @torch.no_grad()
    def fuse(self) -> None:
        """Folds the implicit layers into the output conv, in place (IDetect.fuse); idempotent."""
        conv = self.output
        if isinstance(self.implicit_add, ImplicitAdd):
            conv.bias += conv.weight.flatten(1) @ self.implicit_add.implicit.flatten()
            self.implicit_add = nn.Identity()
        if isinstance(self.implicit_mul, ImplicitMul):
            scale = self.implicit_mul.implicit.flatten()
            conv.weight *= scale[:, None, None, None]
            conv.bias *= scale
            self.implicit_mul = nn.Identity()


class IDetectHead(AnchorHead):
    """YOLOv7's ``IDetect``: one :class:`ImplicitPredictor` per level, its 3×3 block ``hidden_block(in_chs,
    hidden_chs)`` (RepConv or a conv-norm-act) before the implicit layers and the output conv; the raw layout,
    decoding and starting biases are :class:`~cvlab.models.heads.anchor_head.AnchorHead`'s (``head_kwargs``).

    ``forward(levels: list[Tensor[N, in_channels[l], H_l, W_l]]) -> list[Tensor[N, A, H_l, W_l, 5 + C]]``.
    """

    def __init__(self, in_channels: Sequence[int], hidden_channels: Sequence[int], num_anchors: int,
                 num_classes: int, hidden_block: Callable[[int, int], nn.Module], implicit: bool = True,
                 **head_kwargs):
        super().__init__(hidden_channels, None, num_anchors, num_classes, **head_kwargs)
        self.levels = nn.ModuleList(
            ImplicitPredictor(hidden_block(in_chs, hidden_chs), predictor[-1], implicit)
            for in_chs, hidden_chs, predictor in zip(in_channels, hidden_channels, self.levels, strict=True))


class YOLOv7(AnchorYolo):
    """YOLOv7 / YOLOv7-tiny: ELAN trunk, SPPCSPC + ELAN PAN, IDetect; 3 scales, 3 anchors each.

    Measured by cvlab at 640 px and 80 classes; ``fused`` is the deploy form (:meth:`fuse`), whose parameters the
    published tables count; FLOPs = 2 · multiply-adds of the deploy form's convs (``torch.utils.flop_counter``):

    ===========  ===========  ===========  ========  ===================================================
    variant      params       fused        FLOPs     published: README (M, G at 640); fused summary
    ===========  ===========  ===========  ========  ===================================================
    yolov7       37,622,682   36,905,341   104.51 G  36.9 M, 104.7 G; 306 layers, 36,905,341 parameters
    yolov7_tiny  6,228,762    6,219,709    13.70 G   6.2 M, 13.7 G; 200 layers, 6,219,709 parameters
    ===========  ===========  ===========  ========  ===================================================

    (The fused summaries are the "Model Summary" lines of the repository's ``tools/*.ipynb`` after
    ``Fusing layers...``.)

    The README's FLOPs add one multiply-add per output element of every fused conv (thop counts the bias):
    104.69 / 13.74 G, which round to them.

    Args:
        tiny: build YOLOv7-tiny.
        image_size: the training input size (a multiple of 32); the default anchors keep their pixel sizes at it.
        width: channel multiplier of the trunk, neck and head (``parse_model``'s rounding to multiples of 8).
        backbone: None for the ELAN trunk, or the name of a zoo classification backbone (its last three stages).
        anchors: list of (w, h) in pixels at ``image_size`` (a multiple of 3; sorted by area, the smallest go to
            the finest scale). Default: the cfg's, in pixels as the cfg gives them for any ``image_size``.
        implicit: IDetect's implicit layers (False: plain Detect).
        rep_conv: RepConv as the head's 3×3 blocks (yolov7's; False: conv-norm-act, yolov7-tiny's).
        aux_head: the auxiliary head with lead-guided assignment (training only; needs a
            :class:`~cvlab.losses.yolo.YoloV7Loss`).
        loss: a :class:`~cvlab.losses.yolo.YoloV5Loss` (``loss=yolov5``: no dynamic-k selection) or
            :class:`~cvlab.losses.yolo.YoloV7Loss`; None = YoloV7Loss with the hyp file's gains (tiny: obj 1.0,
            cls 0.5).
        norm_layer / act_layer / attn_layer: default YOLOv7's BatchNorm (eps 1e-3, momentum 0.03) / SiLU (tiny:
            LeakyReLU(0.1)) / none (the trunk's ELANs run ``attn_layer`` after their merge conv).
        conf_thresh, iou_thresh, max_det, …: post-processing (:class:`~cvlab.ops.postprocess.DetectionPostprocess`).
    """

    def __init__(self, tiny: bool = False, num_classes: int = 80, image_size: int = 640, width: float = 1.0,
                 backbone: str | None = None, anchors: Sequence[Sequence[float]] | None = None,
                 implicit: bool = True, rep_conv: bool = True, aux_head: bool = False, loss: nn.Module | None = None,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None, **postprocess_kwargs):
        name = "yolov7_tiny" if tiny else "yolov7"
        default_loss = partial(YoloV7Loss, obj_gain=1.0, cls_gain=0.5) if tiny else YoloV7Loss
        loss = check_loss(loss, YoloV5Loss, "loss=yolov7 or loss=yolov5", name, default_loss)
        if aux_head and not isinstance(loss, YoloV7Loss):
            raise UserError(f"{name}'s aux_head trains with the lead-guided assignment of loss=yolov7, which "
                            f"{type(loss).__name__} has not: choose loss=yolov7, or model.aux_head=false.")
        # The cfg's anchors keep their pixel sizes at every input size, as in the reference (they are pixels on the
        # strides' grid, which --img leaves alone; its autoanchor replaces them only where they fit the boxes
        # badly: here model.anchors=auto). Rescaled with the input (the other anchor YOLOs' default) they shrink
        # below their cells: at 128 px P5's 23×18 on 32 px cells. At the start of training a candidate's box is its
        # anchor at its cell's centre, so an object's best IoUs then sum to ~1 and SimOTA's dynamic k gives it a
        # single positive, most often on P5 (the largest objectness prior); yolov7_tiny learned 4× slower than
        # yolov5n per epoch (shapes_det, 128 px). Kept at their pixel sizes, k is ~4, on P3 and P4.
        anchor_wh = anchors_for(anchors, _ANCHORS[name], image_size, release_size=image_size)
        if len(anchor_wh) % _NUM_LEVELS:
            raise ValueError(f"{len(anchor_wh)} anchors cannot be split evenly over {_NUM_LEVELS} scales")
        anchor_wh = anchor_wh[anchor_wh.prod(dim=1).argsort()]
        per_level = len(anchor_wh) // _NUM_LEVELS
        masks = [range(level * per_level, (level + 1) * per_level) for level in range(_NUM_LEVELS)]  # P3 first

        layer_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
        paper_trunk = partial(elan_features, out_indices=(-3, -2, -1), variant=name, width=width, **layer_kwargs)
        trunk = yolo_backbone(backbone, paper_trunk, _NUM_LEVELS, name, image_size, **layer_kwargs)
        norm_layer = norm_layer or yolov5_batch_norm
        act_layer = act_layer or (leaky_relu if tiny else silu)
        neck = ELANPAN(trunk.feature_info.channels(), [yolov5_width(chs, width) for chs in _NECK_CHS[name]], tiny,
                       norm_layer, act_layer)
        hidden_block = (partial(RepVGGBlock, norm_layer=norm_layer, act_layer=act_layer) if rep_conv else
                        partial(ConvNormAct, kernel_size=3, norm_layer=norm_layer, act_layer=act_layer))
        head_kwargs = dict(
            objectness_biases=[math.log(_PRIOR_OBJECTS * (stride / RELEASE_IMAGE_SIZE) ** 2)
                               for stride in trunk.feature_info.reductions()],
            class_bias=math.log(0.6 / (num_classes - 0.99)), **YoloV5Loss.BOX_DECODING)
        head = IDetectHead(neck.out_channels,
                           [yolov5_width(_HEAD_EXPANSION * chs, width) for chs in _NECK_CHS[name]],
                           per_level, num_classes, hidden_block, implicit, **head_kwargs)
        super().__init__(trunk, neck, head, anchor_wh, masks, loss, DetectionPostprocess(**postprocess_kwargs))
        self.aux_head = AnchorHead(
            neck.out_channels, [yolov5_width(round(_AUX_EXPANSION * _HEAD_EXPANSION * chs), width)
                                for chs in _NECK_CHS[name]],
            per_level, num_classes, norm_layer, act_layer, **head_kwargs) if aux_head else None
        for part in (neck, head, self.aux_head):  # AnchorYolo starts them with Darknet's init; YOLOv7 keeps PyTorch's
            if part is not None:
                reset_to_pytorch_defaults(part)

    def no_weight_decay(self) -> set[str]:
        """The implicit layers' parameter names, which the task's optimiser trains without weight decay (timm's
        hook), as YOLOv7's train.py does (its ``pg0``): decay would pull ImplicitM's scales, started at 1, towards 0,
        and every head output with them."""
        return {f"{name}.implicit" for name, module in self.named_modules() if isinstance(module, Implicit)}

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tensor[N, 3, H, W] → per level Tensor[N, A, H_l, W_l, 5 + C]: the lead head's levels, followed in
        training by the auxiliary head's when there is one."""
        lead, top_down = self.neck(self.backbone(images), with_top_down=True)
        raw = self.head(lead)
        if self.training and self.aux_head is not None:
            raw += self.aux_head(top_down)
        return raw

    def compute_loss(self, raw: list[torch.Tensor], targets: list[dict], image_size: tuple[int, int]):
        lead, aux = raw[:_NUM_LEVELS], raw[_NUM_LEVELS:]
        kwargs = {"aux_outputs": aux} if aux else {}
        return self.loss(lead, self.level_anchors(), targets, image_size, xy_scales=self.head.level_xy_scales(),
                         **kwargs)

    def fuse(self) -> None:
        """The deploy form, in place (eval mode; the detectors' fuse hook): the auxiliary head removed, then every
        part's hook: RepConv re-parameterised, the implicit layers folded into the output convs, every BatchNorm
        folded into its conv. Idempotent; the eval outputs stay the same up to float rounding."""
        self.aux_head = None
        super().fuse()


@register_model(task="detection")
def yolov7(num_classes: int = 80, image_size: int = 640, width: float = 1.0, backbone: str | None = None,
           implicit: bool = True, rep_conv: bool = True, aux_head: bool = False, **kwargs) -> YOLOv7:
    """YOLOv7 (cfg/training/yolov7.yaml): ELAN trunk, SPPCSPC + ELAN PAN, RepConv + IDetect, 3 scales × 3 anchors."""
    return YOLOv7(False, num_classes, image_size, width, backbone, implicit=implicit, rep_conv=rep_conv,
                  aux_head=aux_head, **kwargs)


@register_model(task="detection")
def yolov7_tiny(num_classes: int = 80, image_size: int = 640, width: float = 1.0, backbone: str | None = None,
                implicit: bool = True, rep_conv: bool = False, aux_head: bool = False, **kwargs) -> YOLOv7:
    """YOLOv7-tiny (cfg/training/yolov7-tiny.yaml): tiny ELAN trunk and PAN, LeakyReLU, IDetect, 3 × 3 anchors."""
    return YOLOv7(True, num_classes, image_size, width, backbone, implicit=implicit, rep_conv=rep_conv,
                  aux_head=aux_head, **kwargs)
