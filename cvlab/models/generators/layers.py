"""Building blocks shared by the GAN generators and discriminators (ProGAN, StyleGAN, StyleGAN2).

Papers:
    Karras, Aila, Laine & Lehtinen 2018, "Progressive Growing of GANs for Improved Quality, Stability, and Variation"
        (ProGAN): equalised learning rate, pixelwise feature normalisation, minibatch standard deviation,
        progressive growing with fade-in.
    Karras, Laine & Aila 2019, "A Style-Based Generator Architecture for Generative Adversarial Networks"
        (StyleGAN): the mapping network with a learning-rate multiplier, the tracked average of W and the
        truncation trick, per-pixel noise inputs.
    Karras, Laine, Aittala, Hellsten, Lehtinen & Aila 2020, "Analyzing and Improving the Image Quality of StyleGAN"
        (StyleGAN2): modulated convolution with weight demodulation, FIR resampling.
    Miyato & Koyama 2018, "cGANs with Projection Discriminator": the label projection of the conditional option.

Written by hand: none of torch, torchvision or timm has these layers. Each follows the official code's layout
(tkarras/progressive_growing_of_gans ``networks.py``, NVlabs/stylegan ``networks_stylegan.py``,
NVlabs/stylegan2-ada-pytorch ``training/networks.py``, read, not copied); where the form differs it says so.

Equalised learning rate: a weight is stored as ``N(0, 1) / lr_mul`` and multiplied at run time by
``weight_gain = gain · lr_mul / sqrt(fan_in)`` (He's constant, with ``gain = sqrt(2)`` before a leaky ReLU), the bias
by ``lr_mul``. Adam's step is then the same relative size for every layer, and ``lr_mul`` scales the effective rate
of a layer (the mapping network's 0.01) whatever optimizer trains it. ``equalized=False`` stores the He-initialised
weight itself (ProGAN's ablation). These layers are plain ``nn.Module``s, not ``nn.Conv2d`` / ``nn.Linear``, so
cvlab's ``init=`` schemes leave their unit-variance weights alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.utils.errors import UserError

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2  # every network of the three papers uses leaky ReLU with slope 0.2


def channels_at(resolution: int, fmap_base: int, fmap_max: int) -> int:
    """The papers' feature-map count at ``resolution``: ``min(fmap_base / 2^stage, fmap_max)`` with
    ``stage = log2(resolution) - 1`` (ProGAN's and StyleGAN's ``nf(stage)``; StyleGAN2-ADA's ``channel_base // res``
    with ``channel_base = 2 · fmap_base``)."""
    channels = min(2 * fmap_base // resolution, fmap_max)
    if channels < 1:
        raise UserError(f"fmap_base={fmap_base} leaves no feature maps at {resolution} px; raise model.fmap_base to "
                        f"at least {resolution // 2}.")
    return channels


def resolution_log2(image_size: int, model: str) -> int:
    """log2 of ``image_size``; a UserError unless it is a power of two of at least 4."""
    log2 = int(image_size).bit_length() - 1
    if image_size < 4 or image_size != 2**log2:
        raise UserError(f"{model} needs data.image_size to be a power of two of at least 4 (4, 8, 16, 32, 64, ...), "
                        f"got {image_size}.")
    return log2


# ---------------------------------------------------------------------------------------------- equalised layers
def equalized_scales(he_std: float, lr_mul: float, equalized: bool) -> tuple[float, float]:
    """(init std, run-time weight gain): ``(1 / lr_mul, he_std · lr_mul)`` with the equalised learning rate; without
    it (ProGAN's ``use_wscale=False``) the He init is stored, ``(he_std / lr_mul, lr_mul)``."""
    return (1.0 / lr_mul, he_std * lr_mul) if equalized else (he_std / lr_mul, lr_mul)


class EqualizedLinear(nn.Module):
    """Fully connected layer with the equalised learning rate (module docstring).
    ``Tensor[N, in_features] → Tensor[N, out_features]``."""

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, lr_mul: float = 1.0,
                 bias: bool = True, bias_init: float = 0.0, equalized: bool = True):
        super().__init__()
        self.lr_mul = float(lr_mul)
        self.bias_init = float(bias_init)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.init_std, self.weight_gain = equalized_scales(gain / math.sqrt(in_features), self.lr_mul, equalized)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_init / self.lr_mul)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.lr_mul
        return F.linear(x, self.weight * self.weight_gain, bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"{in_features}, {out_features}, lr_mul={self.lr_mul:g}, bias={self.bias is not None}"


class EqualizedConv2d(nn.Module):
    """Convolution with the equalised learning rate, ``padding = kernel // 2`` unless given (module docstring).
    ``Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H', W']``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, gain: float = SQRT2, bias: bool = True,
                 stride: int = 1, padding: int | None = None, equalized: bool = True):
        super().__init__()
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_chs)) if bias else None
        self.init_std, self.weight_gain = equalized_scales(gain / math.sqrt(in_chs * kernel_size**2), 1.0, equalized)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_chs, in_chs, kernel, _ = self.weight.shape
        return (f"{in_chs}, {out_chs}, kernel_size={kernel}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")


class ScaledLeakyReLU(nn.Module):
    """``gain · leaky_relu(x, 0.2)``: StyleGAN2's activation, whose ``sqrt(2)`` (times the residual ``sqrt(0.5)``
    where one is due) is applied after the non-linearity instead of inside the weight."""

    def __init__(self, gain: float = SQRT2):
        super().__init__()
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, LRELU_SLOPE) * self.gain


def leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LRELU_SLOPE)


def conv_act(in_chs: int, out_chs: int, kernel_size: int, act_gain: float | None = None, equalized: bool = True,
             **conv_options) -> nn.Sequential:
    """Equalised convolution then leaky ReLU 0.2. ``act_gain=None``: the He gain ``sqrt(2)`` in the weight
    (ProGAN, StyleGAN); a number: gain 1 in the weight and ``act_gain`` after the activation (StyleGAN2)."""
    if act_gain is None:
        return nn.Sequential(EqualizedConv2d(in_chs, out_chs, kernel_size, equalized=equalized, **conv_options),
                             leaky_relu())
    return nn.Sequential(EqualizedConv2d(in_chs, out_chs, kernel_size, gain=1.0, equalized=equalized,
                                         **conv_options), ScaledLeakyReLU(act_gain))


class PixelNorm(nn.Module):
    """ProGAN's pixelwise feature vector normalisation: ``x / sqrt(mean_c(x²) + 1e-8)`` over ``dim`` (the channels
    of a feature map, or the features of a latent vector)."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * (x.square().mean(dim=self.dim, keepdim=True) + self.eps).rsqrt()


