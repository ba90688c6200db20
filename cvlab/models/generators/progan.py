"""Progressive GAN (ProGAN).

Paper: Karras, Aila, Laine & Lehtinen 2018, "Progressive Growing of GANs for Improved Quality, Stability, and
Variation" (the layout of the official tkarras/progressive_growing_of_gans ``networks.py``, ``G_paper`` / ``D_paper``).

- Generator: the latent, pixel-normalised, through a fully connected layer to a 4×4 map, then per resolution up to
  the target a nearest-neighbour ×2 upsampling and two 3×3 convolutions; every layer leaky ReLU 0.2 then pixelwise
  feature normalisation; a 1×1 "toRGB" convolution per resolution, linear.
- Discriminator: the mirror image: a 1×1 "fromRGB" per resolution, per resolution two 3×3 convolutions and 2×2
  average pooling; at 4×4 the minibatch standard deviation (group 4) as one more channel, a 3×3 convolution, two
  fully connected layers; no normalisation.
- Every layer with the equalised learning rate (weights N(0, 1), scaled at run time by He's constant).
- Progressive growing: training starts at 4×4; each new resolution's block fades in (``alpha`` 0 → 1) over the
  previous one's upsampled image in G and downsampled input in D (:class:`~cvlab.models.generators.layers.
  Progressive`); ``set_progress(phase, alpha)`` sets it, a callback drives it by images seen (``kimg_per_phase``).
- Loss: WGAN-GP (λ = 10, target 1) with the drift penalty ε · E[D(real)²], ε = 0.001; Adam lr 0.001, β (0, 0.99).

The official ``fused_scale`` (a transposed / strided convolution doing the resampling) is the same operator as the
separate upsample → conv and conv → average pool used here, with the same parameters. ``conditional``: the class
embedded and concatenated to the latent, and a projection discriminator (the paper's AC-GAN term is not used).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cvlab.losses.gan import drift_penalty, gradient_penalty, wgan_discriminator_loss, wgan_generator_loss
from cvlab.models._registry import register_model
from cvlab.models.generators import GAN, refuse_layer_options
from cvlab.models.generators.layers import (
    SQRT2,
    DiscriminatorEpilogue,
    EqualizedConv2d,
    EqualizedLinear,
    FIRFilter,
    LabelEmbedding,
    PixelNorm,
    Progressive,
    channels_at,
    conv_act,
    leaky_relu,
    resolution_log2,
)
from cvlab.utils.errors import UserError


class ProGANInput(nn.Module):
    """The generator's 4×4 start: a fully connected layer ``in_features → channels × 4 × 4`` (gain sqrt(2) / 4, as
    the official code, to match its Theano original) with one bias per channel, leaky ReLU, pixel norm, then a 3×3
    convolution. ``Tensor[N, in_features] → Tensor[N, channels, 4, 4]``."""

    def __init__(self, in_features: int, channels: int, pixel_norm: bool, equalized: bool):
        super().__init__()
        self.channels = channels
        self.dense = EqualizedLinear(in_features, channels * 16, gain=SQRT2 / 4, bias=False, equalized=equalized)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.act = nn.Sequential(leaky_relu(), PixelNorm() if pixel_norm else nn.Identity())
        self.conv = nn.Sequential(conv_act(channels, channels, 3, equalized=equalized),
                                  PixelNorm() if pixel_norm else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        x = self.dense(x).reshape(-1, self.channels, 4, 4) + self.bias.reshape(1, -1, 1, 1)
        return self.conv(self.act(x))


class ProGANUpBlock(nn.Sequential):
    """One generator resolution: nearest ×2 upsampling, two 3×3 conv → leaky ReLU → pixel norm.
    ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, 2H, 2W]``."""

    def __init__(self, in_chs: int, out_chs: int, pixel_norm: bool, equalized: bool):
        norm = PixelNorm if pixel_norm else nn.Identity
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"),
                         conv_act(in_chs, out_chs, 3, equalized=equalized), norm(),
                         conv_act(out_chs, out_chs, 3, equalized=equalized), norm())


class ProGANDownBlock(nn.Sequential):
    """One discriminator resolution: 3×3 conv → leaky ReLU, (StyleGAN: a blur), 3×3 conv → leaky ReLU, 2×2 average
    pooling. ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H / 2, W / 2]``."""

    def __init__(self, in_chs: int, out_chs: int, blur_taps: tuple[float, ...] | None, equalized: bool):
        blur = [FIRFilter(blur_taps, padding=len(blur_taps) // 2)] if blur_taps else []
        super().__init__(conv_act(in_chs, in_chs, 3, equalized=equalized), *blur,
                         conv_act(in_chs, out_chs, 3, equalized=equalized), nn.AvgPool2d(2))


class ProGANGenerator(Progressive):
    """``forward(z: Tensor[N, latent_dim], labels: Tensor[N] | None) → Tensor[N, out_chans, r, r]``, ``r`` the
    current resolution, unclamped (linear toRGB, as the paper). A toRGB per resolution when progressive, only the
    last one otherwise."""

    def __init__(self, latent_dim: int, resolution: int, out_chans: int, fmap_base: int, fmap_max: int,
                 num_classes: int = 0, progressive: bool = True, pixel_norm: bool = True,
                 normalize_latents: bool = True, equalized: bool = True):
        super().__init__(resolution, progressive)
        log2 = resolution_log2(resolution, "progan")
        channels = {2**i: channels_at(2**i, fmap_base, fmap_max) for i in range(2, log2 + 1)}
        self.latent_norm = PixelNorm() if normalize_latents else nn.Identity()
        self.embed = LabelEmbedding(num_classes, latent_dim) if num_classes else None
        self.input = ProGANInput(latent_dim * (2 if num_classes else 1), channels[4], pixel_norm, equalized)
        self.blocks = nn.ModuleList(ProGANUpBlock(channels[res // 2], channels[res], pixel_norm, equalized)
                                    for res in list(channels)[1:])
        self.to_rgb = nn.ModuleDict({str(res): EqualizedConv2d(chs, out_chans, 1, gain=1.0, equalized=equalized)
                                     for res, chs in channels.items() if progressive or res == resolution})

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.latent_norm(z)
        if self.embed is not None:
            x = torch.cat([x, self.latent_norm(self.embed(labels))], dim=1)
        x = previous = self.input(x)
        for block in self.blocks[:self.current_resolution.bit_length() - 3]:
            previous, x = x, block(x)
        return self.to_image(self.to_rgb, previous, x)


class ProGANDiscriminator(Progressive):
    """``forward(images: Tensor[N, in_chans, r, r], labels: Tensor[N] | None) → Tensor[N]`` (scores), ``r`` the
    current resolution. A fromRGB per resolution when progressive, only the first one otherwise. ``blur_taps``:
    StyleGAN's low-pass filter before each downsampling convolution (None: ProGAN's, no filter)."""

    def __init__(self, resolution: int, in_chans: int, fmap_base: int, fmap_max: int, num_classes: int = 0,
                 mbstd_group: int = 4, progressive: bool = True, blur_taps: tuple[float, ...] | None = None,
                 equalized: bool = True):
        super().__init__(resolution, progressive)
        log2 = resolution_log2(resolution, "the discriminator")
        channels = {2**i: channels_at(2**i, fmap_base, fmap_max) for i in range(2, log2 + 1)}
        self.from_rgb = nn.ModuleDict({str(res): conv_act(in_chans, chs, 1, equalized=equalized)
                                       for res, chs in channels.items() if progressive or res == resolution})
        # blocks[i] takes 2^(i + 3) px to half that.
        self.blocks = nn.ModuleList(ProGANDownBlock(channels[res], channels[res // 2], blur_taps, equalized)
                                    for res in list(channels)[1:])
        self.epilogue = DiscriminatorEpilogue(channels[4], channels_at(2, fmap_base, fmap_max), num_classes,
                                              mbstd_group, equalized=equalized)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        depth = images.shape[-1].bit_length() - 3  # blocks between this resolution and 4×4
        if images.shape[-1] != self.current_resolution:
            raise UserError(f"the discriminator is at {self.current_resolution} px, got images of "
                            f"{images.shape[-1]} px.")
        x = self.from_image(self.from_rgb, self.blocks[depth - 1] if depth else None, images)
        for block in reversed(self.blocks[:max(depth - 1, 0)]):
            x = block(x)
        return self.epilogue(x, labels)


class ProGAN(GAN):
    """Progressive GAN: :class:`ProGANGenerator` and :class:`ProGANDiscriminator`, WGAN-GP with drift.

    Parameters counted by cvlab (every trainable tensor, a toRGB / fromRGB per resolution; buffers not counted),
    equal to the paper's (its Table 2: 23.1 M each):

    =================================================================  ===========  ===========
    variant                                                            G params     D params
    =================================================================  ===========  ===========
    paper: 1024 px, 3 channels, latent 512, fmap_base 8192, max 512    23,079,115   23,087,249
    conf/model/progan.yaml: 32 px, 1 channel, latent 128, 512 / 128    843,812      845,537
    =================================================================  ===========  ===========

    Args:
        image_size: the target resolution, a power of two ≥ 4. in_chans: image channels.
        num_classes / conditional: class-conditional generation (label embedding + projection discriminator).
        latent_dim: z's size (the paper: 512). fmap_base / fmap_max: ``min(fmap_base / 2^(log2 res - 1), max)``
            feature maps at each resolution.
        progressive: grow from 4×4 (False: train at the target directly, one toRGB / fromRGB).
        kimg_per_phase: thousands of real images per resolution phase (half fading in, half stabilising), read by
            the progressive-growing callback; the paper 1600 (800 + 800), its code 1200.
        pixel_norm / equalized_lr / mbstd_group (0 = off): the paper's three pieces, each switchable.
        gp_weight (λ), gp_target, drift_weight (ε): the loss; lr / betas: Adam's.
    """

    def __init__(self, image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
                 latent_dim: int = 512, fmap_base: int = 8192, fmap_max: int = 512, progressive: bool = True,
                 kimg_per_phase: float = 1200.0, pixel_norm: bool = True, equalized_lr: bool = True,
                 mbstd_group: int = 4, gp_weight: float = 10.0, gp_target: float = 1.0, drift_weight: float = 0.001,
                 lr: float = 0.001, betas: tuple[float, float] = (0.0, 0.99), norm_layer: Any = None,
                 act_layer: Any = None, attn_layer: Any = None):
        refuse_layer_options("progan", norm_layer, act_layer, attn_layer)
        classes = num_classes if conditional else 0
        generator = ProGANGenerator(latent_dim, image_size, in_chans, fmap_base, fmap_max, classes, progressive,
                                    pixel_norm, equalized=equalized_lr)
        discriminator = ProGANDiscriminator(image_size, in_chans, fmap_base, fmap_max, classes, mbstd_group,
                                            progressive, equalized=equalized_lr)
        super().__init__(generator, discriminator, latent_dim, image_size, in_chans, num_classes, conditional,
                         kimg_per_phase)
        self.gp_weight, self.gp_target, self.drift_weight = float(gp_weight), float(gp_target), float(drift_weight)
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)

    def run_generator(self, generator: nn.Module, z: Tensor, labels: Tensor | None, truncation: float,
                      truncation_cutoff: int | None, noise: str) -> Tensor:
        if truncation != 1.0:
            raise UserError("progan has no truncation trick (it maps z straight to images); use truncation=1, or a "
                            "style model (stylegan, stylegan2).")
        return generator(z, labels)

    def training_fakes(self, z: Tensor, labels: Tensor | None) -> Tensor:
        return self.generator(z, labels)

    def discriminator_terms(self, real: Tensor, fake: Tensor, labels: Tensor | None, step: int) -> dict[str, Tensor]:
        real_scores = self.discriminator(real, labels)
        terms = {"loss_d": wgan_discriminator_loss(real_scores, self.discriminator(fake, labels))}
        if self.gp_weight:
            terms["loss_gp"] = self.gp_weight * gradient_penalty(lambda x: self.discriminator(x, labels), real, fake,
                                                                 self.gp_target)
        if self.drift_weight:
            terms["loss_drift"] = self.drift_weight * drift_penalty(real_scores)
        return terms

    def generator_terms(self, fake_scores: Tensor, batch_size: int, labels: Tensor | None,
                        step: int) -> dict[str, Tensor]:
        return {"loss_g": wgan_generator_loss(fake_scores)}

    def adam_settings(self) -> dict[str, dict[str, Any]]:
        return {name: {"lr": self.lr, "betas": self.betas} for name in ("generator", "discriminator")}


@register_model(task="generation")
def progan(image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
           **kwargs) -> ProGAN:
    """Progressive GAN (Karras et al. 2018): growing 4×4 → ``image_size``, equalised lr, pixel norm, minibatch
    std, WGAN-GP + drift."""
    return ProGAN(image_size, in_chans, num_classes, conditional, **kwargs)
