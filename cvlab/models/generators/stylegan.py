"""StyleGAN.

Paper: Karras, Laine & Aila 2019, "A Style-Based Generator Architecture for Generative Adversarial Networks" (the
layout of the official NVlabs/stylegan ``training/networks_stylegan.py``: ``G_style``, ``G_mapping``,
``G_synthesis``, ``D_basic``).

- Mapping network: z (pixel-normalised) through 8 fully connected layers of 512 with leaky ReLU and a learning-rate
  multiplier of 0.01, to w; the moving average of w (decay 0.995) is tracked for the truncation trick.
- Synthesis network: a learned constant 4×4 input; per resolution two 3×3 convolutions (the first after a nearest
  ×2 upsampling, followed by a [1, 2, 1] blur); after every convolution per-pixel noise (a learned strength per
  channel), bias, leaky ReLU and AdaIN: instance normalisation, then ``x · (y_s + 1) + y_b`` with the style
  ``(y_s, y_b)`` an affine function of that layer's w. A linear toRGB per resolution.
- Style mixing (probability 0.9 in training): the per-layer latents switch from one z's w to another's at a random
  layer. Truncation: ``w_avg + ψ (w - w_avg)`` on the first ``cutoff`` layers.
- Progressive growing as ProGAN (the paper trains FFHQ 8×8 → 1024 with fade-in).
- Discriminator: ProGAN's, with the [1, 2, 1] blur before each downsampling convolution.
- Loss: non-saturating logistic with R1 (γ = 10) on the reals; Adam lr 0.001, β (0, 0.99) (the paper raises the
  lr at 128 px and above: a schedule, not a network piece, left out).

The official ``fused_scale`` resampling (a transposed / strided convolution at 128 px and up) is the same operator as
the separate upsample → conv used here. ``conditional``: the class embedding concatenated to z before the mapping
(StyleGAN2-ADA's form of the paper's ``LabelConcat``) and a projection discriminator (instead of the paper's score per
class).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.losses.gan import logistic_discriminator_loss, logistic_generator_loss, r1_penalty
from cvlab.models._registry import register_model
from cvlab.models.generators import GAN, due, lazy_adam, refuse_layer_options
from cvlab.models.generators.layers import (
    SQRT2,
    EqualizedConv2d,
    EqualizedLinear,
    FIRFilter,
    MappingNetwork,
    NoiseInjection,
    Progressive,
    channels_at,
    check_noise_mode,
    leaky_relu,
    resolution_log2,
    upsample_nearest,
)
from cvlab.models.generators.progan import ProGANDiscriminator
from cvlab.utils.errors import UserError


class StyleGenerator(nn.Module):
    """A style-based generator: ``mapping`` (z → w, a :class:`~cvlab.models.generators.layers.MappingNetwork`) and
    ``synthesis`` (per-layer latents ``Tensor[N, num_ws, w_dim]`` → images), with the truncation trick and style
    mixing in between; StyleGAN's and StyleGAN2's.

    ``forward(z, labels=None, truncation=1, truncation_cutoff=None, noise="random", mixing_prob=0,
    update_w_avg=False) → Tensor[N, C, r, r]`` (unclamped, at the synthesis network's current resolution).
    """

    def __init__(self, mapping: MappingNetwork, synthesis: nn.Module):
        super().__init__()
        self.mapping = mapping
        self.synthesis = synthesis
        self.num_ws = synthesis.num_ws

    def ws(self, z: Tensor, labels: Tensor | None = None, truncation: float = 1.0,
           truncation_cutoff: int | None = None, mixing_prob: float = 0.0, update_w_avg: bool = False) -> Tensor:
        """Per-layer latents ``Tensor[N, num_ws, w_dim]``: w broadcast to every layer; with probability
        ``mixing_prob`` one crossover layer drawn uniformly from [1, active layers) for the whole batch, from which
        on the layers take the w of fresh latents (StyleGAN2-ADA's ``style_mixing``); then the truncation trick.
        ``update_w_avg``: track the average of w (training)."""
        w = self.mapping(z, labels, update_w_avg=update_w_avg)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        active = self.synthesis.active_ws
        if mixing_prob > 0 and active > 1 and torch.rand(()) < mixing_prob:
            crossover = int(torch.randint(1, active, ()))
            mixed = self.mapping(torch.randn_like(z), labels).unsqueeze(1).expand(-1, self.num_ws - crossover, -1)
            ws = torch.cat([ws[:, :crossover], mixed], dim=1)
        return self.mapping.truncate(ws, truncation, truncation_cutoff)

    def forward(self, z: Tensor, labels: Tensor | None = None, truncation: float = 1.0,
                truncation_cutoff: int | None = None, noise: str = "random", mixing_prob: float = 0.0,
                update_w_avg: bool = False) -> Tensor:
        ws = self.ws(z, labels, truncation, truncation_cutoff, mixing_prob, update_w_avg)
        return self.synthesis(ws, noise)


class StyleEpilogue(nn.Module):
    """What follows each synthesis convolution in StyleGAN: noise (a strength per channel), bias, leaky ReLU, then
    AdaIN: instance normalisation (``instance_norm``) and the style ``x · (y_s + 1) + y_b``, ``(y_s, y_b)`` an
    equalised affine layer (gain 1) of the layer's w. ``(Tensor[N, C, H, W], Tensor[N, w_dim]) → same shape``."""

    def __init__(self, channels: int, resolution: int, w_dim: int, use_noise: bool, instance_norm: bool):
        super().__init__()
        self.noise = NoiseInjection(channels, resolution, per_channel=True) if use_noise else None
        self.bias = nn.Parameter(torch.zeros(channels))
        self.act = leaky_relu()
        self.instance_norm = instance_norm
        self.style = EqualizedLinear(w_dim, 2 * channels, gain=1.0)

    def forward(self, x: Tensor, w: Tensor, noise: str = "random") -> Tensor:
        if self.noise is not None:
            x = self.noise(x, noise)
        x = self.act(x + self.bias.reshape(1, -1, 1, 1))
        if self.instance_norm:
            x = F.instance_norm(x, eps=1e-8)
        scale, shift = self.style(w)[:, :, None, None].chunk(2, dim=1)
        return x * (scale + 1) + shift


class StyleSynthesis(Progressive):
    """StyleGAN's synthesis network (module docstring): ``forward(ws: Tensor[N, num_ws, w_dim], noise) →
    Tensor[N, out_chans, r, r]``, ``num_ws = 2 · log2(resolution) - 2`` (two per resolution), ``r`` the current
    resolution, of which only the first ``active_ws`` latents are used.

    ``const_input=False``: the paper's ablation, a fully connected layer from the first w instead of the constant
    (ProGAN's input, gain sqrt(2) / 4).
    """

    def __init__(self, w_dim: int, resolution: int, out_chans: int, fmap_base: int, fmap_max: int,
                 progressive: bool = True, use_noise: bool = True, instance_norm: bool = True,
                 const_input: bool = True, blur_taps: tuple[float, ...] | None = (1, 2, 1)):
        super().__init__(resolution, progressive)
        log2 = resolution_log2(resolution, "stylegan")
        channels = {2**i: channels_at(2**i, fmap_base, fmap_max) for i in range(2, log2 + 1)}
        self.num_ws = 2 * log2 - 2
        first = channels[4]
        if const_input:
            self.const = nn.Parameter(torch.ones(1, first, 4, 4))
        else:
            self.dense = EqualizedLinear(w_dim, first * 16, gain=SQRT2 / 4, bias=False)
        self.convs = nn.ModuleList([nn.Identity()])  # the 4×4 input has no convolution before its first epilogue
        self.epilogues = nn.ModuleList()
        blur = [FIRFilter(blur_taps, padding=len(blur_taps) // 2)] if blur_taps else []
        for res, chs in channels.items():
            if res == 4:
                self.convs.append(EqualizedConv2d(chs, chs, 3, bias=False))
            else:
                self.convs.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                EqualizedConv2d(channels[res // 2], chs, 3, bias=False), *blur))
                self.convs.append(EqualizedConv2d(chs, chs, 3, bias=False))
            self.epilogues.extend(StyleEpilogue(chs, res, w_dim, use_noise, instance_norm) for _ in range(2))
        self.to_rgb = nn.ModuleDict({str(res): EqualizedConv2d(chs, out_chans, 1, gain=1.0)
                                     for res, chs in channels.items() if progressive or res == resolution})

    def feature_map_modules(self) -> dict[str, nn.Module]:
        """Each synthesis convolution of the current resolution by name (``"8px.conv0"``): its output is the
        feature map before noise, bias, activation and AdaIN, where the blob artefact shows (StyleGAN2's Figure 1)."""
        return {f"{4 << (index // 2)}px.conv{index % 2}": self.convs[index] for index in range(1, self.active_ws)}

    @property
    def active_ws(self) -> int:
        """The latents the current resolution uses: two per resolution grown so far."""
        return 2 * (self.current_resolution.bit_length() - 2)

    def forward(self, ws: Tensor, noise: str = "random") -> Tensor:
        if hasattr(self, "const"):
            x = self.const.expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.dense(ws[:, 0]).reshape(ws.shape[0], -1, 4, 4)
        previous = x
        for index in range(self.active_ws):
            if index >= 2 and index % 2 == 0:  # the first layer of a new resolution
                previous = x
            x = self.epilogues[index](self.convs[index](x), ws[:, index], noise)
        return self.to_image(self.to_rgb, previous, x)


class StyleGANBase(GAN):
    """What StyleGAN and StyleGAN2 share: a :class:`StyleGenerator`, style mixing and the W average in training,
    the truncation trick and :meth:`mix` for images, the non-saturating logistic loss with R1 (every
    ``r1_interval`` minibatches, lazy and scaled by it when above 1), Adam with lazy regularisation's ``c / (c + 1)``,
    and the mapping network as its own param group."""

    generator: StyleGenerator
    # The generator's lazy regulariser (StyleGAN2's path length): its interval and whether it is on.
    g_reg_interval: int = 1
    g_reg_on: bool = False

    def __init__(self, generator: StyleGenerator, discriminator: nn.Module, *, latent_dim: int, image_size: int,
                 in_chans: int, num_classes: int, conditional: bool, style_mixing: float, r1_gamma: float,
                 r1_interval: int, lr: float, betas: tuple[float, float], kimg_per_phase: float | None = None):
        super().__init__(generator, discriminator, latent_dim, image_size, in_chans, num_classes, conditional,
                         kimg_per_phase)
        self.style_mixing = float(style_mixing)
        self.r1_gamma, self.r1_interval = float(r1_gamma), int(r1_interval)
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)

    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    def sync_copy(self, generator: nn.Module) -> None:
        super().sync_copy(generator)
        if generator is not self.generator:
            generator.mapping.w_avg.copy_(self.generator.mapping.w_avg)

    def run_generator(self, generator: nn.Module, z: Tensor, labels: Tensor | None, truncation: float,
                      truncation_cutoff: int | None, noise: str) -> Tensor:
        return generator(z, labels, truncation, truncation_cutoff, noise)

    def training_fakes(self, z: Tensor, labels: Tensor | None) -> Tensor:
        return self.generator(z, labels, mixing_prob=self.style_mixing, update_w_avg=True)

    @torch.no_grad()
    def mix(self, z1: Tensor, z2: Tensor, crossover: int, labels: Tensor | None = None,
            generator_module: nn.Module | None = None, truncation: float = 1.0,
            truncation_cutoff: int | None = None, noise: str = "const") -> Tensor:
        """Style mixing for figures: images ``Tensor[n, C, image_size, image_size]`` in [-1, 1] whose first
        ``crossover`` layers take ``z1``'s w and the rest ``z2``'s (the paper's Figure 3: coarse styles from the
        first, the finer ones from the second)."""
        net = self.generator if generator_module is None else generator_module
        self.sync_copy(net)
        if not 0 <= crossover <= net.num_ws:
            raise UserError(f"crossover must lie in [0, {net.num_ws}] (the generator's layers), got {crossover}.")
        labels = self.labels_for(labels, z1.shape[0], z1.device, default="cycle")
        ws1, ws2 = (net.ws(z, labels, truncation, truncation_cutoff) for z in (z1, z2))
        images = net.synthesis(torch.cat([ws1[:, :crossover], ws2[:, crossover:]], dim=1), check_noise_mode(noise))
        return upsample_nearest(images, self.image_size // images.shape[-1]).clamp(-1.0, 1.0)

    def discriminator_terms(self, real: Tensor, fake: Tensor, labels: Tensor | None, step: int) -> dict[str, Tensor]:
        with_r1 = due(step, self.r1_interval, self.r1_gamma)
        real = real.detach().requires_grad_(with_r1)
        real_scores = self.discriminator(real, labels)
        terms = {"loss_d": logistic_discriminator_loss(real_scores, self.discriminator(fake, labels))}
        if with_r1:
            terms["loss_r1"] = r1_penalty(real_scores, real) * (self.r1_gamma / 2) * self.r1_interval
        return terms

    def generator_terms(self, fake_scores: Tensor, batch_size: int, labels: Tensor | None,
                        step: int) -> dict[str, Tensor]:
        return {"loss_g": logistic_generator_loss(fake_scores)}

    def param_groups(self, network: nn.Module) -> list[dict[str, Any]]:
        """The generator as two named groups, ``mapping`` and ``synthesis``, at the same lr: the mapping's 0.01
        multiplier is inside its layers (the equalised lr's run-time scale, as the official code), so it holds for
        any optimizer; a group lr of 0.01 × would apply it twice."""
        if network is not self.generator:
            return super().param_groups(network)
        return [{"name": "mapping", "params": list(self.generator.mapping.parameters())},
                {"name": "synthesis", "params": list(self.generator.synthesis.parameters())}]

    def adam_settings(self) -> dict[str, dict[str, Any]]:
        return {"generator": lazy_adam(self.lr, self.betas, self.g_reg_interval, self.g_reg_on),
                "discriminator": lazy_adam(self.lr, self.betas, self.r1_interval, self.r1_gamma > 0)}


class StyleGAN(StyleGANBase):
    """StyleGAN: mapping + :class:`StyleSynthesis`, ProGAN's discriminator with blur, logistic loss + R1.

    Parameters counted by cvlab (every trainable tensor: mapping, constant, convolutions, noise strengths, biases,
    style affines, a toRGB per resolution; not the buffers ``w_avg`` and the constant noise):

    =================================================================  ===========  ===========
    variant                                                            G params     D params
    =================================================================  ===========  ===========
    paper: 1024 px, 3 channels, z = w = 512, fmap_base 8192, max 512   26,219,627   23,087,249
    conf/model/stylegan.yaml: 32 px, 1 channel, z = w = 128, 512/128   898,148      845,537
    =================================================================  ===========  ===========

    The paper's 26.2 M generator (against 23.1 M for ProGAN's) is matched exactly; the discriminator is ProGAN's,
    whose blur has no parameters.

    Args:
        image_size / in_chans / num_classes / conditional / fmap_base / fmap_max / progressive / kimg_per_phase /
            mbstd_group: as :class:`~cvlab.models.generators.progan.ProGAN`.
        latent_dim (z) / w_dim: 512 / 512. mapping_layers: 8. mapping_lr_mul: 0.01. w_avg_beta: 0.995.
        style_mixing: the probability of mixing in training (0.9; 0 = off). use_noise / instance_norm /
            const_input / blur: the paper's pieces, each switchable (``blur=false`` drops the [1, 2, 1] filter in
            G and D).
        r1_gamma (γ, 0 = off) / r1_interval (1: every step, as StyleGAN; above 1: lazy). lr / betas: Adam's.
    """

    def __init__(self, image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
                 latent_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8, mapping_lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995, fmap_base: int = 8192, fmap_max: int = 512, progressive: bool = True,
                 kimg_per_phase: float = 1200.0, style_mixing: float = 0.9, use_noise: bool = True,
                 instance_norm: bool = True, const_input: bool = True, blur: bool = True, mbstd_group: int = 4,
                 r1_gamma: float = 10.0, r1_interval: int = 1, lr: float = 0.001,
                 betas: tuple[float, float] = (0.0, 0.99), norm_layer: Any = None, act_layer: Any = None,
                 attn_layer: Any = None):
        refuse_layer_options("stylegan", norm_layer, act_layer, attn_layer)
        classes = num_classes if conditional else 0
        blur_taps = (1, 2, 1) if blur else None
        mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, lr_mul=mapping_lr_mul, num_classes=classes,
                                 w_avg_beta=w_avg_beta)
        synthesis = StyleSynthesis(w_dim, image_size, in_chans, fmap_base, fmap_max, progressive, use_noise,
                                   instance_norm, const_input, blur_taps)
        discriminator = ProGANDiscriminator(image_size, in_chans, fmap_base, fmap_max, classes, mbstd_group,
                                            progressive, blur_taps)
        super().__init__(StyleGenerator(mapping, synthesis), discriminator, latent_dim=latent_dim,
                         image_size=image_size, in_chans=in_chans, num_classes=num_classes, conditional=conditional,
                         style_mixing=style_mixing, r1_gamma=r1_gamma, r1_interval=r1_interval, lr=lr, betas=betas,
                         kimg_per_phase=kimg_per_phase)


@register_model(task="generation")
def stylegan(image_size: int = 1024, in_chans: int = 3, num_classes: int = 0, conditional: bool = False,
             **kwargs) -> StyleGAN:
    """StyleGAN (Karras et al. 2019): mapping network, AdaIN, constant input, noise, style mixing, truncation,
    progressive growing, logistic loss + R1."""
    return StyleGAN(image_size, in_chans, num_classes, conditional, **kwargs)
