"""Attention blocks: shapes, parameter counts against hand formulas, outputs against hand-written references."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cvlab.layers.attention import (
    ATTENTION_LAYERS,
    CBAM,
    ChannelAttention,
    DualAttention,
    NonLocal,
    PositionAttention,
    SelectiveKernel,
    SelfAttention2d,
    SqueezeExcite,
    get_attn_layer,
)
from cvlab.models import create_model
from cvlab.utils.errors import UserError

BLOCK_NAMES = ["se", "sk", "cbam", "nonlocal", "self_attention", "danet"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", BLOCK_NAMES)
@pytest.mark.parametrize("channels, size", [(64, (6, 5)), (8, (4, 4))])
def test_block_preserves_shape(name, channels, size):
    block = get_attn_layer(name)(channels)
    x = torch.randn(2, channels, *size)
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: SqueezeExcite(64), 2 * 64 * 4 + 4 + 64),
        (lambda: SqueezeExcite(64, bias=False), 2 * 64 * 4),
        (lambda: SqueezeExcite(64, squeeze_channels=16), 2 * 64 * 16 + 16 + 64),
        # 2 branches of (grouped 3x3: 64 * 64/32 * 9, BN 2*64) + fuse (64*32, BN 2*32) + select 32 * 2*64
        (lambda: SelectiveKernel(64), 2 * (64 * 2 * 9 + 2 * 64) + 64 * 32 + 2 * 32 + 32 * 2 * 64),
        (lambda: CBAM(64), (2 * 64 * 4 + 4 + 64) + (2 * 7 * 7 + 1)),
        (lambda: CBAM(64, bias=False), 2 * 64 * 4 + (2 * 7 * 7 + 1)),
        # theta, phi, g: 64 -> 32 biased; W: 32 -> 64 biased; BN 2*64
        (lambda: NonLocal(64), 3 * (64 * 32 + 32) + (32 * 64 + 64) + 2 * 64),
        (lambda: SelfAttention2d(64), 2 * (64 * 8 + 8) + (64 * 64 + 64) + 1),
        (lambda: PositionAttention(64), 2 * (64 * 8 + 8) + (64 * 64 + 64) + 1),
        (lambda: ChannelAttention(64), 1),
        (lambda: DualAttention(64), 2 * (64 * 8 + 8) + (64 * 64 + 64) + 1 + 1),
    ],
)
def test_param_count_at_64_channels(build, expected):
    assert n_params(build()) == expected


@pytest.mark.parametrize(
    "kwargs, gate_fn",
    [
        ({}, torch.sigmoid),
        ({"bias": False}, torch.sigmoid),
        ({"gate": "hard_sigmoid"}, lambda t: F.relu6(t + 3) / 6),
    ],
)
def test_se_output_is_input_times_hand_computed_gate(kwargs, gate_fn):
    se = SqueezeExcite(32, reduction=4, **kwargs)
    x = torch.randn(2, 32, 5, 4)
    w1, w2 = se.mlp.fc1.weight.flatten(1), se.mlp.fc2.weight.flatten(1)  # [8, 32], [32, 8]
    b1 = se.mlp.fc1.bias if se.mlp.fc1.bias is not None else torch.zeros(8)
    b2 = se.mlp.fc2.bias if se.mlp.fc2.bias is not None else torch.zeros(32)
    squeezed = x.mean((2, 3))  # [N, C]
    gate = gate_fn(torch.relu(squeezed @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_se_matches_torchvision_squeeze_excitation():
    se = SqueezeExcite(32, squeeze_channels=8, gate="hard_sigmoid")
    reference = torchvision.ops.SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid)
    reference.fc1.load_state_dict(se.mlp.fc1.state_dict())
    reference.fc2.load_state_dict(se.mlp.fc2.state_dict())
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(se(x), reference(x))


def test_se_hidden_width_is_at_least_one():
    assert SqueezeExcite(8).mlp.fc1.out_channels == 1


def test_sk_branch_weights_are_a_softmax_over_branches_and_mix_the_branches():
    sk = SelectiveKernel(64).eval()
    x = torch.randn(2, 64, 6, 6)
    branches = [branch(x) for branch in sk.branches]
    weights = sk.branch_weights(branches[0] + branches[1])
    assert weights.shape == (2, 2, 64, 1, 1)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 64, 1, 1))
    torch.testing.assert_close(sk(x), weights[:, 0] * branches[0] + weights[:, 1] * branches[1])


def test_sk_branches_are_3x3_with_dilations_1_and_2_and_groups_follow_gcd():
    sk = SelectiveKernel(64)
    convs = [branch[0] for branch in sk.branches]
    assert [(c.kernel_size, c.dilation, c.groups) for c in convs] == [((3, 3), (1, 1), 32), ((3, 3), (2, 2), 32)]
    assert sk.fuse[0].out_channels == 32  # max(64 // 16, L=32)
    assert SelectiveKernel(256).fuse[0].out_channels == 32
    assert SelectiveKernel(1024).fuse[0].out_channels == 64
    assert SelectiveKernel(48).branches[0][0].groups == 16  # gcd(32, 48)
    assert SelectiveKernel(8).branches[0][0].groups == 8
    assert SelectiveKernel(64, groups=4).branches[1][0].groups == 4


def test_cbam_gates_match_hand_computation():
    cbam = CBAM(32, reduction=4)
    x = torch.randn(2, 32, 6, 5)
    mlp = cbam.channel_gate.mlp
    channel_gate = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    refined = x * channel_gate
    maps = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], dim=1)
    spatial_gate = torch.sigmoid(F.conv2d(maps, cbam.spatial_gate.conv.weight, cbam.spatial_gate.conv.bias, padding=3))
    torch.testing.assert_close(cbam(x), refined * spatial_gate)


def test_cbam_channel_gate_uses_both_average_and_max_pooling():
    gate = CBAM(16, reduction=4).channel_gate
    x = torch.rand(1, 16, 4, 4)
    flat = x.flatten(2)
    peak = flat.argmax(-1)  # per channel
    other = (peak + 1) % 16

    # Same per-channel mean, larger max: only the max-pool path sees it.
    new_max = flat.clone()
    new_max.scatter_add_(-1, peak[..., None], torch.ones(1, 16, 1))
    new_max.scatter_add_(-1, other[..., None], -torch.ones(1, 16, 1))
    torch.testing.assert_close(new_max.mean(-1), flat.mean(-1))
    assert (gate(new_max.view_as(x)) - gate(x)).abs().max() > 1e-3

    # Same per-channel max, smaller mean: only the average-pool path sees it.
    new_mean = flat.clone()
    new_mean.scatter_add_(-1, other[..., None], -torch.ones(1, 16, 1))
    torch.testing.assert_close(new_mean.amax(-1), flat.amax(-1))
    assert (gate(new_mean.view_as(x)) - gate(x)).abs().max() > 1e-3


# --- self-attention blocks ------------------------------------------------------------------------------------------


def _softmax_attend(query, key, value):
    """query [N, Cq, P], key [N, Cq, Q], value [N, Cv, Q] → [N, Cv, P], softmax over Q, no scaling."""
    attn = torch.einsum("ncp,ncq->npq", query, key).softmax(-1)
    return torch.einsum("npq,ncq->ncp", attn, value)


def _reference_self_attention(block: SelfAttention2d, x):
    q, k, v = (proj(x).flatten(2) for proj in (block.query, block.key, block.value))
    return x + block.gamma * _softmax_attend(q, k, v).view_as(x)


def _reference_nonlocal(block: NonLocal, x):
    theta = block.theta(x).flatten(2)
    phi, g = (block.pool(proj(x)).flatten(2) for proj in (block.phi, block.g))
    y = _softmax_attend(theta, phi, g).unflatten(2, x.shape[2:])
    return x + block.norm(block.out_conv(y))


def _reference_channel_attention(block: ChannelAttention, x):
    maps = x.flatten(2)
    energy = torch.einsum("ncp,ndp->ncd", maps, maps)
    attn = (energy.amax(-1, keepdim=True) - energy).softmax(-1)
    return x + block.gamma * torch.einsum("ncd,ndp->ncp", attn, maps).view_as(x)


def _make_active(block: nn.Module) -> nn.Module:
    """Switch on every residual branch that starts at zero (γ = 0, zero-init norm weight)."""
    for name, param in block.named_parameters():
        if name.endswith("gamma") or name == "norm.weight":
            nn.init.ones_(param)
    return block


IDENTITY_AT_INIT = {
    "nonlocal": lambda: NonLocal(16),
    "nonlocal_subsampled": lambda: NonLocal(16, sub_sample=True),
    "self_attention": lambda: SelfAttention2d(16),
    "position": lambda: PositionAttention(16),
    "channel": lambda: ChannelAttention(16),
}


@pytest.mark.parametrize("build", IDENTITY_AT_INIT.values(), ids=IDENTITY_AT_INIT.keys())
def test_self_attention_blocks_start_as_identity(build):
    block = build()
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(block(x), x, atol=1e-6, rtol=0)


def test_dual_attention_starts_as_the_identity():
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(DualAttention(16)(x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "build, reference",
    [
        (lambda: NonLocal(16), _reference_nonlocal),
        (lambda: NonLocal(16, sub_sample=True), _reference_nonlocal),
        (lambda: NonLocal(16, inter_channels=4), _reference_nonlocal),
        (lambda: SelfAttention2d(16), _reference_self_attention),
        (lambda: PositionAttention(16), _reference_self_attention),
        (lambda: ChannelAttention(16), _reference_channel_attention),
    ],
    ids=["nonlocal", "nonlocal_subsampled", "nonlocal_inter4", "self_attention", "position", "channel"],
)
def test_self_attention_blocks_match_einsum_reference(build, reference):
    block = _make_active(build()).eval()
    x = torch.randn(2, 16, 6, 5)
    out = block(x)
    assert (out - x).abs().max() > 1e-2  # the attention branch is really on
    torch.testing.assert_close(out, reference(block, x), atol=1e-5, rtol=1e-5)


def test_nonlocal_subsampling_pools_keys_and_values_by_two():
    block = NonLocal(16, sub_sample=True)
    x = torch.randn(1, 16, 6, 4)
    assert block.pool(block.phi(x)).shape[2:] == (3, 2)


def test_dual_attention_is_sum_of_position_and_channel_attention():
    block = _make_active(DualAttention(16)).eval()
    x = torch.randn(2, 16, 5, 5)
    expected = _reference_self_attention(block.position, x) + _reference_channel_attention(block.channel, x) - x
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_every_parameter_gets_a_gradient(name):
    block = _make_active(get_attn_layer(name)(32)).train()
    x = torch.randn(2, 32, 5, 4, requires_grad=True)
    block(x).square().sum().backward()
    for param_name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    assert x.grad.abs().sum() > 0


# --- factory --------------------------------------------------------------------------------------------------------


def test_factory_names_and_none():
    assert set(ATTENTION_LAYERS) == {"none", "default", *BLOCK_NAMES}
    assert get_attn_layer("none") is None
    assert get_attn_layer("default") is None
    expected = {"se": SqueezeExcite, "sk": SelectiveKernel, "cbam": CBAM, "nonlocal": NonLocal,
                "self_attention": SelfAttention2d, "danet": DualAttention}
    for name, cls in expected.items():
        assert type(get_attn_layer(name)(16)) is cls


def test_factory_forwards_options():
    se = get_attn_layer("se", reduction=4, bias=False)(32)
    assert se.mlp.fc1.out_channels == 8 and se.mlp.fc1.bias is None
    assert isinstance(get_attn_layer("se", gate="hard_sigmoid")(32).gate, nn.Hardsigmoid)
    assert get_attn_layer("nonlocal", inter_channels=4)(16).theta.out_channels == 4


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match=r"'cbma'.*Did you mean cbam\?.*Valid: .*self_attention"):
        get_attn_layer("cbma")
    with pytest.raises(UserError, match=r"Did you mean nonlocal"):
        get_attn_layer("non_local")


def test_unknown_option_or_gate_suggests_close_matches():
    with pytest.raises(UserError, match=r"'reducton'.*Did you mean reduction\?"):
        get_attn_layer("se", reducton=8)
    with pytest.raises(UserError, match=r"'hardsigmoid'.*Did you mean hard_sigmoid"):
        SqueezeExcite(16, gate="hardsigmoid")


# --- in a network ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias, expected", [(True, 28_088_024), (False, 28_071_976)])
def test_se_resnet50_parameter_count(bias, expected):
    # SE-ResNet-50 (Hu et al. 2018, biased excitation FCs): 28,088,024 = ResNet-50's 25,557,032 plus one SE of
    # reduction 16 after bn3 of each of the 3/4/6/3 bottlenecks (256/512/1024/2048 channels).
    # Without biases, C/16 + C fewer per block: 16,048 fewer in total.
    model = create_model("resnet50", attn_layer=get_attn_layer("se", bias=bias))
    assert n_params(model) == expected
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 16