class MinibatchStd(nn.Module):
    """Minibatch standard deviation (ProGAN): the standard deviation of each feature over groups of ``group_size``
    samples, averaged over channels and pixels, appended as one more channel.
    ``Tensor[N, C, H, W] → Tensor[N, C + 1, H, W]``.

    The group is ``min(group_size, N)``; where that does not divide ``N`` (a last, short batch), the largest divisor of
    ``N`` below it (the official code requires divisibility instead).
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        group = min(self.group_size, n)
        while n % group:
            group -= 1
        y = x.reshape(group, -1, c, h, w).float()
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # [n / group, C, H, W]
        y = y.mean(dim=(1, 2, 3)).to(x.dtype)  # [n / group]
        y = y.reshape(1, -1, 1, 1, 1).expand(group, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y], dim=1)


# ---------------------------------------------------------------------------------------------- resampling
def upsample_nearest(x: Tensor, factor: int = 2) -> Tensor:
    """ProGAN's ``upscale2d``: every pixel repeated ``factor × factor`` times."""
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def downsample_box(x: Tensor, factor: int = 2) -> Tensor:
    """ProGAN's ``downscale2d``: the mean of each ``factor × factor`` box."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


class FIRFilter(nn.Module):
    """A separable low-pass FIR filter (``taps`` ⊗ ``taps``, normalised to sum 1), applied per channel, as
    StyleGAN's ``blur2d`` and StyleGAN2's ``upfirdn2d``:

    - ``up=2``: zero-insertion upsampling then the filter, with gain 4 (StyleGAN2's ``upsample2d``; even taps),
      ``Tensor[N, C, H, W] → Tensor[N, C, 2H, 2W]``;
    - ``down=2``: the filter then every second pixel (``downsample2d``), ``→ Tensor[N, C, H / 2, W / 2]``;
    - otherwise the filter with ``padding`` zeros on each side (a blur; before a stride-2 convolution in
      StyleGAN2's discriminator).

    The default padding keeps the size a multiple of the input, as ``upfirdn2d`` does.
    """

    def __init__(self, taps: Sequence[float], up: int = 1, down: int = 1, padding: int | None = None):
        super().__init__()
        taps = torch.as_tensor(taps, dtype=torch.float32)
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.up, self.down = up, down
        size = len(taps)
        if up > 1 and (up != 2 or size % 2):
            raise ValueError("FIRFilter upsamples by 2 with an even number of taps")
        # upfirdn2d's padding for a factor-2 resampling; a blur keeps the size.
        self.padding = (size - 2) // 2 if up > 1 else ((size - down) // 2 if padding is None else padding)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        if self.up > 1:
            # A stride-2 transposed convolution with the filter is zero-insertion followed by the filter.
            kernel = (self.kernel * self.up**2).to(x.dtype).expand(channels, 1, *self.kernel.shape)
            return F.conv_transpose2d(x, kernel, stride=self.up, padding=self.padding, groups=channels)
        kernel = self.kernel.to(x.dtype).expand(channels, 1, *self.kernel.shape)
        return F.conv2d(x, kernel, stride=self.down, padding=self.padding, groups=channels)


# ---------------------------------------------------------------------------------------------- style pieces
class NoiseInjection(nn.Module):
    """StyleGAN's per-pixel noise: ``x + strength · noise``, one ``Tensor[N, 1, H, W]`` of N(0, 1) noise shared by
    all channels, the strength learned per channel (StyleGAN) or one scalar per layer (StyleGAN2), starting at 0.

    ``mode``: ``"random"`` (fresh noise each call), ``"const"`` (the layer's fixed noise buffer, so an image is a
    function of its latent alone) or ``"none"``.
    """

    MODES = ("random", "const", "none")

    def __init__(self, channels: int, resolution: int, per_channel: bool):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels if per_channel else ()))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: Tensor, mode: str = "random") -> Tensor:
        if mode == "none":
            return x
        if mode == "const":
            noise = self.noise_const.to(x.dtype)
        else:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        strength = self.strength.reshape(1, -1, 1, 1) if self.strength.ndim else self.strength
        return x + noise * strength


def check_noise_mode(mode: str) -> str:
    if mode not in NoiseInjection.MODES:
        raise UserError(f"noise must be one of {', '.join(NoiseInjection.MODES)}, got {mode!r}.")
    return mode


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution: the weight scaled per input channel by the style ``s = A(w)`` (an affine
    layer, bias 1 at the start) and, with ``demodulate``, per output channel by ``1 / sqrt(Σ_{i,k} (w'_{o,i,k} s_i)²
    + 1e-8)``, so that unit-variance inputs give unit-variance outputs (the paper's eq. 3, which replaces AdaIN's
    instance normalisation). ``up=True`` upsamples by 2 before the convolution with the ``[1, 3, 3, 1]`` FIR filter.

    Computed as the official code does in training (``fused_modconv=False``): the activations are scaled by the
    styles, convolved with the shared weight and scaled by the demodulation coefficients: the same result as the
    per-sample weights, without a grouped convolution. The equalised-lr gain ``1 / sqrt(fan_in)`` is applied as in
    the TensorFlow code (the PyTorch port drops it where demodulation cancels it; without demodulation it keeps the
    output variance at 1). The official upsampling layer is a transposed convolution then the filter; here the filter
    comes first, the same linear, shift-invariant operator but for the border.
    ``(Tensor[N, in_chs, H, W], Tensor[N, w_dim]) → Tensor[N, out_chs, H', W']``.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, w_dim: int, demodulate: bool = True,
                 up: bool = False, resample_taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.demodulate = demodulate
        self.affine = EqualizedLinear(w_dim, in_chs, gain=1.0, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_chs, in_chs, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_chs * kernel_size**2)
        self.padding = kernel_size // 2
        self.upsample = FIRFilter(resample_taps, up=2) if up else None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        out_chs, in_chs, kernel, _ = self.weight.shape
        return f"{in_chs}, {out_chs}, kernel_size={kernel}, demodulate={self.demodulate}"

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w)  # [N, in_chs]
        weight = self.weight * self.weight_gain
        x = x * styles[:, :, None, None]
        if self.upsample is not None:
            x = self.upsample(x)
        x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # Σ_{i,k} (w_{o,i,k} s_i)² = Σ_i s_i² · Σ_k w_{o,i,k}²
            dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()  # [N, out_chs]
            x = x * dcoefs[:, :, None, None]
        return x


class MappingNetwork(nn.Module):
    """StyleGAN's mapping network ``z → w``: the latent normalised (pixel norm), ``num_layers`` equalised fully
    connected layers with leaky ReLU, each with the learning-rate multiplier ``lr_mul`` (0.01: the mapping learns 100×
    slower than the synthesis network), and the moving average ``w_avg`` of W (decay ``w_avg_beta``, updated in
    ``update_w_avg=True``: the training passes), which the truncation trick pulls towards.

    ``num_classes > 0`` (the conditional option): the label embedded by one layer (a learned vector per class, as
    StyleGAN2-ADA's ``embed``), normalised and concatenated to the normalised latent.

    Each layer's gain ``sqrt(2)`` sits in the weight as in StyleGAN's code (StyleGAN2-ADA applies it after the
    activation; the two differ only in how the bias is scaled, which starts at 0).

    ``forward(z: Tensor[N, z_dim], labels: Tensor[N] | None) → Tensor[N, w_dim]``.
    """

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, hidden_dim: int | None = None,
                 lr_mul: float = 0.01, num_classes: int = 0, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim = z_dim, w_dim
        self.w_avg_beta = w_avg_beta
        self.normalize = PixelNorm()
        self.embed = LabelEmbedding(num_classes, w_dim) if num_classes else None
        hidden_dim = hidden_dim or w_dim
        features = [z_dim + (w_dim if num_classes else 0)] + [hidden_dim] * (num_layers - 1) + [w_dim]
        layers = []
        for in_features, out_features in zip(features, features[1:]):
            layers += [EqualizedLinear(in_features, out_features, lr_mul=lr_mul), leaky_relu()]
        self.layers = nn.Sequential(*layers)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, labels: Tensor | None = None, update_w_avg: bool = False) -> Tensor:
        x = self.normalize(z)
        if self.embed is not None:
            x = torch.cat([x, self.normalize(self.embed(labels))], dim=1)
        w = self.layers(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return w

    def truncate(self, ws: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
        """The truncation trick: ``w_avg + psi · (w - w_avg)`` for the first ``cutoff`` of the per-layer latents
        ``Tensor[N, num_ws, w_dim]`` (all with ``cutoff=None``), the others unchanged."""
        if psi == 1:
            return ws
        truncated = self.w_avg.lerp(ws, psi)
        if cutoff is None:
            return truncated
        return torch.cat([truncated[:, :cutoff], ws[:, cutoff:]], dim=1)


# ---------------------------------------------------------------------------------------------- conditioning
class LabelEmbedding(nn.Module):
    """A learned ``dim``-vector per class: an equalised fully connected layer on the one-hot label (gain 1, as
    StyleGAN2-ADA's ``embed``). ``Tensor[N] (class indices) → Tensor[N, dim]``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.layer = EqualizedLinear(num_classes, dim, gain=1.0)

    def forward(self, labels: Tensor) -> Tensor:
        return self.layer(F.one_hot(labels.long(), self.num_classes).to(self.layer.weight.dtype))


class DiscriminatorOutput(nn.Module):
    """A discriminator's last layer: one equalised fully connected layer to the score (gain 1). With
    ``num_classes > 0`` the projection discriminator as in StyleGAN2-ADA: the layer gives ``cmap_dim`` features,
    and the score is their dot product with the label's learned embedding, over ``sqrt(cmap_dim)`` (StyleGAN2-ADA
    maps the label through an 8-layer network first; one embedding layer keeps it simple).
    ``(Tensor[N, in_features], Tensor[N] | None) → Tensor[N]``."""

    def __init__(self, in_features: int, num_classes: int = 0, cmap_dim: int | None = None, equalized: bool = True):
        super().__init__()
        cmap_dim = cmap_dim or in_features
        self.cmap_dim = cmap_dim if num_classes else 0
        self.out = EqualizedLinear(in_features, self.cmap_dim or 1, gain=1.0, equalized=equalized)
        self.embed = LabelEmbedding(num_classes, cmap_dim) if num_classes else None

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.out(x)
        if self.embed is None:
            return x[:, 0]
        return (x * self.embed(labels)).sum(dim=1) / math.sqrt(self.cmap_dim)


class DiscriminatorEpilogue(nn.Module):
    """The 4×4 end of every discriminator of the three papers: minibatch standard deviation (``mbstd_group > 1``;
    one more channel), a 3×3 convolution back to ``channels``, a fully connected layer to ``hidden`` features,
    each with leaky ReLU, and the output layer (:class:`DiscriminatorOutput`). ``act_gain`` as :func:`conv_act`.
    ``(Tensor[N, channels, 4, 4], Tensor[N] | None) → Tensor[N]``."""

    def __init__(self, channels: int, hidden: int, num_classes: int = 0, mbstd_group: int = 4,
                 act_gain: float | None = None, equalized: bool = True):
        super().__init__()
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group > 1 else None
        self.conv = conv_act(channels + (self.mbstd is not None), channels, 3, act_gain, equalized)
        fc_gain = SQRT2 if act_gain is None else 1.0
        self.fc = nn.Sequential(EqualizedLinear(channels * 16, hidden, gain=fc_gain, equalized=equalized),
                                leaky_relu() if act_gain is None else ScaledLeakyReLU(act_gain))
        self.output = DiscriminatorOutput(hidden, num_classes, equalized=equalized)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        return self.output(self.fc(self.conv(x).flatten(1)), labels)


# ---------------------------------------------------------------------------------------------- progressive growing
class Progressive(nn.Module):
    """State of a progressively grown network (ProGAN; StyleGAN's progressive form) built for ``resolution``: the
    ``phase`` (0 = 4×4, ``num_phases - 1`` = ``resolution``) and the fade-in ``alpha`` of the newest block (0: the
    previous phase's output, upsampled; 1: the new block alone). Plain numbers, kept in the state dict as the
    module's extra state (one float64 tensor), so a checkpoint restores them. A new network starts fully grown
    (the last phase, alpha 1); a non-progressive one has a single phase at ``resolution``."""

    def __init__(self, resolution: int, progressive: bool):
        super().__init__()
        self.resolution = resolution
        self.num_phases = resolution.bit_length() - 2 if progressive else 1
        self.phase, self.alpha = self.num_phases - 1, 1.0

    @property
    def fading(self) -> bool:
        """Whether the newest block is still fading in (a phase after the first, alpha below 1)."""
        return self.phase > 0 and self.alpha < 1.0

    @property
    def current_resolution(self) -> int:
        return self.resolution >> (self.num_phases - 1 - self.phase)

    def set_progress(self, phase: int, alpha: float = 1.0) -> None:
        if not 0 <= phase < self.num_phases or not 0.0 <= alpha <= 1.0:
            raise UserError(f"progress takes a phase in [0, {self.num_phases - 1}] and alpha in [0, 1], "
                            f"got phase {phase}, alpha {alpha}.")
        self.phase, self.alpha = int(phase), float(alpha)

    def get_extra_state(self) -> Tensor:
        # A tensor, not a dict: checkpoints hold named tensors only (cvlab.utils.safety reads nothing else).
        return torch.tensor([self.phase, self.alpha], dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        self.set_progress(int(state[0]), float(state[1]))

    def to_image(self, to_rgb: nn.ModuleDict, previous: Tensor | None, current: Tensor) -> Tensor:
        """The image of a generator grown to the current resolution: ``to_rgb[res]`` of the newest block's features
        ``current`` and, while it fades in, blended with the previous resolution's image of ``previous`` (the
        features before the newest block), upsampled (nearest), as ProGAN and StyleGAN grow."""
        resolution = current.shape[-1]
        image = to_rgb[str(resolution)](current)
        if self.fading:
            image = fade_in(upsample_nearest(to_rgb[str(resolution // 2)](previous)), image, self.alpha)
        return image

    def from_image(self, from_rgb: nn.ModuleDict, block: nn.Module | None, image: Tensor) -> Tensor:
        """A discriminator's features after its newest ``block`` (None at 4×4) for ``image`` at the current
        resolution: ``block(from_rgb[res](image))``, while fading in blended with ``from_rgb[res / 2]`` of the image
        box-downsampled."""
        resolution = image.shape[-1]
        x = from_rgb[str(resolution)](image)
        if block is None:
            return x
        x = block(x)
        if self.fading:
            x = fade_in(from_rgb[str(resolution // 2)](downsample_box(image)), x, self.alpha)
        return x


def fade_in(previous: Tensor, current: Tensor, alpha: float) -> Tensor:
    """The fade-in of a new block (ProGAN): ``(1 - alpha) · previous + alpha · current``."""
    return previous.lerp(current, alpha)
