"""Convolutional autoencoder; its reconstruction error is the anomaly score.

Papers: Masci, Meier, Cireşan & Schmidhuber 2011, "Stacked Convolutional Auto-Encoders for Hierarchical Feature
Extraction" (the convolutional autoencoder); the reconstruction error of an autoencoder trained on normal data alone
as the novelty score: Japkowicz, Myers & Gluck 1995, "A Novelty Detection Approach to Classification", and Sakurada &
Yairi 2014, "Anomaly Detection Using Autoencoders with Nonlinear Dimensionality Reduction". The small convolutional
form is the DCAE baseline of Ruff et al. 2018, "Deep One-Class Classification".

Layout: an encoder of stride-2 3×3 conv-norm-act stages (``widths``), flattened into a linear bottleneck of
``latent_dim`` values; a decoder that mirrors it: a linear layer and an activation back to the last stage's map,
then per stage a nearest-neighbour 2× upsampling and a 3×3 conv-norm-act (upsample-then-convolve rather than a
transposed convolution, which leaves checkerboard artefacts: Odena, Dumoulin & Olah 2016), the last one a plain
biased 3×3 conv to the image channels, without activation: the images arrive normalised, so unbounded. The network
learns to reproduce what it was shown; the narrow bottleneck keeps it from reproducing everything, so an image unlike
the normal ones comes back worse. Score: the mean squared error over an image's pixels (in the normalised space the
data gives), higher for a more anomalous image.

Written by hand: no library cvlab uses has a convolutional autoencoder (torchvision has none).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.anomaly import AnomalyDetector
from cvlab.utils.errors import UserError


class EncoderStage(nn.Sequential):
    """A 3×3 stride-2 conv → norm → act (halves the map), then ``attn_layer(out_chs)`` when given."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        layers = [ConvNormAct(in_chs, out_chs, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)]
        if attn_layer is not None:
            layers.append(attn_layer(out_chs))
        super().__init__(*layers)


class DecoderStage(nn.Sequential):
    """A 2× nearest-neighbour upsampling and a 3×3 conv → norm → act (doubles the map), then ``attn_layer(out_chs)``
    when given."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: NormFactory | None, act_layer: ActFactory,
                 attn_layer: AttnFactory | None):
        layers = [nn.Upsample(scale_factor=2, mode="nearest"),
                  ConvNormAct(in_chs, out_chs, 3, norm_layer=norm_layer, act_layer=act_layer)]
        if attn_layer is not None:
            layers.append(attn_layer(out_chs))
        super().__init__(*layers)


class ConvAutoencoder(AnomalyDetector):
    """See the module docstring. ``forward(images: Tensor[N, C, H, W])`` gives the reconstruction
    ``Tensor[N, C, H, W]``; :meth:`encode` the code ``Tensor[N, latent_dim]``; :meth:`anomaly_score` the per-image
    mean squared reconstruction error ``Tensor[N]``.

    =====================================================  =====================  ============
    variant                                                input                  params
    =====================================================  =====================  ============
    autoencoder (widths 32, 64; latent 16: the defaults)   1 x 8 x 8 (digits)     46,161
    autoencoder (widths 32, 64; latent 16)                 3 x 32 x 32 (CIFAR)    174,035
    =====================================================  =====================  ============

    Args:
        in_chans / image_size: the images' channels and side; the side must be a multiple of ``2 ** len(widths)``.
        widths: the encoder stages' channels (each halves the map); the decoder mirrors them.
        latent_dim: the bottleneck's width.
        norm_layer: default BatchNorm. act_layer: default ReLU. attn_layer: after every stage's conv, when given.
    """

    def __init__(self, in_chans: int = 1, image_size: int = 8, widths: Sequence[int] = (32, 64), latent_dim: int = 16,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        super().__init__()
        widths = tuple(int(width) for width in widths)
        if not widths or min(widths) < 1 or latent_dim < 1:
            raise UserError(f"autoencoder: model.widths must list at least one positive width and model.latent_dim be "
                            f"positive, got {list(widths)} and {latent_dim}.")
        stride = 2 ** len(widths)
        if image_size % stride:
            fitting = max(stride, image_size // stride * stride)
            raise UserError(f"autoencoder: data.image_size={image_size} is no multiple of {stride} (its "
                            f"{len(widths)} stride-2 stages halve it exactly); set data.image_size={fitting} or "
                            "fewer model.widths.")
        act_layer = act_layer or nn.ReLU
        self.in_chans, self.image_size, self.latent_dim = in_chans, image_size, latent_dim
        self.map_shape = (widths[-1], image_size // stride, image_size // stride)
        flat = widths[-1] * (image_size // stride) ** 2
        self.encoder = nn.Sequential(*[EncoderStage(c_in, c_out, norm_layer, act_layer, attn_layer)
                                       for c_in, c_out in zip((in_chans, *widths), widths)])
        self.bottleneck = nn.Linear(flat, latent_dim)
        self.expand = nn.Sequential(nn.Linear(latent_dim, flat), act_layer())
        self.decoder = nn.Sequential(*[DecoderStage(c_in, c_out, norm_layer, act_layer, attn_layer)
                                       for c_in, c_out in zip(widths[::-1], widths[-2::-1])])
        self.output = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(widths[0], in_chans, 3, padding=1))

    def encode(self, images: Tensor) -> Tensor:
        return self.bottleneck(self.encoder(images).flatten(1))

    def decode(self, codes: Tensor) -> Tensor:
        return self.output(self.decoder(self.expand(codes).view(-1, *self.map_shape)))

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))

    def anomaly_score(self, images: Tensor) -> Tensor:
        return (self(images) - images).square().flatten(1).mean(1)

    def training_loss(self, images: Tensor) -> Tensor:
        return self.anomaly_score(images).mean()


@register_model(task="anomaly")
def autoencoder(in_chans: int = 1, image_size: int = 8, widths: Sequence[int] = (32, 64), latent_dim: int = 16,
                norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                attn_layer: AttnFactory | None = None) -> ConvAutoencoder:
    """Convolutional autoencoder (Masci et al. 2011) scoring by reconstruction error."""
    return ConvAutoencoder(in_chans, image_size, widths, latent_dim, norm_layer, act_layer, attn_layer)
