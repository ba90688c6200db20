"""get_act_layer: values at chosen points for every name, Swish's β, and errors for unknown names / options."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.activation import ACT_LAYERS, Swish, get_act_layer
from cvlab.utils.errors import UserError


def act(name, x, **options):
    return get_act_layer(name, **options)()(torch.tensor(x, dtype=torch.float32)).item()


def test_names_cover_the_curriculum():
    assert ACT_LAYERS == ("default", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "prelu", "swish", "mish",
                          "gelu", "gelu_tanh", "hard_swish", "relu6")
    assert get_act_layer("default") is None


@pytest.mark.parametrize(
    "name, x, expected",
    [
        ("sigmoid", 0.0, 0.5),
        ("sigmoid", 2.0, 1 / (1 + math.exp(-2))),
        ("tanh", 1.0, math.tanh(1)),
        ("relu", -2.0, 0.0),
        ("relu", 3.0, 3.0),
        ("leaky_relu", -1.0, -0.01),
        ("leaky_relu", 2.0, 2.0),
        ("elu", -1.0, math.exp(-1) - 1),
        ("elu", 2.0, 2.0),
        ("prelu", -2.0, -0.5),
        ("swish", 1.0, 1 / (1 + math.exp(-1))),
        ("swish", -2.0, -2 / (1 + math.exp(2))),
        ("mish", 1.0, math.tanh(math.log1p(math.e))),
        ("mish", -1.0, -math.tanh(math.log1p(math.exp(-1)))),
        ("gelu", 1.0, 0.5 * (1 + math.erf(1 / math.sqrt(2)))),
        ("gelu_tanh", 1.0, 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (1 + 0.044715)))),
        ("hard_swish", 1.0, 1 * 4 / 6),
        ("hard_swish", -3.0, 0.0),
        ("hard_swish", 3.0, 3.0),
        ("relu6", 7.0, 6.0),
        ("relu6", -1.0, 0.0),
    ],
)
def test_values(name, x, expected):
    assert act(name, x) == pytest.approx(expected, abs=1e-6)


def test_options_reach_the_module():
    assert act("leaky_relu", -1.0, negative_slope=0.2) == pytest.approx(-0.2)
    assert act("elu", -1.0, alpha=2.0) == pytest.approx(2 * (math.exp(-1) - 1))
    assert act("swish", 1.0, beta=2.0) == pytest.approx(1 / (1 + math.exp(-2)))


def test_swish_equals_x_sigmoid_x_and_silu():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(Swish()(x), x * torch.sigmoid(x))
    torch.testing.assert_close(Swish()(x), F.silu(x), atol=0, rtol=0)
    torch.testing.assert_close(Swish(beta=0.5)(x), x * torch.sigmoid(0.5 * x))
    assert len(list(Swish().parameters())) == 0


def test_swish_learnable_beta_gets_a_gradient():
    swish = get_act_layer("swish", beta=1.0, learnable=True)()
    assert [p.numel() for p in swish.parameters()] == [1]
    x = torch.linspace(-3, 3, 13)
    swish(x).sum().backward()
    # d/dβ Σ x·sigmoid(βx) = Σ x²·σ(βx)(1 − σ(βx))
    expected = (x**2 * torch.sigmoid(x) * (1 - torch.sigmoid(x))).sum()
    assert swish.beta.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gelu_exact_and_tanh_approximation_are_close_but_different():
    x = torch.linspace(-5, 5, 1001)
    diff = (get_act_layer("gelu")()(x) - get_act_layer("gelu_tanh")()(x)).abs().max().item()
    assert 0 < diff < 1e-3


def test_prelu_has_one_learnable_slope_initialised_to_quarter_per_module():
    make = get_act_layer("prelu")
    first, second = make(), make()
    assert isinstance(first, nn.PReLU)
    assert [p.tolist() for p in first.parameters()] == [[0.25]]
    assert first.weight.requires_grad
    assert first.weight is not second.weight  # each layer learns its own slope


def test_unknown_name_and_option_are_user_errors():
    with pytest.raises(UserError, match=r"unknown activation 'gleu'\. Did you mean gelu"):
        get_act_layer("gleu")
    with pytest.raises(UserError, match=r"Did you mean swish"):
        get_act_layer("swich")
    with pytest.raises(UserError, match=r"activation=leaky_relu has no option 'slope'.*negative_slope"):
        get_act_layer("leaky_relu", slope=0.1)
    with pytest.raises(UserError, match=r"activation=sigmoid has no option 'inplace'; it takes no options"):
        get_act_layer("sigmoid", inplace=True)
