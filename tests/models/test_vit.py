"""ViT: exact parameter counts, token shapes, the small-image patch rule, plug-in norms/activations, parity of one
encoder block with torchvision's, and attention through F.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from cvlab.layers.norm import NORM_LAYERS, get_norm_layer
from cvlab.layers.transformer import ChannelsFirstTokenNorm
from cvlab.models.backbones.features import FeatureExtractor
from cvlab.models.backbones.vit import VisionTransformer, vit_base, vit_small, vit_tiny


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def digits_vit(**kwargs) -> VisionTransformer:
    """vit_tiny for 8×8 one-channel digits, 10 classes."""
    return vit_tiny(num_classes=10, in_chans=1, image_size=8, **kwargs)


def mini_vit(**kwargs) -> VisionTransformer:
    """A two-block, 32-wide ViT for 8×8 digits (4×4 patches, a 2×2 grid): the cheap model for behaviour that does
    not depend on size."""
    return VisionTransformer(num_classes=10, in_chans=1, image_size=8, embed_dim=32, depth=2, num_heads=4, **kwargs)


@pytest.mark.parametrize("entry, expected", [(vit_tiny, 5_717_416), (vit_small, 22_050_664), (vit_base, 86_567_656)])
def test_parameter_counts_match_timm(entry, expected):
    with torch.device("meta"):  # counts need no memory or initialisation
        assert num_params(entry(num_classes=1000)) == expected


def test_vit_base_tokens_at_224():
    with torch.device("meta"):
        model = vit_base()
        tokens = model.forward_features(torch.empty(2, 3, 224, 224))
    assert tokens.shape == (2, 197, 768)  # 14·14 patches + class token
    assert model.patch_embed.proj.kernel_size == (16, 16) and model.patch_embed.proj.stride == (16, 16)


def test_vit_tiny_forward_at_224():
    model = vit_tiny().eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 197, 192)
    assert model.head(tokens[:, 0]).shape == (1, 1000)


@pytest.mark.parametrize(
    "image_size, patch_size, tokens", [(8, 4, 5), (16, 4, 17), (28, 4, 50), (32, 4, 65), (64, 8, 65), (96, 16, 37)]
)
def test_small_image_patch_rule(image_size, patch_size, tokens):
    with torch.device("meta"):
        model = vit_tiny(image_size=image_size)
        assert model.patch_embed.proj.kernel_size == (patch_size, patch_size)
        assert model.forward_features(torch.empty(2, 3, image_size, image_size)).shape == (2, tokens, 192)


def test_digits_forward():
    with torch.no_grad():
        logits = digits_vit()(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_backward_reaches_every_parameter():
    model = mini_vit()
    F.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([3, 7])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_attention_runs_through_torch_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        digits_vit()(torch.randn(2, 1, 8, 8))
    assert calls == [torch.Size([2, 3, 5, 64])] * 12  # one call per block: [N, heads, tokens, head_dim]


def test_encoder_block_matches_torchvision():
    block = mini_vit().blocks[0].eval()
    reference = EncoderBlock(num_heads=4, hidden_dim=32, mlp_dim=128, dropout=0.0, attention_dropout=0.0).eval()
    ours = block.state_dict()

    def fused_in_proj(param):
        return torch.cat([ours[f"self_attn.{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")])

    reference.load_state_dict({
        "ln_1.weight": ours["norm1.weight"], "ln_1.bias": ours["norm1.bias"],
        "ln_2.weight": ours["norm2.weight"], "ln_2.bias": ours["norm2.bias"],
        "self_attention.in_proj_weight": fused_in_proj("weight"),
        "self_attention.in_proj_bias": fused_in_proj("bias"),
        "self_attention.out_proj.weight": ours["self_attn.out_proj.weight"],
        "self_attention.out_proj.bias": ours["self_attn.out_proj.bias"],
        "mlp.0.weight": ours["mlp.linear1.weight"], "mlp.0.bias": ours["mlp.linear1.bias"],
        "mlp.3.weight": ours["mlp.linear2.weight"], "mlp.3.bias": ours["mlp.linear2.bias"],
    })
    x = torch.randn(2, 65, 32)
    torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=0)
    assert block.norm1.eps == reference.ln_1.eps == 1e-6


def test_norm_and_activation_replace_every_default():
    model = mini_vit(norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(ChannelsFirstTokenNorm) == kinds.count(nn.BatchNorm2d) == 2 * 2 + 1  # two per block + final
    assert kinds.count(nn.SiLU) == 2
    assert nn.LayerNorm not in kinds and nn.GELU not in kinds
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    group_norm = mini_vit(norm_layer=lambda c: nn.GroupNorm(4, c))
    assert group_norm(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("norm", NORM_LAYERS)
def test_every_norm_option_trains(norm):
    model = mini_vit(norm_layer=get_norm_layer(norm)).train()
    logits = model(torch.randn(2, 1, 8, 8))
    logits.sum().backward()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attn_layer_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="attn_layer is ignored"):
        model = vit_tiny(image_size=8, attn_layer=lambda c: nn.Identity())
    assert num_params(model) == num_params(vit_tiny(image_size=8))


def test_drop_rates_reach_their_layers():
    model = mini_vit(drop_rate=0.1, attn_drop_rate=0.2)
    assert model.patch_embed.pos_embed.dropout.p == 0.1
    assert {m.p for m in model.blocks.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert {b.self_attn.dropout for b in model.blocks} == {0.2}


def test_initialisation():
    model = mini_vit()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.abs().max() <= 0.04 and module.bias.abs().max() == 0  # trunc-normal(0.02), zero bias
            assert 0.012 < module.weight.std() < 0.022  # cutting at ±2 std leaves std ≈ 0.88 · 0.02
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    for token in (model.patch_embed.cls_token, model.patch_embed.pos_embed.weight):
        assert token.abs().max() <= 0.04
    proj = model.patch_embed.proj  # LeCun normal: fan_in = 1 channel · 4 · 4 → std 1/4, cut at ±1/2
    assert proj.weight.abs().max() <= 0.5 and 0.15 < proj.weight.std() < 0.3 and proj.bias.abs().max() == 0


def test_wrong_input_size_is_explained():
    with pytest.raises(ValueError, match="built for 8x8 inputs got \\(16, 16\\)"):
        mini_vit()(torch.randn(1, 1, 16, 16))


def test_stages_cover_the_model():
    model = mini_vit(patch_size=1).eval()  # an 8×8 grid, so that rows and columns differ
    assert model.feature_info.module_names() == ["patch_embed", "blocks.0", "blocks.1", "norm"]
    assert model.feature_info.channels() == [32] * 4 and model.feature_info.reductions() == [1] * 4
    assert model.num_features == 32
    features = FeatureExtractor(model)
    # Every parameter but the classifier's is in the trunk.
    assert num_params(features) + num_params(model.head) == num_params(model)
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        tokens, maps = model.forward_features(images), features(images)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 4
    # The last map is forward_features' patch tokens (class token dropped), token k at row k // 8, column k % 8.
    assert torch.equal(maps[-1][:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])
    assert torch.equal(maps[-1].flatten(2).transpose(1, 2), tokens[:, 1:])


def test_registered():
    from cvlab.models import create_model, list_models

    assert {"vit_tiny", "vit_small", "vit_base"} <= set(list_models("classification"))
    assert isinstance(create_model("vit_tiny", num_classes=10, in_chans=1, image_size=8), VisionTransformer)
