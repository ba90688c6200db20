"""UNet.

Paper: Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation".

The paper's network: a contracting path of five levels (64, 128, 256, 512, 1024 channels), each two 3×3 convolutions
with ReLU, and a 2×2 max-pool (stride 2) between levels; an expanding path of four up-steps, each a 2×2 transposed
convolution ("up-convolution") halving the channels, a concatenation with the contracting path's feature map of that
level, and two 3×3 convolutions with ReLU; a 1×1 convolution to the classes. No normalisation; Gaussian init with
std ``sqrt(2 / N)``, N the number of inputs of one unit.

``padding``:

- ``"valid"`` is the paper's: unpadded 3×3 convolutions, each losing a 1-pixel border, so a 572² tile gives a 388²
  output (a 92-pixel margin on every side) and the skips are centre-cropped to the up-sampled maps before the
  concatenation. To meet cvlab's contract (logits at the input's size) the paper's overlap-tile strategy is applied
  to the whole image: the input is mirror-padded by the margin the network loses (92 px on the top / left; on the
  bottom / right the margin plus what rounds the output up to the next size the valid network can produce), so the
  output covers the input exactly and is cropped to it. The border pixels see mirrored context, as the paper's
  tiles do at the image border. The network then runs on a larger input (252² for a 64² image, 284² for 96²,
  700² for 512²): measured, 5.1× the FLOPs of ``"same"`` at 64 px, 3.3× at 96 px, 1.3× at 512 px.
- ``"same"``: 3×3 convolutions padded by 1, so every level keeps its size; the input is mirror-padded on the bottom /
  right to a multiple of 16 and the output cropped back.

``backbone=<zoo name>`` builds the UNet decoder on a zoo classification backbone's stages
(``create_model(name, features_only=True)``): one skip per resolution (the last stage at each reduction), each
up-step a transposed convolution with kernel = stride = the ratio of the reductions (2×2 stride 2 for the CNNs), to
``width ×`` the skip's channels (the paper's halving, as in the paper the up-convolution's output matches the skip),
concatenation and two 3×3 convs; the 1×1 classifier's logits are upsampled bilinearly to the input. The zoo
encoders are padded convolutions, so this form takes only ``padding="same"``.

Written by hand (the paper's network is in no library cvlab uses; segmentation_models_pytorch has only encoder-
decoder variants with BatchNorm).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.norm import no_norm
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.darknet import scale_width
from cvlab.models.heads.segmentation import SegmentationClassifier
from cvlab.models.segmentors import Segmentor, segmentation_backbone
from cvlab.utils.errors import UserError

_PAPER_CHANNELS = (64, 128, 256, 512, 1024)
_PADDINGS = ("same", "valid")
# Each level's two unpadded 3×3 convs lose 2 px per side in all.
_VALID_LOSS = 4


class UNetBlock(nn.Sequential):
    """Two 3×3 conv → norm → act (padding 1 for ``"same"``, 0 for ``"valid"``), then ``attn_layer(out_chs)``
    when given. A conv is biased when no norm follows it (the paper's layout).
    ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H', W']`` with ``H' = H`` (same) or ``H - 4`` (valid)."""

    def __init__(self, in_chs: int, out_chs: int, padding: str, norm_layer: NormFactory, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        pad = 1 if padding == "same" else 0
        layers = [ConvNormAct(in_chs, out_chs, 3, padding=pad, norm_layer=norm_layer, act_layer=act_layer, bias=None),
                  ConvNormAct(out_chs, out_chs, 3, padding=pad, norm_layer=norm_layer, act_layer=act_layer, bias=None)]
        if attn_layer is not None:
            layers.append(attn_layer(out_chs))
        super().__init__(*layers)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central ``size`` window of ``Tensor[N, C, H, W]`` (the paper's crop of a skip to the up-sampled map)."""
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


class UNetUp(nn.Module):
    """One up-step: transposed conv ``in_chs → out_chs`` (kernel = stride = ``scale``; the paper's 2×2), the skip
    concatenated (both centre-cropped to their common size), a :class:`UNetBlock` ``out_chs + skip_chs → out_chs``.
    ``(Tensor[N, in_chs, h, w], Tensor[N, skip_chs, H, W]) → Tensor[N, out_chs, H', W']``."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, scale: int, padding: str, norm_layer: NormFactory,
                 act_layer: ActFactory, attn_layer: AttnFactory | None):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_chs, out_chs, scale, scale)
        self.block = UNetBlock(out_chs + skip_chs, out_chs, padding, norm_layer, act_layer, attn_layer)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        size = (min(x.shape[-2], skip.shape[-2]), min(x.shape[-1], skip.shape[-1]))
        return self.block(torch.cat([center_crop(skip, size), center_crop(x, size)], dim=1))


class UNetEncoder(nn.Module):
    """The paper's contracting path: :class:`UNetBlock` per level, 2×2 max-pool between levels.
    ``forward(x) -> list[Tensor]``, one map per level, finest first (``channels`` each, at ``reductions``)."""

    def __init__(self, in_chans: int, channels: list[int], padding: str, norm_layer: NormFactory,
                 act_layer: ActFactory, attn_layer: AttnFactory | None):
        super().__init__()
        self.channels = channels
        self.reductions = [2**level for level in range(len(channels))]
        self.pool = nn.MaxPool2d(2)
        self.levels = nn.ModuleList(
            UNetBlock(in_chs, out_chs, padding, norm_layer, act_layer, attn_layer)
            for in_chs, out_chs in zip([in_chans, *channels[:-1]], channels)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, level in enumerate(self.levels):
            x = level(x if index == 0 else self.pool(x))
            outputs.append(x)
        return outputs


def _valid_sizes(size: int, num_levels: int) -> tuple[int, int]:
    """(input, output) side of the valid network for the smallest output that covers ``size`` pixels.

    With ``b`` the bottom level's output side, going down each level's input is ``2·s + 4`` of the next one's
    (``b + 4`` at the bottom), and going up each step gives ``2·s − 4``: at five levels input ``16·b + 124``,
    output ``16·b − 60`` (the paper's 572 → 388 at ``b = 28``).
    """
    bottom = 1
    while True:
        output = bottom
        for _ in range(num_levels - 1):
            output = 2 * output - _VALID_LOSS
        if output >= size:
            break
        bottom += 1
    side = bottom + _VALID_LOSS
    for _ in range(num_levels - 1):
        side = 2 * side + _VALID_LOSS
    return side, output


def mirror_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """``Tensor[N, C, H, W]`` padded by reflection (the paper's mirroring), for pads of any width: PyTorch's
    ``reflect`` takes less than the side per call, so wider pads reflect the already padded map again, as
    ``numpy.pad(mode="reflect")`` does. A side of 1 pixel is repeated (there is nothing to reflect)."""
    while left or right or top or bottom:
        height, width = x.shape[-2:]
        step = [min(left, width - 1), min(right, width - 1), min(top, height - 1), min(bottom, height - 1)]
        if height == 1 or width == 1:
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (pad - done for pad, done in zip((left, right, top, bottom), step))
    return x


def _init_paper_weights_(module: nn.Module) -> None:
    """The paper's init: every conv / transposed-conv weight ~ N(0, 2 / N), N = inputs of one output unit
    (``C_in / groups · k_h · k_w``; for a transposed conv ``C_in / groups · ⌈k_h / s_h⌉ · ⌈k_w / s_w⌉``, one tap per
    input channel for the 2×2 stride-2 up-convolution), biases 0. Norms keep their own start (weight 1, bias 0)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            transposed = isinstance(layer, nn.ConvTranspose2d)
            taps = [math.ceil(k / s) if transposed else k for k, s in zip(layer.kernel_size, layer.stride)]
            fan_in = layer.in_channels // layer.groups * math.prod(taps)
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / fan_in))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class UNet(Segmentor):
    """UNet: encoder (the paper's or a zoo backbone's stages), up-steps with skip concatenations, 1×1 classifier.

    Measured by cvlab (biased convs, ``norm_layer`` default = the paper's none; FLOPs = 2 · multiply-adds of one
    eval forward at 256 × 512, ``torch.utils.flop_counter``):

    ====================================================  ===========  ==============================
    variant                                               params       FLOPs at 256 × 512
    ====================================================  ===========  ==============================
    paper: in_chans=1, 2 classes, width 1.0               31,030,658   276.81 G valid, 192.38 G same
    conf/model/unet.yaml: in_chans=3, 6 classes, 0.25     1,941,190    12.15 G (same)
    ====================================================  ===========  ==============================

    Args:
        padding: ``"valid"`` (the paper's, with overlap-tile mirroring; see the module docstring) or ``"same"``.
        width: channel multiplier of the paper's encoder and decoder (64 · width … 1024 · width); with a
            ``backbone``, of the decoder (each up-step gives ``width ×`` its skip's channels).
        backbone: None for the paper's encoder, or a zoo classification model's name, built with
            ``features_only`` and this model's ``in_chans`` / ``image_size`` / norm / act / attn factories
            (``act_layer=None`` leaves it its own activation) and its own ``stem`` rule.
        norm_layer: default none (the paper); any factory replaces it in every conv block (convs lose their bias).
        act_layer: default ReLU. attn_layer: appended to every conv block (encoder and decoder), after its
            activation; with a backbone, also inside the backbone's blocks.

    No auxiliary outputs (``aux_weights = ()``). The init is the paper's (N(0, 2 / N)); a backbone keeps its own.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 1, image_size: int = 572, padding: str = "valid",
                 width: float = 1.0, backbone: str | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        if padding not in _PADDINGS:
            raise UserError(f"unet's padding must be 'same' or 'valid', got {padding!r}.")
        if backbone is not None and padding == "valid":
            raise UserError(f"unet with backbone={backbone} takes padding=same only (the zoo encoders pad their "
                            "convolutions); set model.padding=same.")
        self.padding = padding
        block_norm = norm_layer or no_norm
        block_act = act_layer or partial(nn.ReLU, inplace=True)

        if backbone is None:
            channels = [scale_width(chs, width) for chs in _PAPER_CHANNELS]
            self.encoder = UNetEncoder(in_chans, channels, padding, block_norm, block_act, attn_layer)
            reductions, decoder_chs = self.encoder.reductions, channels[:-1]
        else:
            self.encoder = segmentation_backbone(backbone, "unet", None, in_chans, image_size, norm_layer, act_layer,
                                                 attn_layer)
            info = self.encoder.feature_info
            # One skip per resolution: the last stage of each reduction.
            self.skip_indices = [i for i, r in enumerate(info.reductions()) if i + 1 == len(info)
                                 or info.reductions()[i + 1] != r]
            channels = [info.channels()[i] for i in self.skip_indices]
            reductions = [info.reductions()[i] for i in self.skip_indices]
            decoder_chs = [scale_width(chs, width) for chs in channels[:-1]]
        scales = [coarse // fine for fine, coarse in zip(reductions, reductions[1:])]
        if any(fine * scale != coarse for fine, coarse, scale in zip(reductions, reductions[1:], scales)):
            raise UserError(f"unet needs each backbone stage's reduction to be a multiple of the one before; "
                            f"{backbone}'s are {reductions}.")

        # Coarse to fine: the deepest map goes up first.
        ups, in_chs = [], channels[-1]
        for skip_chs, out_chs, scale in reversed(list(zip(channels[:-1], decoder_chs, scales))):
            ups.append(UNetUp(in_chs, skip_chs, out_chs, scale, padding, block_norm, block_act, attn_layer))
            in_chs = out_chs
        self.decoder = nn.ModuleList(ups)
        self.classifier = SegmentationClassifier(in_chs, num_classes, dropout=0.0)
        self.num_levels = len(channels)
        for part in (self.decoder, self.classifier) if backbone is not None else (self,):
            _init_paper_weights_(part)

    def _input_padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) mirror padding of the paper encoder's input; the output, cropped to its
        first ``height × width`` pixels, then covers the input exactly."""
        if self.padding == "valid":
            (in_h, out_h), (in_w, out_w) = (_valid_sizes(side, self.num_levels) for side in (height, width))
            top, left = (in_h - out_h) // 2, (in_w - out_w) // 2
            return left, in_w - width - left, top, in_h - height - top
        multiple = 2 ** (self.num_levels - 1)
        return 0, -width % multiple, 0, -height % multiple

    def forward_logits(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        height, width = images.shape[-2:]
        paper = isinstance(self.encoder, UNetEncoder)
        features = self.encoder(mirror_pad(images, *self._input_padding(height, width)) if paper else images)
        if not paper:
            features = [features[i] for i in self.skip_indices]
        x = features[-1]
        for up, skip in zip(self.decoder, reversed(features[:-1])):
            x = up(x, skip)
        logits = self.classifier(x)
        return (logits[..., :height, :width] if paper else logits), []


@register_model(task="segmentation")
def unet(num_classes: int = 2, in_chans: int = 1, image_size: int = 572, padding: str = "valid", width: float = 1.0,
         backbone: str | None = None, norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
         attn_layer: AttnFactory | None = None) -> UNet:
    """UNet (Ronneberger et al. 2015): the paper's 64 → 1024 encoder (or ``backbone``), valid or same padding."""
    return UNet(num_classes, in_chans, image_size, padding, width, backbone, norm_layer, act_layer, attn_layer)
