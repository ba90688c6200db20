"""cvlab.layers.transformer against torch.nn's reference modules (copied weights), plus the paper's formulas."""
import math

import pytest
import torch
from torch import nn

from cvlab.layers.transformer import (
    ChannelsFirstTokenNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    Transformer,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    causal_mask,
    scaled_dot_product_attention,
)

D, HEADS, FFN = 32, 4, 64
N, L, S = 2, 5, 7  # batch, target length, source length
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}  # torch.nn names → cvlab act_layer factories


def assert_equal(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def to_torch_names(state: dict) -> dict:
    """Rename a cvlab state dict to torch.nn's: q/k/v projections fused into in_proj_*, the FFN unwrapped,
    cross_attn → multihead_attn."""
    out = {}
    for name, value in state.items():
        prefix, found, param = name.rpartition("q_proj.")
        if found:
            projections = [state[prefix + p + param] for p in ("q_proj.", "k_proj.", "v_proj.")]
            out[prefix + "in_proj_" + param] = torch.cat(projections)
        elif "k_proj." not in name and "v_proj." not in name:
            out[name] = value
    return {k.replace("cross_attn.", "multihead_attn.").replace("mlp.", ""): v for k, v in out.items()}


def copy_into(mine: nn.Module, reference: nn.Module) -> nn.Module:
    reference.load_state_dict(to_torch_names(mine.state_dict()), strict=True)
    mine.eval()
    return reference.eval()


def padding_mask(length: int, additive: bool = False) -> torch.Tensor:
    """Sample 1's last two positions are padding: True (boolean form) or -inf (additive form)."""
    mask = torch.zeros(N, length, dtype=torch.bool)
    mask[1, -2:] = True
    return torch.zeros(N, length).masked_fill(mask, float("-inf")) if additive else mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("use_attn_mask", [False, True])
@pytest.mark.parametrize("use_padding", [False, True])
def test_self_attention_matches_torch(use_attn_mask, use_padding):
    mha = MultiHeadAttention(D, HEADS)
    ref = copy_into(mha, nn.MultiheadAttention(D, HEADS, batch_first=True))
    x = torch.randn(N, L, D)
    masks = dict(
        attn_mask=causal_mask(L) if use_attn_mask else None,
        key_padding_mask=padding_mask(L) if use_padding else None,
    )
    expected, _ = ref(x, x, x, need_weights=False, **masks)
    assert_equal(mha(x, **masks), expected)


@pytest.mark.parametrize("use_attn_mask", [False, True])
@pytest.mark.parametrize("use_padding", [False, True])
def test_cross_attention_matches_torch(use_attn_mask, use_padding):
    mha = MultiHeadAttention(D, HEADS)
    ref = copy_into(mha, nn.MultiheadAttention(D, HEADS, batch_first=True))
    query, memory = torch.randn(N, L, D), torch.randn(N, S, D)
    # Additive masks, attn_mask in its per-head form [N * heads, L, S]; column 0 stays open so no row is all -inf.
    attn_mask = torch.randn(N * HEADS, L, S).masked_fill(torch.rand(N * HEADS, L, S) < 0.3, float("-inf"))
    attn_mask[..., 0] = 0.0
    masks = dict(
        attn_mask=attn_mask if use_attn_mask else None,
        key_padding_mask=padding_mask(S, additive=True) if use_padding else None,
    )
    expected, _ = ref(query, memory, memory, need_weights=False, **masks)
    assert_equal(mha(query, memory, **masks), expected)


def test_sdpa_wrapper_is_the_formula():
    q, k, v = torch.randn(N, HEADS, L, 8), torch.randn(N, HEADS, S, 8), torch.randn(N, HEADS, S, 3)
    blocked = torch.rand(L, S) < 0.3
    blocked[:, 0] = False
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(blocked, float("-inf"))
    out = scaled_dot_product_attention(q, k, v, blocked)
    assert out.shape == (N, HEADS, L, 3)
    assert_equal(out, scores.softmax(-1) @ v)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    layer = TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, act_layer=ACTIVATIONS[activation],
                                    norm_first=norm_first)
    ref = copy_into(layer, nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, activation=activation,
                                                      batch_first=True, norm_first=norm_first))
    x = torch.randn(N, L, D)
    assert_equal(layer(x), ref(x))
    masks = dict(src_mask=causal_mask(L), src_key_padding_mask=padding_mask(L))
    assert_equal(layer(x, **masks), ref(x, **masks))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_torch(norm_first, activation):
    layer = TransformerDecoderLayer(D, HEADS, FFN, dropout=0.0, act_layer=ACTIVATIONS[activation],
                                    norm_first=norm_first)
    ref = copy_into(layer, nn.TransformerDecoderLayer(D, HEADS, FFN, dropout=0.0, activation=activation,
                                                      batch_first=True, norm_first=norm_first))
    tgt, memory = torch.randn(N, L, D), torch.randn(N, S, D)
    masks = dict(tgt_mask=causal_mask(L), tgt_key_padding_mask=padding_mask(L), memory_key_padding_mask=padding_mask(S))
    assert_equal(layer(tgt, memory, **masks), ref(tgt, memory, **masks))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_matches_torch(norm_first, activation):
    model = Transformer(D, HEADS, 2, 2, FFN, dropout=0.0, act_layer=ACTIVATIONS[activation],
                        norm_first=norm_first, final_norm=True)
    ref = nn.Transformer(D, HEADS, 2, 2, FFN, dropout=0.0, activation=activation, batch_first=True,
                         norm_first=norm_first)
    ref.encoder.enable_nested_tensor = False  # the nested-tensor fast path zeroes padded outputs
    copy_into(model, ref)
    src, tgt = torch.randn(N, S, D), torch.randn(N, L, D)
    masks = dict(tgt_mask=causal_mask(L), src_key_padding_mask=padding_mask(S), memory_key_padding_mask=padding_mask(S))
    out = model(src, tgt, **masks)
    assert out.shape == (N, L, D)
    assert_equal(out, ref(src, tgt, **masks))


