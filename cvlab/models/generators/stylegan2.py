"""StyleGAN2 (config F).

Paper: Karras, Laine, Aittala, Hellsten, Lehtinen & Aila 2020, "Analyzing and Improving the Image Quality of
StyleGAN" (the layout of the official NVlabs/stylegan2 ``networks_stylegan2.py`` config F, as ported in
NVlabs/stylegan2-ada-pytorch ``training/networks.py``; the losses of its ``training/loss.py``).

- Mapping network and style mixing (0.9), truncation as StyleGAN (:class:`~cvlab.models.generators.stylegan.
  StyleGenerator`).
- Synthesis: a learned constant 4×4 input (N(0, 1)); per resolution two modulated 3×3 convolutions (the first
  upsampling ×2 with the [1, 3, 3, 1] FIR filter), each followed by noise (one learned strength per layer), bias and
  leaky ReLU; weight demodulation replaces AdaIN's instance norm, which caused the "blob" artefacts. Skip
  architecture: a modulated 1×1 toRGB (no demodulation) at every resolution, the images summed after FIR
  upsampling. No progressive growing.
- Discriminator: residual: per resolution two 3×3 convolutions (the second downsampling with the FIR filter) plus a
  1×1 skip (FIR downsampling), summed and scaled by sqrt(0.5); one fromRGB at the input; the 4×4 epilogue with the
  minibatch standard deviation (group 4).
- Loss: non-saturating logistic; lazy R1 (γ = 10) every 16 minibatches and path-length regularisation (weight 2,
  decay 0.01, on half the batch) every 4, each scaled by its interval; Adam lr 0.002, β (0, 0.99), the lr and betas
  scaled by ``c / (c + 1)`` for the lazy intervals.
- Channels: ``min(2 · fmap_base / res, fmap_max)``, ``fmap_base`` 16384 for config F (StyleGAN2-ADA's
  ``channel_base`` 32768).

Not included: mixed precision, ``conv_clamp`` (not in config F) and the ADA augmentation. ``conditional``: the class
embedding concatenated to z before the mapping and a projection discriminator, as StyleGAN2-ADA (its 8-layer label
mapping in D replaced by one embedding layer).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cvlab.losses.gan import logistic_generator_loss, path_length_penalty
from cvlab.models._registry import register_model
from cvlab.models.generators import due, refuse_layer_options
from cvlab.models.generators.layers import (
    SQRT2,
    DiscriminatorEpilogue,
    EqualizedConv2d,
    FIRFilter,
    MappingNetwork,
    ModulatedConv2d,
    NoiseInjection,
    ScaledLeakyReLU,
    channels_at,
    conv_act,
    resolution_log2,
)
from cvlab.models.generators.stylegan import StyleGANBase, StyleGenerator
from cvlab.utils.errors import UserError

RESAMPLE_TAPS = (1, 3, 3, 1)
G_ARCHITECTURES = ("skip", "orig")
D_ARCHITECTURES = ("resnet", "orig")


class SynthesisLayer(nn.Module):
    """Modulated (demodulated) 3×3 convolution, upsampling ×2 when ``up``, then noise (one strength), bias and
    ``sqrt(2) · leaky_relu``. ``(Tensor[N, in_chs, H, W], Tensor[N, w_dim]) → Tensor[N, out_chs, H', W']``."""

    def __init__(self, in_chs: int, out_chs: int, w_dim: int, resolution: int, up: bool, demodulate: bool,
                 use_noise: bool):
        super().__init__()
        self.conv = ModulatedConv2d(in_chs, out_chs, 3, w_dim, demodulate, up, RESAMPLE_TAPS)
        self.noise = NoiseInjection(out_chs, resolution, per_channel=False) if use_noise else None
        self.bias = nn.Parameter(torch.zeros(out_chs))
        self.act = ScaledLeakyReLU()

    def forward(self, x: Tensor, w: Tensor, noise: str = "random") -> Tensor:
        x = self.conv(x, w)
        if self.noise is not None:
            x = self.noise(x, noise)
        return self.act(x + self.bias.reshape(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1×1 convolution without demodulation, plus bias: features → image channels, linear."""

    def __init__(self, in_chs: int, out_chans: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_chs, out_chans, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_chans))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias.reshape(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: the constant (the 4×4 block) or an upsampling layer, a layer, and
    a toRGB (every block in the skip architecture, the last one only in ``orig``), whose image is added to the
    previous one's, FIR-upsampled. Uses 2 (4×4) or 3 latents: ``(x, img, ws: Tensor[N, k, w_dim]) → (x, img)``."""

    def __init__(self, in_chs: int, out_chs: int, w_dim: int, resolution: int, out_chans: int, to_rgb: bool,
                 demodulate: bool, use_noise: bool):
        super().__init__()
        if in_chs == 0:
            self.const = nn.Parameter(torch.randn(out_chs, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_chs, out_chs, w_dim, resolution, True, demodulate, use_noise)
        self.conv1 = SynthesisLayer(out_chs, out_chs, w_dim, resolution, False, demodulate, use_noise)
        self.to_rgb = ToRGB(out_chs, out_chans, w_dim) if to_rgb else None
        self.upsample = FIRFilter(RESAMPLE_TAPS, up=2)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor,
                noise: str = "random") -> tuple[Tensor, Tensor | None]:
        latents = iter(ws.unbind(dim=1))
        if self.conv0 is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, next(latents), noise)
        x = self.conv1(x, next(latents), noise)
        if self.to_rgb is not None:
            rgb = self.to_rgb(x, next(latents))
            img = rgb if img is None else self.upsample(img) + rgb
        return x, img


