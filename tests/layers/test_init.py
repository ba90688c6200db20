"""get_init: each scheme's distribution on a large Linear / Conv (std or bound to 3%), biases and norm layers."""
import math

import pytest
import torch
from torch import nn

from cvlab.layers.init import INIT_SCHEMES, get_init
from cvlab.layers.norm import SwitchableNorm2d
from cvlab.utils.errors import UserError

FAN_IN, FAN_OUT = 1000, 500


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(FAN_IN, FAN_OUT)  # weight [500, 1000]: 500k samples, so std estimates are within ~0.2%


def initialised(module, name, **options):
    get_init(name, **options)(module)
    return module


def test_names_cover_the_curriculum():
    assert INIT_SCHEMES == ("default", "pytorch", "zeros", "normal", "xavier_uniform", "xavier_normal",
                            "kaiming_uniform", "kaiming_normal")
    assert get_init("default") is None


@pytest.mark.parametrize(
    "name, options, expected_std",
    [
        ("normal", {}, 1.0),
        ("normal", {"std": 0.02}, 0.02),
        ("xavier_normal", {}, math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_normal", {"gain": 2.0}, 2 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("kaiming_normal", {}, math.sqrt(2 / FAN_IN)),
        ("kaiming_normal", {"mode": "fan_out"}, math.sqrt(2 / FAN_OUT)),
        ("kaiming_normal", {"a": 1.0, "nonlinearity": "leaky_relu"}, math.sqrt(1 / FAN_IN)),  # gain sqrt(2/(1+a²))
    ],
)
def test_normal_schemes_std(linear, name, options, expected_std):
    weight = initialised(linear, name, **options).weight
    assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(weight.mean().item()) < 0.01 * expected_std


@pytest.mark.parametrize(
    "name, options, bound",
    [
        ("xavier_uniform", {}, math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("xavier_uniform", {"gain": 0.5}, 0.5 * math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("kaiming_uniform", {}, math.sqrt(6 / FAN_IN)),
        ("kaiming_uniform", {"mode": "fan_out"}, math.sqrt(6 / FAN_OUT)),
    ],
)
def test_uniform_schemes_bound(linear, name, options, bound):
    weight = initialised(linear, name, **options).weight
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # std of U(-b, b)


def test_zeros(linear):
    assert initialised(linear, "zeros").weight.abs().sum().item() == 0


@pytest.mark.parametrize("name", [n for n in INIT_SCHEMES if n not in ("default", "pytorch")])
def test_biases_are_zeroed(linear, name):
    assert linear.bias.abs().sum() > 0
    assert initialised(linear, name).bias.abs().sum().item() == 0


def test_pytorch_scheme_is_uniform_one_over_sqrt_fan_in_for_weight_and_bias(linear):
    initialised(linear, "zeros")
    initialised(linear, "pytorch")
    bound = 1 / math.sqrt(FAN_IN)
    for tensor in (linear.weight, linear.bias):
        assert tensor.abs().max().item() <= bound
        assert tensor.abs().max().item() > 0.95 * bound
    assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_conv_fans_include_kernel_area_and_groups():
    torch.manual_seed(0)
    conv = initialised(nn.Conv2d(64, 128, 3), "kaiming_normal")  # fan_in = 64·3·3 = 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    conv = initialised(nn.Conv2d(64, 128, 3), "kaiming_normal", mode="fan_out")  # fan_out = 128·3·3 = 1152
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.03)
    grouped = initialised(nn.Conv2d(64, 256, 3, groups=8), "kaiming_normal")  # fan_in = 64/8·3·3 = 72
    assert grouped.weight.std().item() == pytest.approx(math.sqrt(2 / 72), rel=0.03)
    conv = initialised(nn.Conv2d(64, 128, 3), "xavier_uniform")
    assert conv.weight.abs().max().item() <= math.sqrt(6 / (576 + 1152))
    assert conv.bias.abs().sum().item() == 0


def test_walks_every_layer_kind_and_resets_norms():
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3), nn.Conv3d(4, 8, 3), nn.ConvTranspose2d(4, 8, 3), nn.Conv2d(4, 8, 3),
        nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.LayerNorm(8), SwitchableNorm2d(8),
        nn.InstanceNorm2d(8, affine=False), nn.Linear(8, 3),
    )
    for module in model:
        for param in module.parameters():
            nn.init.constant_(param, 5.0)
    initialised(model, "zeros")
    for module in model:
        if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Conv2d, nn.Linear)):
            assert module.weight.abs().sum().item() == 0 and module.bias.abs().sum().item() == 0
    for norm in model[4:8]:
        assert norm.weight.eq(1).all() and norm.bias.eq(0).all()
    assert model[7].mean_weight.eq(5).all()  # SN's mixing logits are not conv/linear/affine weights


def test_unknown_name_and_option_are_user_errors():
    with pytest.raises(UserError, match=r"unknown init 'kaiming'\. Did you mean kaiming_normal, kaiming_uniform"):
        get_init("kaiming")
    with pytest.raises(UserError, match=r"init=xavier_normal has no option 'std'; its options are gain, generator"):
        get_init("xavier_normal", std=1.0)
    with pytest.raises(UserError, match=r"init=pytorch has no option 'gain'; it takes no options"):
        get_init("pytorch", gain=1.0)
