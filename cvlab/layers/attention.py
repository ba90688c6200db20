"""Attention blocks that plug into a CNN: each maps ``Tensor[N, C, H, W]`` to a tensor of the same shape.

Channel attention
    * Squeeze-and-Excitation — Hu et al. 2018, "Squeeze-and-Excitation Networks".
    * Selective Kernel — Li et al. 2019, "Selective Kernel Networks" (split / fuse / select).
Mixed channel + spatial
    * CBAM — Woo et al. 2018, "CBAM: Convolutional Block Attention Module".
    * Dual attention — Fu et al. 2019, "Dual Attention Network for Scene Segmentation" (position + channel).
Spatial (self-attention over positions)
    * Non-local block — Wang et al. 2018, "Non-local Neural Networks" (embedded Gaussian form).
    * Self-attention — Zhang et al. 2019, "Self-Attention Generative Adversarial Networks".

torchvision offers only ``torchvision.ops.SqueezeExcitation`` (biased, no ``bias=False``, nothing to share with
CBAM), so every block here is hand-written; the position-wise attention products go through
``torch.nn.functional.scaled_dot_product_attention`` with ``scale=1.0`` because none of these papers divide the
logits by √d.

The self-attention blocks (non-local, self-attention, position / channel attention) start as the identity: their
residual branch is multiplied by a zero-initialised scalar ``gamma`` or ends in a norm whose weight is zero, so
inserting one into a pretrained or freshly initialised network does not change its output at step 0.

``get_attn_layer(name, **kw)`` turns a config name into the ``attn_layer`` factory every model accepts
(an :data:`~cvlab.layers.typing.AttnFactory`: channels → block); ``"none"`` / ``"default"`` give ``None``.
"""
from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.norm import check_choice
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory

_GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid}


