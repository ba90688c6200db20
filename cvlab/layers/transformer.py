"""Transformer layers: scaled dot-product and multi-head attention, encoder and decoder layers and stacks, the full
encoder-decoder Transformer, and positional encodings.

Paper: Vaswani et al. 2017, "Attention Is All You Need". Pre-LN ordering (``norm_first=True``) follows Xiong et al.
2020, "On Layer Normalization in the Transformer Architecture", and is what ViT uses.

Written by hand (rather than wrapping ``torch.nn.MultiheadAttention`` / ``torch.nn.Transformer``) so that every step
of the paper is a readable line of code; the attention product itself is computed by
``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel where one is available. With copied
weights the modules here give the same outputs as their ``torch.nn`` namesakes (the tests check it).

Conventions (those of ``torch.nn.MultiheadAttention`` with ``batch_first=True``):

- sequences are ``Tensor[N, L, E]`` (batch, length, embedding);
- a boolean mask marks *blocked* positions with ``True``; a float mask is added to the attention scores
  (``-inf`` blocks). ``attn_mask`` is ``Tensor[L, S]`` or ``Tensor[N * num_heads, L, S]``; ``key_padding_mask`` is
  ``Tensor[N, S]`` with ``True`` at padding.
- norm factories build a norm for the last (embedding) dimension of a ``Tensor[N, L, E]``; ``None`` means
  ``nn.LayerNorm``. :class:`ChannelsFirstTokenNorm` adapts the channel-first factories the CNNs use.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.typing import ActFactory, NormFactory


def truncated_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """In-place normal init with standard deviation ``std``, redrawn outside ±2·std (BERT / ViT)."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``Tensor[L, L]``, ``True`` above the diagonal: position ``i`` may attend only to positions ``<= i``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(diagonal=1)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean mask (``True`` = blocked) into ``0 / -inf`` scores; float masks are already additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """``softmax(Q Kᵀ / √d_k + mask) V`` for ``q: Tensor[..., L, d_k]``, ``k: Tensor[..., S, d_k]``,
    ``v: Tensor[..., S, d_v]`` → ``Tensor[..., L, d_v]``.

    ``mask`` broadcasts to ``Tensor[..., L, S]``: boolean with ``True`` = blocked, or additive float. Dividing by
    √d_k keeps the scores' variance near 1 whatever the head size, so the softmax does not saturate. ``dropout_p``
    drops attention weights (pass 0 in eval). The product is delegated to
    ``torch.nn.functional.scaled_dot_product_attention`` (note its boolean masks mean the opposite: ``True`` = keep,
    which is why booleans are converted here).
    """
    if mask is not None:
        mask = _additive_mask(mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project queries, keys and values ``num_heads`` times into ``embed_dim / num_heads``
    dimensions, attend in each head in parallel, concatenate the heads and project back to ``embed_dim``.

    Separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` linear layers (``torch.nn.MultiheadAttention`` fuses
    the first three into one ``in_proj_weight``; the parameter count is the same: ``4·(E² + E)`` with bias).
    ``dropout`` drops attention weights during training.

    ``forward(query, key=None, value=None)``: ``key`` defaults to ``query`` (self-attention) and ``value`` to ``key``.
    Returns ``Tensor[N, L, E]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's scheme: Xavier-uniform projections (computed per E×E block), zero biases.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # Tensor[N, L, E] -> Tensor[N, heads, L, head_dim]
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_masks(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """One additive mask broadcastable to Tensor[N, heads, L, S], or None."""
        merged = None
        if attn_mask is not None:
            merged = _additive_mask(attn_mask, dtype)
            if merged.dim() == 3:  # Tensor[N * heads, L, S]
                merged = merged.view(n, self.num_heads, *merged.shape[-2:])
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, dtype)[:, None, None, :]
            merged = padding if merged is None else merged + padding
        return merged

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        n, length, _ = query.shape
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        mask = self._merge_masks(attn_mask, key_padding_mask, n, q.dtype)
        heads = scaled_dot_product_attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(heads.transpose(1, 2).reshape(n, length, self.embed_dim))


class PositionwiseFeedForward(nn.Module):
    """``linear2(dropout(act(linear1(x))))`` then dropout, applied to each position alone: Tensor[N, L, E] → same.

    The paper's FFN (ReLU, 4× wider hidden layer); ViT's MLP (GELU) is the same block.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, act_layer: ActFactory | None = None):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.act = (act_layer or nn.ReLU)()
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout1(self.act(self.linear1(x)))))