class StyleGAN2Synthesis(nn.Module):
    """The synthesis network: :class:`SynthesisBlock` per resolution. ``forward(ws: Tensor[N, num_ws, w_dim],
    noise) → Tensor[N, out_chans, resolution, resolution]``, ``num_ws = 2 · log2(resolution) - 2``; the block at
    ``2^(i + 2)`` px reads latents ``2i - 1 … 2i + 1`` (its toRGB's latent is the next block's first)."""

    def __init__(self, w_dim: int, resolution: int, out_chans: int, fmap_base: int, fmap_max: int,
                 architecture: str = "skip", demodulate: bool = True, use_noise: bool = True):
        super().__init__()
        log2 = resolution_log2(resolution, "stylegan2")
        self.num_ws = self.active_ws = 2 * log2 - 2
        channels = [channels_at(2**i, fmap_base, fmap_max) for i in range(2, log2 + 1)]
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[i - 1] if i else 0, chs, w_dim, 2 ** (i + 2), out_chans,
                           architecture == "skip" or i == len(channels) - 1, demodulate, use_noise)
            for i, chs in enumerate(channels))

    def feature_map_modules(self) -> dict[str, nn.Module]:
        """Each synthesis convolution by name (``"8px.conv0"``): its output is a feature map before noise, bias
        and activation, where the paper looks for the blob artefact."""
        return {f"{2 ** (i + 2)}px.{name}": getattr(block, name).conv for i, block in enumerate(self.blocks)
                for name in ("conv0", "conv1") if getattr(block, name) is not None}

    def forward(self, ws: Tensor, noise: str = "random") -> Tensor:
        x = img = None
        for i, block in enumerate(self.blocks):
            x, img = block(x, img, ws[:, max(2 * i - 1, 0):2 * i + 2], noise)
        return img