def _lookup(table: dict, name: str, what: str):
    """``table[name]``, or a UserError naming the closest valid keys."""
    check_choice(name, table, what)
    return table[name]


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(query · keyᵀ) · value over the last-but-one axis, unscaled as in the papers.

    ``query: Tensor[N, L, D]``, ``key: Tensor[N, S, D]``, ``value: Tensor[N, S, E]`` → ``Tensor[N, L, E]``.
    """
    return F.scaled_dot_product_attention(query, key, value, scale=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Channel attention: SE, SK, CBAM
# --------------------------------------------------------------------------------------------------------------------


class ChannelMLP(nn.Module):
    """The excitation MLP on pooled features: 1×1 conv C→hidden, activation, 1×1 conv hidden→C.

    A 1×1 convolution on ``Tensor[N, C, 1, 1]`` is exactly a fully connected layer on ``Tensor[N, C]``; using
    convolutions keeps the pooled map 4-D and matches torchvision's layout (``fc1``, ``fc2``).
    Parameters: ``2·C·hidden (+ hidden + C with bias)``.
    """

    def __init__(self, channels: int, hidden: int, bias: bool = True, act_layer: ActFactory = nn.ReLU):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(pooled)))


def _hidden_channels(channels: int, reduction: float) -> int:
    # At least one unit, so small C (e.g. 8 with reduction 16) still builds.
    return max(1, int(channels // reduction))


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: ``x · gate(FC(ReLU(FC(GAP(x)))))`` with one weight per channel.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``.

    Args:
        channels: C.
        reduction: hidden width is ``C // reduction`` (16 in the paper).
        bias: biased FC layers as in the authors' Caffe models and torchvision (default); ``False`` gives the
            bias-free form of the study notes' snippet.
        gate: ``"sigmoid"`` (paper) or ``"hard_sigmoid"`` (MobileNetV3's SE).
        squeeze_channels: explicit hidden width, overriding ``reduction`` (MobileNetV3 rounds ``C/4`` to a
            multiple of 8).
        act_layer: activation between the two FC layers (ReLU in both papers).

    ======================  ==========================  =========================
    variant                 params at C=64              SE-ResNet-50 (1000 cls)
    ======================  ==========================  =========================
    ``bias=True``           2·64·4 + 4 + 64 = 580       28,088,024
    ``bias=False``          2·64·4 = 512                28,071,976
    ======================  ==========================  =========================
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        bias: bool = True,
        gate: str = "sigmoid",
        squeeze_channels: int | None = None,
        act_layer: ActFactory = nn.ReLU,
    ):
        super().__init__()
        hidden = squeeze_channels or _hidden_channels(channels, reduction)
        self.mlp = ChannelMLP(channels, hidden, bias=bias, act_layer=act_layer)
        self.gate = _lookup(_GATES, gate, "SE gate")()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.mlp(x.mean((2, 3), keepdim=True)))


class SelectiveKernel(nn.Module):
    """Selective Kernel convolution: branches with different receptive fields, mixed per channel by a softmax.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``.

    * Split: branch ``i`` is a 3×3 grouped conv with dilation ``dilations[i]`` → BN → ReLU, giving ``U_i``
      (dilation 2 stands in for the paper's 5×5 kernel at the cost of a 3×3).
    * Fuse: ``U = Σ U_i``, ``s = GAP(U)``, ``z = ReLU(BN(FC(s)))`` with ``d = max(C // reduction, min_dim)``.
    * Select: one FC ``d → C`` per branch (stored as a single ``d → M·C`` 1×1 conv, which is the same maps),
      softmax across the M branches for every channel, ``V = Σ a_i · U_i``.

    ``groups`` (32, ResNeXt cardinality) is reduced to ``gcd(groups, C)`` so any C works.

    At C=64, defaults: branches ``2·(64·2·9 + 2·64)`` + fuse ``64·32 + 2·32`` + select ``32·2·64`` = 8,768 params.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_dim: int = 32,
        groups: int = 32,
        dilations: Sequence[int] = (1, 2),
        norm_layer: NormFactory | None = None,
    ):
        super().__init__()
        groups = math.gcd(groups, channels)
        self.branches = nn.ModuleList(
            ConvNormAct(channels, channels, 3, groups=groups, dilation=d, norm_layer=norm_layer, act_layer=nn.ReLU)
            for d in dilations
        )
        attn_dim = max(channels // reduction, min_dim)
        self.fuse = ConvNormAct(channels, attn_dim, 1, norm_layer=norm_layer, act_layer=nn.ReLU)
        self.select = nn.Conv2d(attn_dim, channels * len(dilations), 1, bias=False)

    def branch_weights(self, fused: torch.Tensor) -> torch.Tensor:
        """``U = Σ U_i: Tensor[N, C, H, W]`` → softmax weights ``Tensor[N, M, C, 1, 1]`` (sum 1 over M)."""
        logits = self.select(self.fuse(fused.mean((2, 3), keepdim=True)))
        return logits.unflatten(1, (len(self.branches), -1)).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.stack([branch(x) for branch in self.branches], dim=1)  # [N, M, C, H, W]
        return (self.branch_weights(features.sum(1)) * features).sum(1)


class ChannelGate(nn.Module):
    """CBAM's channel attention map: ``sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))`` with one shared MLP.

    ``Tensor[N, C, H, W]`` → gate ``Tensor[N, C, 1, 1]``. ``bias`` as in :class:`SqueezeExcite` (the authors'
    code uses biased linear layers; the study notes' snippet does not).
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        self.mlp = ChannelMLP(channels, _hidden_channels(channels, reduction), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))


class SpatialGate(nn.Module):
    """CBAM's spatial attention map: ``sigmoid(conv_k×k([mean_C(x); max_C(x)]))``.

    ``Tensor[N, C, H, W]`` → gate ``Tensor[N, 1, H, W]``; a single biased conv with 2·k² + 1 parameters, as in the
    paper's equation (no norm).
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate on the re-weighted features.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``. At C=64, defaults: ``(2·64·4 + 4 + 64) + (2·49 + 1)`` = 679
    params.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7, bias: bool = True):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction, bias)
        self.spatial_gate = SpatialGate(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        return x * self.spatial_gate(x)


# --------------------------------------------------------------------------------------------------------------------
# Self-attention over positions and channels: non-local, SAGAN self-attention, DANet
# --------------------------------------------------------------------------------------------------------------------


class NonLocal(nn.Module):
    """Non-local block, embedded Gaussian: ``z = x + BN(W · softmax(θ(x)ᵀ φ(x)) g(x))``.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``. θ, φ, g are biased 1×1 convs to ``inter_channels``
    (C/2); the softmax runs over all positions of φ. The output conv W is followed by a norm whose weight is
    zero-initialised (paper, Sec. 4.1), so the block starts as the identity. ``sub_sample=True`` max-pools φ and g
    by 2, cutting the pairwise cost by 4.

    At C=64, defaults: ``3·(64·32 + 32) + (32·64 + 64) + 2·64`` = 8,480 params.
    """

    def __init__(
        self,
        channels: int,
        inter_channels: int | None = None,
        sub_sample: bool = False,
        norm_layer: NormFactory | None = None,
    ):
        super().__init__()
        inter_channels = inter_channels or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter_channels, 1)
        self.phi = nn.Conv2d(channels, inter_channels, 1)
        self.g = nn.Conv2d(channels, inter_channels, 1)
        self.pool = nn.MaxPool2d(2) if sub_sample else nn.Identity()
        self.out_conv = nn.Conv2d(inter_channels, channels, 1)
        self.norm = (norm_layer or nn.BatchNorm2d)(channels)
        self.reset_parameters()

    keeps_own_init = True  # cvlab.models.create_model and the init group re-apply reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the output norm's weight so the block is the identity; a model whose own init sets every norm
        weight to 1 must call this afterwards."""
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.theta(x).flatten(2).transpose(1, 2)  # [N, HW, C']
        key = self.pool(self.phi(x)).flatten(2).transpose(1, 2)  # [N, H'W', C']
        value = self.pool(self.g(x)).flatten(2).transpose(1, 2)
        y = _attention(query, key, value).transpose(1, 2).unflatten(2, x.shape[2:])
        return x + self.norm(self.out_conv(y))


class SelfAttention2d(nn.Module):
    """SAGAN self-attention: ``y = x + γ · v(x) softmax(q(x)ᵀ k(x))`` over all positions, ``γ`` initialised to 0.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``. Query and key are biased 1×1 convs to ``C // reduction``
    (8), the value a biased 1×1 conv C → C. (SAGAN also spectral-normalises these convs; that belongs to the GAN
    training recipe, not to the block.)

    At C=64, defaults: ``2·(64·8 + 8) + (64·64 + 64) + 1`` = 5,201 params.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        qk_channels = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (proj(x).flatten(2).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = _attention(query, key, value).transpose(1, 2).unflatten(2, x.shape[2:])
        return x + self.gamma * out


class PositionAttention(SelfAttention2d):
    """DANet's position attention module (PAM).

    Its computation is exactly SAGAN's self-attention (query / key to C/8, value C, softmax over positions,
    ``γ`` initialised to 0, residual), so it is that block under DANet's name. 5,201 params at C=64.
    """


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM): a C×C affinity between channel maps, no projections.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``. With ``A = x`` reshaped to ``[N, C, HW]`` and
    ``E = A Aᵀ``: ``y = x + γ · softmax(max(E) − E) A``, ``γ`` initialised to 0 (1 parameter). The paper's
    equation writes ``softmax(E)``; its authors' code uses ``softmax(max(E) − E)`` (max over each row), which is
    followed here. Subtracting the row maximum is a constant shift inside the softmax, so this equals
    ``softmax(−E)``: the query is ``−A``. ``channels`` is unused (there are no projections) and kept for the
    ``attn_layer(C)`` signature.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x.flatten(2)  # [N, C, HW]: each channel is one token
        out = _attention(-maps, maps, maps).unflatten(2, x.shape[2:])
        return x + self.gamma * out