class ChannelsFirstTokenNorm(nn.Module):
    """Apply a channel-first norm (built for ``Tensor[N, C, H, W]``) to tokens ``Tensor[N, L, C]``.

    Tokens are viewed as a ``Tensor[N, C, L, 1]`` image, so any norm that accepts 4-D channel-first input works:
    BatchNorm2d (statistics per channel over batch and tokens), GroupNorm (per sample over each group's channels and
    all tokens — so cvlab's ``norm=ln``, a one-group GroupNorm, normalises over all tokens of a sample, unlike the
    per-token ``nn.LayerNorm``), InstanceNorm2d (per sample and channel over tokens), SwitchableNorm2d, Identity.
    ``nn.LayerNorm(C)`` itself is *not* a channel-first factory (it normalises the last axis) and must not be wrapped.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class TransformerEncoderLayer(nn.Module):
    """Self-attention then a position-wise FFN, each wrapped in a residual connection and a norm.

    Post-LN (the paper, ``norm_first=False``): ``x = norm1(x + drop(attn(x)))``; ``x = norm2(x + ffn(x))``.
    Pre-LN (ViT, ``norm_first=True``): ``x = x + drop(attn(norm1(x)))``; ``x = x + ffn(norm2(x))``; the residual path
    stays un-normalised, which trains deep stacks without warm-up but needs a final norm after the stack.

    ``dropout`` is applied to the attention output and inside the FFN; ``attn_dropout`` (default: ``dropout``) to the
    attention weights. ``act_layer`` None = ReLU, ``norm_layer`` None = ``nn.LayerNorm``.

    Base model (d_model 512, 8 heads, FFN 2048): 3,152,384 parameters per layer.
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attn_dropout: float | None = None,
        act_layer: ActFactory | None = None,
        norm_layer: NormFactory | None = None,
        norm_first: bool = False,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.LayerNorm
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout if attn_dropout is None else attn_dropout)
        self.dropout = nn.Dropout(dropout)
        self.mlp = PositionwiseFeedForward(d_model, dim_feedforward, dropout, act_layer)
        self.norm1 = norm_layer(d_model)
        self.norm2 = norm_layer(d_model)

    def _attend(self, x: torch.Tensor, attn_mask, key_padding_mask) -> torch.Tensor:
        return self.dropout(self.self_attn(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._attend(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self._attend(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self.mlp(x))


class TransformerDecoderLayer(nn.Module):
    """Masked self-attention over the target, encoder-decoder ("context") attention whose keys and values are the
    encoder output ``memory``, then a position-wise FFN; each sub-layer has a residual connection and a norm, ordered
    post-LN or pre-LN as in :class:`TransformerEncoderLayer`.

    The self-attention must be given ``tgt_mask=causal_mask(T)`` when predicting autoregressively, so that position
    ``i`` sees only targets ``<= i``.

    Base model: 4,204,032 parameters per layer (two attentions, FFN, three norms).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attn_dropout: float | None = None,
        act_layer: ActFactory | None = None,
        norm_layer: NormFactory | None = None,
        norm_first: bool = False,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.LayerNorm
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, nhead, attn_dropout)
        self.cross_attn = MultiHeadAttention(d_model, nhead, attn_dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.mlp = PositionwiseFeedForward(d_model, dim_feedforward, dropout, act_layer)
        self.norm1 = norm_layer(d_model)
        self.norm2 = norm_layer(d_model)
        self.norm3 = norm_layer(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def self_block(x):
            return self.dropout1(self.self_attn(x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask))

        def context_block(x):
            attended = self.cross_attn(x, memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)
            return self.dropout2(attended)

        x = tgt
        if self.norm_first:
            x = x + self_block(self.norm1(x))
            x = x + context_block(self.norm2(x))
            return x + self.mlp(self.norm3(x))
        x = self.norm1(x + self_block(x))
        x = self.norm2(x + context_block(x))
        return self.norm3(x + self.mlp(x))


def _final_norm(final_norm: bool | None, layers: nn.ModuleList, norm_layer: NormFactory | None) -> nn.Module:
    """The norm after a stack: by default only for pre-LN stacks (post-LN layers already end with a norm)."""
    if final_norm is None:
        final_norm = layers[0].norm_first
    if not final_norm:
        return nn.Identity()
    return (norm_layer or nn.LayerNorm)(layers[0].self_attn.embed_dim)


class TransformerEncoder(nn.Module):
    """``num_layers`` :class:`TransformerEncoderLayer` s built from ``layer_kwargs``, then an optional final norm
    (``final_norm=None``: only when ``norm_first``). Tensor[N, S, E] → Tensor[N, S, E]."""

    def __init__(self, num_layers: int = 6, final_norm: bool | None = None, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.norm = _final_norm(final_norm, self.layers, layer_kwargs.get("norm_layer"))

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor | None = None, src_key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask)
        return self.norm(x)


class TransformerDecoder(nn.Module):
    """``num_layers`` :class:`TransformerDecoderLayer` s built from ``layer_kwargs``, each attending to the same
    ``memory``, then an optional final norm (as :class:`TransformerEncoder`). Tensor[N, T, E] → Tensor[N, T, E]."""

    def __init__(self, num_layers: int = 6, final_norm: bool | None = None, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.norm = _final_norm(final_norm, self.layers, layer_kwargs.get("norm_layer"))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, **masks) -> torch.Tensor:
        """``masks``: any of ``tgt_mask``, ``memory_mask``, ``tgt_key_padding_mask``, ``memory_key_padding_mask``."""
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, **masks)
        return self.norm(x)


class Transformer(nn.Module):
    """The encoder-decoder Transformer of Vaswani et al. 2017, without embeddings and output projection (like
    ``torch.nn.Transformer``): ``forward(src: Tensor[N, S, E], tgt: Tensor[N, T, E]) -> Tensor[N, T, E]``.

    The caller embeds tokens (the paper scales embeddings by √d_model), adds a positional encoding
    (:class:`SinusoidalPositionalEncoding`) and projects the output to the vocabulary.

    ======  =======  =====  ====  ======  ==========================================
    model   d_model  heads  FFN   layers  parameters (all layers, no final norms)
    ======  =======  =====  ====  ======  ==========================================
    base    512      8      2048  6 + 6   44,138,496
    big     1024     16     4096  6 + 6   176,357,376
    ======  =======  =====  ====  ======  ==========================================

    ``final_norm`` (both stacks) defaults to "only when ``norm_first``"; ``torch.nn.Transformer`` always adds one,
    so pass ``final_norm=True`` to match it. Weights with more than one dimension are Xavier-uniform initialised,
    as in the PyTorch reference implementation.
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        act_layer: ActFactory | None = None,
        norm_layer: NormFactory | None = None,
        norm_first: bool = False,
        final_norm: bool | None = None,
    ):
        super().__init__()
        layer_kwargs = dict(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            act_layer=act_layer,
            norm_layer=norm_layer,
            norm_first=norm_first,
        )
        self.encoder = TransformerEncoder(num_encoder_layers, final_norm, **layer_kwargs)
        self.decoder = TransformerDecoder(num_decoder_layers, final_norm, **layer_kwargs)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = self.encoder(src, src_mask, src_key_padding_mask)
        return self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the paper's fixed encoding to Tensor[N, L, E], then dropout:
    ``pe[pos, 2i] = sin(pos / 10000^(2i/E))``, ``pe[pos, 2i+1] = cos(pos / 10000^(2i/E))``.

    Each pair of dimensions is a sinusoid of its own wavelength (2π … 10000·2π), so ``pe[pos + k]`` is a linear
    function of ``pe[pos]`` and relative offsets are easy to attend to. No parameters; ``pe`` is a non-persistent
    buffer of ``max_len`` rows.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even for sin/cos pairs, got {d_model}")
        position = torch.arange(max_len, dtype=torch.float64)[:, None]
        # 1 / 10000^(2i/d) for i = 0 .. d/2-1; float64 so that large positions stay accurate.
        inv_wavelength = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        pe = torch.empty(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_wavelength)
        pe[:, 1::2] = torch.cos(position * inv_wavelength)
        self.register_buffer("pe", pe.float(), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.shape[1]].to(x.dtype))


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned vector per position to Tensor[N, L, E] (L <= ``num_positions``), then dropout.

    ``weight: Tensor[num_positions, E]`` starts truncated-normal with std 0.02 (:func:`truncated_normal_`).
    """

    def __init__(self, num_positions: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_positions, d_model))
        self.dropout = nn.Dropout(dropout)
        truncated_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.weight.shape[0]:
            raise ValueError(f"sequence of {length} positions, but only {self.weight.shape[0]} are learned")
        return self.dropout(x + self.weight[:length])