class ResidualBlock(nn.Module):
    """One discriminator resolution: 3×3 conv, then FIR blur and a stride-2 3×3 conv, each ``sqrt(2) · lrelu``;
    ``resnet``: plus a 1×1 skip (FIR downsampling, no bias), both branches scaled by ``sqrt(0.5)`` so the sum keeps
    unit variance. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H / 2, W / 2]``."""

    def __init__(self, in_chs: int, out_chs: int, residual: bool):
        super().__init__()
        branch_gain = math.sqrt(0.5) if residual else 1.0
        self.conv0 = conv_act(in_chs, in_chs, 3, act_gain=SQRT2)
        # upfirdn2d's padding for a 4-tap filter before a stride-2 3×3 convolution: 2 on each side.
        self.conv1 = nn.Sequential(FIRFilter(RESAMPLE_TAPS, padding=2),
                                   conv_act(in_chs, out_chs, 3, act_gain=SQRT2 * branch_gain, stride=2, padding=0))
        self.skip = None
        if residual:
            self.skip = nn.Sequential(FIRFilter(RESAMPLE_TAPS, down=2),
                                      EqualizedConv2d(in_chs, out_chs, 1, gain=branch_gain, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(self.conv0(x))
        return y if self.skip is None else self.skip(x) + y


class StyleGAN2Discriminator(nn.Module):
    """fromRGB (1×1, ``sqrt(2) · lrelu``) at the input resolution, :class:`ResidualBlock` per resolution down to
    4×4, the epilogue (minibatch std, conv, fully connected, output / projection).
    ``forward(images: Tensor[N, in_chans, R, R], labels: Tensor[N] | None) → Tensor[N]``."""

    def __init__(self, resolution: int, in_chans: int, fmap_base: int, fmap_max: int, num_classes: int = 0,
                 mbstd_group: int = 4, architecture: str = "resnet"):
        super().__init__()
        log2 = resolution_log2(resolution, "stylegan2")
        channels = {2**i: channels_at(2**i, fmap_base, fmap_max) for i in range(2, log2 + 1)}
        self.from_rgb = conv_act(in_chans, channels[resolution], 1, act_gain=SQRT2)
        self.blocks = nn.Sequential(*(ResidualBlock(channels[res], channels[res // 2], architecture == "resnet")
                                      for res in reversed(list(channels)[1:])))
        self.epilogue = DiscriminatorEpilogue(channels[4], channels[4], num_classes, mbstd_group, act_gain=SQRT2)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.epilogue(self.blocks(self.from_rgb(images)), labels)


class StyleGAN2(StyleGANBase):
    """StyleGAN2 config F: mapping + :class:`StyleGAN2Synthesis` (skip), :class:`StyleGAN2Discriminator`
    (residual), logistic loss with lazy R1 and path-length regularisation.

    Parameters counted by cvlab (every trainable tensor, as StyleGAN2-ADA's ``named_parameters``: the noise
    strengths and the toRGB biases count; the buffers ``w_avg``, the constant noise and the FIR filters do not),
    equal to the counts of the official config F (30.4 M G, 29.0 M D):

    =================================================================  ===========  ===========
    variant                                                            G params     D params
    =================================================================  ===========  ===========
    paper: config F, 1024 px, 3 channels, z = w = 512, 16384 / 512     30,370,060   29,012,513
    conf/model/stylegan2.yaml: 32 px, 1 channel, z = w = 128, 512/128  847,787      871,521
    =================================================================  ===========  ===========

    Args:
        image_size / in_chans / num_classes / conditional / latent_dim / w_dim / mapping_layers / mapping_lr_mul /
            w_avg_beta / style_mixing / use_noise / mbstd_group / r1_gamma / lr / betas: as
            :class:`~cvlab.models.generators.stylegan.StyleGAN`.
        fmap_base: 16384 (config F; 8192 for configs A-E). fmap_max: 512.
        demodulate: weight demodulation (False: modulation alone, the paper's blob-prone ablation).
        g_architecture: ``skip`` (config F) or ``orig`` (one toRGB at the end).
        d_architecture: ``resnet`` (config F) or ``orig`` (no skip branch).
        r1_interval: 16 (lazy). pl_weight: 2 (0 = off). pl_decay: 0.01. pl_interval: 4. pl_batch_shrink: 2.
    """

    def __init__(self, image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
                 latent_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8, mapping_lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995, fmap_base: int = 16384, fmap_max: int = 512, style_mixing: float = 0.9,
                 use_noise: bool = True, demodulate: bool = True, g_architecture: str = "skip",
                 d_architecture: str = "resnet", mbstd_group: int = 4, r1_gamma: float = 10.0,
                 r1_interval: int = 16, pl_weight: float = 2.0, pl_decay: float = 0.01, pl_interval: int = 4,
                 pl_batch_shrink: int = 2, lr: float = 0.002, betas: tuple[float, float] = (0.0, 0.99),
                 norm_layer: Any = None, act_layer: Any = None, attn_layer: Any = None):
        refuse_layer_options("stylegan2", norm_layer, act_layer, attn_layer)
        for option, value, choices in (("g_architecture", g_architecture, G_ARCHITECTURES),
                                       ("d_architecture", d_architecture, D_ARCHITECTURES)):
            if value not in choices:
                raise UserError(f"stylegan2's {option} must be one of {', '.join(choices)}, got {value!r}.")
        classes = num_classes if conditional else 0
        mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, lr_mul=mapping_lr_mul, num_classes=classes,
                                 w_avg_beta=w_avg_beta)
        synthesis = StyleGAN2Synthesis(w_dim, image_size, in_chans, fmap_base, fmap_max, g_architecture, demodulate,
                                       use_noise)
        discriminator = StyleGAN2Discriminator(image_size, in_chans, fmap_base, fmap_max, classes, mbstd_group,
                                               d_architecture)
        super().__init__(StyleGenerator(mapping, synthesis), discriminator, latent_dim=latent_dim,
                         image_size=image_size, in_chans=in_chans, num_classes=num_classes, conditional=conditional,
                         style_mixing=style_mixing, r1_gamma=r1_gamma, r1_interval=r1_interval, lr=lr, betas=betas)
        self.pl_weight, self.pl_decay = float(pl_weight), float(pl_decay)
        self.pl_interval, self.pl_batch_shrink = int(pl_interval), int(pl_batch_shrink)
        self.g_reg_interval, self.g_reg_on = self.pl_interval, self.pl_weight > 0
        # The moving average of the path lengths: state of the regulariser, saved with the model.
        self.register_buffer("pl_mean", torch.zeros(()))

    def generator_terms(self, fake_scores: Tensor, batch_size: int, labels: Tensor | None,
                        step: int) -> dict[str, Tensor]:
        terms = {"loss_g": logistic_generator_loss(fake_scores)}
        if due(step, self.pl_interval, self.pl_weight):
            n = max(1, batch_size // self.pl_batch_shrink)
            z = self.sample_latents(n, device=fake_scores.device)
            ws = self.generator.ws(z, None if labels is None else labels[:n], mixing_prob=self.style_mixing,
                                   update_w_avg=True)
            penalty, pl_mean = path_length_penalty(self.generator.synthesis(ws), ws, self.pl_mean, self.pl_decay)
            self.pl_mean.copy_(pl_mean.detach())
            terms["loss_pl"] = penalty * self.pl_weight * self.pl_interval
        return terms


@register_model(task="generation")
def stylegan2(image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
              **kwargs) -> StyleGAN2:
    """StyleGAN2 config F (Karras et al. 2020): modulated / demodulated convolutions, skip G, residual D, lazy R1
    and path-length regularisation, no growing."""
    return StyleGAN2(image_size, in_chans, num_classes, conditional, **kwargs)
