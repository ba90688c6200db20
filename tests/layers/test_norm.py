"""get_norm_layer: every name, the GN divisor rule, and Switchable Normalization against IN / LN / BN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.norm import NORM_LAYERS, SwitchableNorm2d, get_norm_layer
from cvlab.utils.errors import UserError

EPS = 1e-5


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 6, 5, 5) * 3 + 1  # off-centre and scaled, so normalisation has work to do


def one_hot_logits(index):
    # softmax of these is exactly one-hot in float32
    logits = torch.full((3,), -1e4)
    logits[index] = 0.0
    return logits


def switchable(channels, source):
    """SwitchableNorm2d forced to use only IN (0), LN (1) or BN (2) statistics, with a non-trivial affine."""
    sn = SwitchableNorm2d(channels)
    with torch.no_grad():
        sn.mean_weight.copy_(one_hot_logits(source))
        sn.var_weight.copy_(one_hot_logits(source))
        sn.weight.copy_(torch.linspace(0.5, 2.0, channels))
        sn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return sn


def copy_affine(dst, src):
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    return dst


def test_names():
    assert NORM_LAYERS == ("default", "bn", "ln", "in", "gn", "sn", "none")
    assert get_norm_layer("default") is None


@pytest.mark.parametrize("name", [n for n in NORM_LAYERS if n != "default"])
def test_every_name_builds_and_preserves_shape(name, batch):
    layer = get_norm_layer(name)(6)
    assert layer(batch).shape == (4, 6, 5, 5)


@pytest.mark.parametrize(
    "name, cls, params", [("bn", nn.BatchNorm2d, 12), ("ln", nn.GroupNorm, 12), ("in", nn.GroupNorm, 12),
                          ("gn", nn.GroupNorm, 12), ("sn", SwitchableNorm2d, 12 + 6), ("none", nn.Identity, 0)]
)
def test_layer_types_and_parameter_counts(name, cls, params):
    layer = get_norm_layer(name)(6)
    assert type(layer) is cls
    assert sum(p.numel() for p in layer.parameters()) == params


def test_layer_norm_is_per_sample_over_chw(batch):
    out = get_norm_layer("ln")(6)(batch).flatten(1)
    assert get_norm_layer("ln")(6).num_groups == 1
    torch.testing.assert_close(out.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


def test_instance_norm_is_per_sample_per_channel(batch):
    layer = get_norm_layer("in")(6)
    assert layer.affine and layer.num_groups == 6
    out = layer(batch).flatten(2)
    torch.testing.assert_close(out.mean(2), torch.zeros(4, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(2, unbiased=False), torch.ones(4, 6), atol=1e-3, rtol=0)
    reference = nn.InstanceNorm2d(6, affine=True, track_running_stats=False)
    torch.testing.assert_close(layer(batch), reference(batch), atol=1e-5, rtol=0)


def test_instance_norm_trains_on_a_one_by_one_map():
    layer = get_norm_layer("in")(6)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(6.0))
    out = layer(torch.randn(4, 6, 1, 1))
    torch.testing.assert_close(out, torch.arange(6.0).view(1, 6, 1, 1).expand(4, 6, 1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels, num_groups, expected", [(64, 32, 32), (24, 32, 24), (48, 32, 24), (3, 32, 3),
                                                            (12, 8, 6), (96, 32, 32)])
def test_group_norm_divisor_rule(channels, num_groups, expected):
    assert get_norm_layer("gn", num_groups=num_groups)(channels).num_groups == expected


@pytest.mark.parametrize("name", ["gn", "ln", "in", "sn"])
def test_output_independent_of_batch_size(name, batch):
    layer = get_norm_layer(name)(6).eval()  # eval matters only for sn (its BN part then uses running stats)
    torch.testing.assert_close(layer(batch[:1]), layer(batch)[:1], atol=1e-6, rtol=0)


def test_batch_norm_uses_running_stats_in_eval(batch):
    bn = get_norm_layer("bn")(6)
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    out = bn.eval()(batch)
    torch.testing.assert_close(out, (batch - 2.0) / (4.0 + EPS) ** 0.5)


def test_options_reach_the_layer():
    assert get_norm_layer("bn", momentum=0.5)(4).momentum == 0.5
    assert get_norm_layer("ln", eps=1e-3)(4).eps == 1e-3
    assert get_norm_layer("sn", momentum=0.3)(4).momentum == 0.3


def test_unknown_name_and_option_are_user_errors():
    with pytest.raises(UserError, match=r"unknown norm 'bnn'\. Did you mean bn.*Valid: default, bn, ln, in, gn, sn"):
        get_norm_layer("bnn")
    with pytest.raises(UserError, match=r"norm=bn has no option 'epsilon'.*eps"):
        get_norm_layer("bn", epsilon=1e-3)
    with pytest.raises(UserError, match="takes no options"):
        get_norm_layer("none", eps=1e-3)


def test_switchable_mixing_weights_start_equal_and_sum_to_one():
    sn = SwitchableNorm2d(6)
    with torch.no_grad():
        sn.var_weight.copy_(torch.tensor([0.3, -2.0, 1.5]))
    for logits in (sn.mean_weight, sn.var_weight):
        assert F.softmax(logits, 0).sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(F.softmax(sn.mean_weight, 0), torch.full((3,), 1 / 3))


def test_switchable_with_in_weights_equals_instance_norm(batch):
    sn = switchable(6, 0)
    reference = copy_affine(nn.InstanceNorm2d(6, affine=True), sn)
    torch.testing.assert_close(sn(batch), reference(batch), atol=1e-5, rtol=0)


def test_switchable_with_ln_weights_equals_layer_norm(batch):
    sn = switchable(6, 1)
    reference = copy_affine(nn.GroupNorm(1, 6), sn)
    torch.testing.assert_close(sn(batch), reference(batch), atol=1e-5, rtol=0)


def test_switchable_with_bn_weights_equals_batch_norm_in_training_and_eval(batch):
    sn = switchable(6, 2)
    reference = copy_affine(nn.BatchNorm2d(6), sn)
    for step in range(3):  # a few steps, so the running statistics differ from their start values
        x = batch * (step + 1)
        torch.testing.assert_close(sn(x), reference(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(sn.running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sn.running_var, reference.running_var, atol=1e-5, rtol=1e-5)
    sn.eval(), reference.eval()
    torch.testing.assert_close(sn(batch), reference(batch), atol=1e-5, rtol=0)


def test_switchable_training_updates_running_stats_like_batch_norm(batch):
    sn = SwitchableNorm2d(6)
    sn(batch)
    per_channel = batch.transpose(0, 1).flatten(1)
    torch.testing.assert_close(sn.running_mean, 0.1 * per_channel.mean(1))
    torch.testing.assert_close(sn.running_var, 0.9 + 0.1 * per_channel.var(1, unbiased=True))


def test_switchable_eval_output_does_not_depend_on_the_batch(batch):
    sn = SwitchableNorm2d(6)
    sn(batch)  # non-trivial running statistics
    other = torch.randn(3, 6, 5, 5) * 10 - 4
    sn.eval()
    alone = sn(batch[:1])
    torch.testing.assert_close(sn(torch.cat([batch[:1], other])), torch.cat([alone, sn(other)]), atol=1e-6, rtol=0)
    sn.train()  # in training the BN part comes from the batch, so the same sample's output changes
    assert (sn(torch.cat([batch[:1], other]))[:1] - sn(batch[:2])[:1]).abs().max() > 1e-2


def test_switchable_mixing_weights_are_learned(batch):
    sn = SwitchableNorm2d(6)
    (sn(batch) * torch.randn_like(batch)).sum().backward()
    for param in (sn.mean_weight, sn.var_weight, sn.weight, sn.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_per_channel_norms_on_single_pixel_maps_are_named():
    from cvlab.layers.norm import single_pixel_instance_norms
    from cvlab.models import create_model

    def resnet(norm):
        return create_model("resnet18", num_classes=10, in_chans=1, image_size=8, norm_layer=get_norm_layer(norm))

    found = single_pixel_instance_norms(resnet("in"), torch.zeros(2, 1, 8, 8))
    assert found and all(name.startswith("layer4.") for name in found)  # digits: only the last stage is 1×1
    assert single_pixel_instance_norms(resnet("in"), torch.zeros(2, 1, 64, 64)) == []
    net = resnet("bn")
    net.forward = None  # no per-channel norm: the check must not run the network at all
    assert single_pixel_instance_norms(net, torch.zeros(2, 1, 8, 8)) == []


def test_training_warns_about_instance_norm_on_single_pixel_maps(monkeypatch):
    from types import SimpleNamespace

    from cvlab.engine import build_datamodule, build_task
    from cvlab.utils.config import compose

    lines = []
    monkeypatch.setattr("cvlab.utils.console.print_warning", lines.append)
    for norm, warned in (("in", 1), ("gn", 1)):  # gn adds no line: its layer4 groups hold 16 channels
        cfg = compose("train", ["model=resnet18", f"norm={norm}", "logger=none"])
        task = build_task(cfg, build_datamodule(cfg))
        monkeypatch.setattr(type(task), "trainer", SimpleNamespace(is_global_zero=True), raising=False)
        task._warn_about_training(torch.optim.SGD(task.parameters(), lr=0.1))
        assert len(lines) == warned
    assert "layer4." in lines[0] and "data.image_size=8" in lines[0] and "norm=bn, gn or ln" in lines[0]