class DualAttention(nn.Module):
    """DANet's dual attention as a plug-in block: ``x + γ_p·PA(x) + γ_c·CA(x)``, i.e. ``PAM(x) + CAM(x) − x``.

    ``Tensor[N, C, H, W]`` → ``Tensor[N, C, H, W]``. The paper sums the outputs of the two modules, each of which
    carries its own residual; inside a residual block the input is counted once, so the block starts (both
    ``γ = 0``) as the identity like every other plug-in here. The segmentation head (DANet) uses
    :class:`PositionAttention` and :class:`ChannelAttention` directly with its own convolutions around them.
    5,202 params at C=64.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.position = PositionAttention(channels, reduction)
        self.channel = ChannelAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.position(x) + self.channel(x) - x


# --------------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------------

ATTENTION_LAYERS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "default": None,  # the model's own choice: none, or MobileNetV3's built-in SE
    "se": SqueezeExcite,
    "sk": SelectiveKernel,
    "cbam": CBAM,
    "nonlocal": NonLocal,
    "self_attention": SelfAttention2d,
    "danet": DualAttention,
}


def get_attn_layer(name: str, **kwargs) -> AttnFactory | None:
    """``attn_layer`` factory for the config name ``name``: ``channels -> nn.Module``, or ``None`` for none.

    ``kwargs`` are the block's options (e.g. ``get_attn_layer("se", reduction=8, bias=False)``); a wrong option is
    reported now, not when the model is built.
    """
    block = _lookup(ATTENTION_LAYERS, name.lower(), "attention")
    if block is None:
        return None
    options = [p for p in inspect.signature(block).parameters if p != "channels"]
    for key in kwargs:
        _lookup(dict.fromkeys(options), key, f"{name} option")
    return partial(block, **kwargs)


__all__ = [
    "ATTENTION_LAYERS",
    "CBAM",
    "ChannelAttention",
    "ChannelGate",
    "ChannelMLP",
    "DualAttention",
    "NonLocal",
    "PositionAttention",
    "SelectiveKernel",
    "SelfAttention2d",
    "SpatialGate",
    "SqueezeExcite",
    "get_attn_layer",
]
