"""Vision Transformer (ViT).

Paper: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".
Tiny and small widths are those of DeiT (Touvron et al. 2021) as named by timm.

The image is cut into non-overlapping patches, each patch is linearly projected to a token (a convolution whose
kernel and stride equal the patch size), a learnable class token is prepended and learnable 1-D position embeddings
are added. A stack of pre-LN Transformer encoder layers (:mod:`cvlab.layers.transformer`: LN → multi-head
self-attention → residual, LN → MLP(GELU) → residual) follows, then a final LayerNorm; the classifier reads the class
token.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from cvlab.layers.transformer import (
    ChannelsFirstTokenNorm,
    LearnedPositionalEmbedding,
    TransformerEncoderLayer,
    truncated_normal_,
)
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.features import Backbone, FeatureInfo

# Inputs up to this size get a patch size that leaves an 8×8 grid of tokens, of at least 4×4 pixels (see
# VisionTransformer).
_SMALL_IMAGE_MAX = 64
_SMALL_IMAGE_GRID = 8
_MIN_PATCH = 4
# The largest Adam/AdamW learning rate of the ViT recipes for training from scratch: ViT (Dosovitskiy et al. 2021,
# Table 3) 1e-3 at batch 4096 after 10k warm-up steps, DeiT 5e-4 per 512 images.
MAX_ADAM_LR = 1e-3


class PatchEmbedding(nn.Module):
    """Tensor[N, C, H, W] → tokens Tensor[N, 1 + (H/p)·(W/p), E]: patchify-and-project, prepend the class token, add
    position embeddings, dropout.

    The class token and position embeddings live here so that every parameter before the encoder belongs to this
    stage. The input must have the ``image_size`` the model was built for: each position embedding belongs to one
    patch location.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int, drop_rate: float = 0.0):
        super().__init__()
        if patch_size > image_size:
            raise ValueError(f"patch_size {patch_size} is larger than image_size {image_size}")
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = LearnedPositionalEmbedding(1 + self.num_patches, embed_dim, drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.proj(x)  # Tensor[N, E, H/p, W/p]
        if patches.shape[-2:] != (self.grid_size, self.grid_size):
            raise ValueError(
                f"ViT built for {self.image_size}x{self.image_size} inputs got {tuple(x.shape[-2:])}; "
                "set image_size to match"
            )
        tokens = patches.flatten(2).transpose(1, 2)  # Tensor[N, L, E]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.pos_embed(torch.cat([cls, tokens], dim=1))


class VisionTransformer(Backbone):
    """ViT classifier: ``forward(Tensor[N, in_chans, image_size, image_size]) -> Tensor[N, num_classes]``.

    =========  =========  =====  =====  ========  =============================
    model      embed_dim  depth  heads  MLP dim   params (1000 classes, 224²)
    =========  =========  =====  =====  ========  =============================
    vit_tiny   192        12     3      768       5,717,416
    vit_small  384        12     6      1536      22,050,664
    vit_base   768        12     12     3072      86,567,656
    =========  =========  =====  =====  ========  =============================

    At 224² with 16×16 patches there are 196 patch tokens + 1 class token = 197. The counts equal timm's
    ``vit_{tiny,small,base}_patch16_224`` (and torchvision's ``vit_b_16`` for base).

    Options:

    - ``patch_size=None``: 16, except for small images (``image_size <= 64``) where it is
      ``max(4, image_size // 8)``: an 8×8 token grid where the image allows it, of patches no smaller than 4×4 (the
      smallest that CIFAR-size ViTs use): 64² → 8×8 patches, 32² → 4×4 patches, 64 tokens each; 28² → 4×4 patches,
      7×7 tokens; 8² digits → 4×4 patches, a 2×2 grid (the strided projection drops the last
      ``image_size % patch_size`` rows and columns). A 1-pixel patch embeds a token as ``w·x + b``: every token lies
      on one line, set apart only by position embeddings 50 times smaller (std 0.02), and on digits vit_tiny then
      learns nothing in 6 epochs (0.10 at lr 3e-3, 0.09 at 5e-4); 2×2 patches leave it at chance too, 4×4 reach 0.90.
    - ``drop_rate``: dropout after the position embedding, on the attention output and inside the MLP;
      ``attn_drop_rate``: dropout on attention weights.
    - ``norm_layer``: None = ``nn.LayerNorm(eps=1e-6)``. Any other value is a channel-first factory of the layer
      contract (for Tensor[N, C, H, W]) and replaces every norm; it is applied to the tokens through
      :class:`~cvlab.layers.transformer.ChannelsFirstTokenNorm` (every ``norm=`` option works; ``norm=ln`` is a
      one-group GroupNorm over all tokens of a sample, not ViT's per-token LayerNorm, which ``default`` keeps).
    - ``act_layer``: None = GELU; replaces the MLP activation.
    - ``attn_layer`` (entry points only): ignored with a warning; the attention plug-ins are for CNN feature maps.

    Training: ViT's recipes train from scratch with Adam(W) at lr <= 1e-3 (``MAX_ADAM_LR``), which the ViT configs'
    ``adam_lr`` gives ``optimizer=adamw``; :meth:`training_warnings` says so when a run's rate is higher. On digits
    (6 epochs, test accuracy) at 3e-3: vit_tiny 0.896, vit_small 0.393, vit_base 0.837.

    Stages (``feature_info``, and ``create_model(name, features_only=True)``): ``patch_embed``, ``blocks.0`` ..
    ``blocks.<depth - 1>``, ``norm`` (the last equals ``forward_features``), each ``embed_dim`` channels at
    reduction = the patch size. As features the class token is dropped and the patch tokens are laid out on their
    grid, ``Tensor[N, embed_dim, H / p, W / p]``. ``num_features`` is the token width.

    Initialisation (timm / the ViT reference): class token, position embeddings and Linear weights truncated-normal
    std 0.02 (cut at ±2 std), biases 0, LayerNorm weight 1 bias 0; the patch projection is initialised like a Linear
    layer on the flattened patch, LeCun-normal (truncated normal, std ``1/sqrt(fan_in)``) with zero bias, as in the
    JAX reference and torchvision.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        image_size: int = 224,
        patch_size: int | None = None,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory | None = None,
    ):
        super().__init__()
        if patch_size is None:
            patch_size = (min(image_size, max(_MIN_PATCH, image_size // _SMALL_IMAGE_GRID))
                          if image_size <= _SMALL_IMAGE_MAX else 16)
        if norm_layer is None:
            token_norm = partial(nn.LayerNorm, eps=1e-6)
        else:
            def token_norm(dim: int) -> nn.Module:
                return ChannelsFirstTokenNorm(norm_layer(dim))
        self.num_features = embed_dim
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_chans, embed_dim, drop_rate)
        self.blocks = nn.Sequential(
            *(
                TransformerEncoderLayer(
                    d_model=embed_dim,
                    nhead=num_heads,
                    dim_feedforward=int(embed_dim * mlp_ratio),
                    dropout=drop_rate,
                    attn_dropout=attn_drop_rate,
                    act_layer=act_layer or nn.GELU,
                    norm_layer=token_norm,
                    norm_first=True,
                )
                for _ in range(depth)
            )
        )
        self.norm = token_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        stage_names = ["patch_embed", *(f"blocks.{index}" for index in range(depth)), "norm"]
        self.feature_info = FeatureInfo(dict(num_chs=embed_dim, reduction=patch_size, module=name)
                                        for name in stage_names)
        self._init_weights()

    def _init_weights(self) -> None:
        truncated_normal_(self.patch_embed.cls_token, std=0.02)
        truncated_normal_(self.patch_embed.pos_embed.weight, std=0.02)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        truncated_normal_(proj.weight, std=fan_in**-0.5)
        nn.init.zeros_(proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                truncated_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def training_warnings(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """One line when ``optimizer`` is Adam or AdamW with a starting rate above ViT's recipes (``MAX_ADAM_LR``);
        the rate read is each group's ``initial_lr`` (set by a scheduler) or else its ``lr``."""
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return []
        lr = max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
        if lr <= MAX_ADAM_LR:
            return []
        return [f"ViT trains from scratch with {type(optimizer).__name__} at lr <= {MAX_ADAM_LR:g} (the ViT and DeiT "
                f"recipes); lr {lr:g} trains it poorly or not at all: set optimizer.lr={MAX_ADAM_LR:g}"]

    @staticmethod
    def feature_map(tokens: torch.Tensor, input_size: tuple[int, int], reduction: int) -> torch.Tensor:
        """Tokens Tensor[N, 1 + h·w, E] → Tensor[N, E, h, w] (h, w = input size // patch size): the class token
        dropped, each patch token at its patch's place."""
        height, width = input_size[0] // reduction, input_size[1] // reduction
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, C, H, W] → normalised tokens Tensor[N, 1 + L, E] (index 0 is the class token)."""
        return self.norm(self.blocks(self.patch_embed(x)))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens Tensor[N, 1 + L, E] → logits Tensor[N, num_classes], read from the class token."""
        return self.head(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _vit(embed_dim: int, depth: int, num_heads: int, attn_layer: AttnFactory | None = None,
         **kwargs) -> VisionTransformer:
    if attn_layer is not None:
        # The contract's attention plug-ins are channel/spatial blocks for CNN feature maps; ViT already attends.
        warnings.warn("attn_layer is ignored by ViT: attention plug-ins apply to CNNs", stacklevel=3)
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


@register_model
def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Ti/16: width 192, 12 layers, 3 heads (5.7M parameters)."""
    return _vit(192, 12, 3, **kwargs)


@register_model
def vit_small(**kwargs) -> VisionTransformer:
    """ViT-S/16: width 384, 12 layers, 6 heads (22.1M parameters)."""
    return _vit(384, 12, 6, **kwargs)


@register_model
def vit_base(**kwargs) -> VisionTransformer:
    """ViT-B/16: width 768, 12 layers, 12 heads (86.6M parameters)."""
    return _vit(768, 12, 12, **kwargs)