def test_final_norm_defaults_to_pre_ln_only():
    post = TransformerEncoder(2, d_model=D, nhead=HEADS)
    pre = TransformerEncoder(2, d_model=D, nhead=HEADS, norm_first=True)
    assert isinstance(post.norm, nn.Identity)
    assert isinstance(pre.norm, nn.LayerNorm) and pre.norm.normalized_shape == (D,)
    assert len(pre.layers) == 2
    assert len(TransformerEncoder(d_model=D, nhead=HEADS).layers) == 6  # the paper's depth by default


@pytest.mark.parametrize("norm_first", [False, True])
def test_causal_mask_hides_the_future(norm_first):
    assert causal_mask(3).tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    layer = TransformerDecoderLayer(D, HEADS, FFN, dropout=0.0, norm_first=norm_first).eval()
    tgt, memory = torch.randn(1, L, D), torch.randn(1, S, D)
    changed = tgt.clone()
    changed[:, -1] = torch.randn(D)  # only the last (future) token differs
    masked = [layer(t, memory, tgt_mask=causal_mask(L)) for t in (tgt, changed)]
    assert_equal(masked[1][:, :-1], masked[0][:, :-1])
    assert (masked[1][:, -1] - masked[0][:, -1]).abs().max() > 1e-3
    unmasked = [layer(t, memory) for t in (tgt, changed)]
    assert (unmasked[1][:, 0] - unmasked[0][:, 0]).abs().max() > 1e-3  # without the mask the future leaks back


def test_sinusoidal_encoding_values():
    d = 16
    encoding = SinusoidalPositionalEncoding(d, max_len=100)
    pe = encoding(torch.zeros(1, 100, d))[0]
    assert pe.shape == (100, d)
    assert pe[0, 0::2].abs().max() == 0 and torch.all(pe[0, 1::2] == 1)  # sin(0), cos(0)
    for pos, i in [(1, 0), (7, 2), (50, 5), (99, 7)]:
        angle = pos / 10000 ** (2 * i / d)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sum(p.numel() for p in encoding.parameters()) == 0
    x = torch.randn(2, 10, d)
    assert_equal(encoding(x), x + pe[:10])


def test_learned_positional_embedding():
    embedding = LearnedPositionalEmbedding(10, D)
    assert embedding.weight.shape == (10, D) and embedding.weight.abs().max() <= 0.04  # cut at 2 std
    x = torch.randn(N, 4, D)
    assert_equal(embedding(x), x + embedding.weight[:4])
    with pytest.raises(ValueError, match="11 positions"):
        embedding(torch.zeros(1, 11, D))


def test_base_layer_parameter_counts():
    d, ffn = 512, 2048
    attention = 4 * (d * d + d)  # q, k, v, out projections with bias
    feed_forward = (d * ffn + ffn) + (ffn * d + d)
    layer_norm = 2 * d
    encoder_layer = TransformerEncoderLayer(d, 8, ffn)
    decoder_layer = TransformerDecoderLayer(d, 8, ffn)
    encoder_count = sum(p.numel() for p in encoder_layer.parameters())
    decoder_count = sum(p.numel() for p in decoder_layer.parameters())
    assert encoder_count == attention + feed_forward + 2 * layer_norm == 3_152_384
    assert decoder_count == 2 * attention + feed_forward + 3 * layer_norm == 4_204_032


def test_channels_first_token_norm_is_batchnorm_over_tokens():
    tokens = torch.randn(N, L, D)
    adapted = ChannelsFirstTokenNorm(nn.BatchNorm2d(D)).train()
    expected = nn.BatchNorm1d(D).train()(tokens.transpose(1, 2)).transpose(1, 2)
    out = adapted(tokens)
    assert out.shape == (N, L, D)
    assert_equal(out, expected)
    layer = TransformerEncoderLayer(D, HEADS, FFN, norm_layer=lambda c: ChannelsFirstTokenNorm(nn.GroupNorm(4, c)))
    assert layer(tokens).shape == (N, L, D)
