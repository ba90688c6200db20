"""Darknet-19 / Darknet-53 / TinyDarknet: exact sizes and FLOPs, stage features, small-image stem, width and the
norm / activation / attention options."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvlab.layers.attention import NonLocal
from cvlab.models import create_model, list_models
from cvlab.models.backbones.darknet import Darknet, DarknetResidual, TinyDarknet, tiny_darknet_features
from cvlab.models.backbones.features import FeatureExtractor

torch.set_num_threads(1)

# name: (params at 1000 classes, FLOPs = 2·MACs at the paper's input size, that size, conv layers, linear layers)
SIZES = {
    "darknet19": (20_842_376, 5_581_979_648, 224, 19, 0),  # paper: 5.58 Bn operations at 224
    "darknet53": (41_609_928, 18_570_231_808, 256, 52, 1),  # paper: 18.7 Bn operations at 256
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_registered_as_classifiers():
    assert {"darknet19", "darknet53"} <= set(list_models(task="classification"))


@pytest.mark.parametrize("name", SIZES)
def test_exact_size_flops_and_layers(name):
    params, flops, size, convs, linears = SIZES[name]
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, image_size=size)
        with FlopCounterMode(display=False) as counter:
            logits = model(torch.empty(1, 3, size, size))
    assert logits.shape == (1, 1000)
    assert n_params(model) == params
    assert counter.get_total_flops() == flops
    assert (count(model, nn.Conv2d), count(model, nn.Linear)) == (convs, linears)
    assert count(model, nn.LeakyReLU) == (18 if name == "darknet19" else 52)
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))


def test_darknet53_has_1_2_8_8_4_residual_blocks():
    model = Darknet(53, num_classes=10, width=0.125)
    assert [sum(isinstance(m, DarknetResidual) for m in stage) for stage in model.stages] == [1, 2, 8, 8, 4]


@pytest.mark.parametrize("depth", [19, 53])
def test_c3_c4_c5_features_and_feature_info(depth):
    model = Darknet(depth, num_classes=10, width=0.125).eval()
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [
        (4, 1), (8, 2), (16, 4), (32, 8), (64, 16), (128, 32)]
    assert model.feature_info.module_names() == ["stem"] + [f"stages.{i}" for i in range(5)]
    features = FeatureExtractor(model, out_indices=(-3, -2, -1)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        c3, c4, c5 = features(x)
        torch.testing.assert_close(model.forward_features(x), c5, rtol=0, atol=0)
    assert c3.shape == (2, 32, 8, 12) and c4.shape == (2, 64, 4, 6) and c5.shape == (2, 128, 2, 3)
    assert n_params(features) == n_params(model) - n_params(model.head)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["darknet19", "darknet53"])
def test_small_image_stem_runs_8px_digits(name):
    model = create_model(name, num_classes=10, in_chans=1, image_size=8, width=0.125)
    assert [i["reduction"] for i in model.feature_info] == [1, 1, 1, 2, 4, 8]
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 128, 1, 1)
    assert create_model(name, image_size=224, width=0.125).feature_info[-1]["reduction"] == 32
    # stem= overrides the size rule, as for ResNet and MobileNet.
    assert create_model(name, image_size=8, stem="standard", width=0.125).feature_info[-1]["reduction"] == 32
    assert create_model(name, image_size=224, stem="small", width=0.125).feature_info[-1]["reduction"] == 8


@pytest.mark.parametrize("name", ["darknet19", "darknet53"])
def test_backward_reaches_every_parameter(name):
    model = create_model(name, num_classes=5, image_size=32, width=0.125)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_width_multiplier_scales_channels():
    model = create_model("darknet53", num_classes=10, width=0.5)
    assert [i["num_chs"] for i in model.feature_info] == [16, 32, 64, 128, 256, 512]
    assert model.stages[2][1].reduce[0].out_channels == 64  # residual 1×1 halves the stage width


def test_norm_act_attn_replace_every_layer():
    model = create_model("darknet53", num_classes=10, image_size=32, width=0.125,
                         norm_layer=lambda c: nn.GroupNorm(1, c), act_layer=nn.ReLU, attn_layer=lambda c: nn.Sigmoid())
    assert count(model, nn.BatchNorm2d) == 0 and count(model, nn.GroupNorm) == 52
    assert count(model, nn.LeakyReLU) == 0 and count(model, nn.ReLU) == 52
    assert count(model, nn.Sigmoid) == 23  # one per residual block, on the branch before the add
    seen = []
    with_attn = create_model("darknet19", num_classes=10, image_size=32, width=0.125,
                             attn_layer=lambda c: seen.append(c) or nn.Identity())
    assert seen == [8, 16, 32, 64, 128]  # once per stage, after its last conv
    assert with_attn(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_tiny_darknet_features_and_stride1_pool():
    features = tiny_darknet_features(out_indices=(-3, -1), width=0.25).eval()
    with torch.no_grad():
        c4, c5 = features(torch.randn(2, 3, 64, 64))
    assert c4.shape == (2, 64, 4, 4) and c5.shape == (2, 256, 2, 2)
    assert features.feature_info == [dict(num_chs=64, reduction=16, module="stages.4.attn"),
                                     dict(num_chs=256, reduction=32, module="final_conv")]
    trunk = TinyDarknet(width=0.25)
    assert trunk.feature_info.channels() == [4, 8, 16, 32, 64, 128, 256]
    assert trunk.feature_info.reductions() == [1, 2, 4, 8, 16, 32, 32]
    assert n_params(features) == n_params(trunk)  # the last map needs every layer
    # The stride-16 map is taken before its pool: up to there the trunk holds stages 0..4 without the pool.
    assert not hasattr(tiny_darknet_features(out_indices=(4,), width=0.25).stages[4], "pool")
    # Darknet's size-2 stride-1 pool ignores positions beyond the border.
    pool = trunk.stages[-1].pool
    x = torch.tensor([[[[1.0, -5.0, 2.0], [-1.0, -2.0, -3.0], [0.5, -4.0, -6.0]]]])
    expected = torch.tensor([[[[1.0, 2.0, 2.0], [0.5, -2.0, -3.0], [0.5, -4.0, -6.0]]]])
    torch.testing.assert_close(pool(x), expected)


def test_tiny_darknet_features_keep_the_attention_blocks_own_init():
    # Darknet's init sets every norm weight to 1; the non-local block's output norm must start at 0 (identity).
    features = tiny_darknet_features(width=0.125, attn_layer=NonLocal)
    blocks = [m for m in features.modules() if isinstance(m, NonLocal)]
    assert len(blocks) == 6 and all(bool((block.norm.weight == 0).all()) for block in blocks)
