"""MobileNet v1/v2/v3: exact sizes, torchvision parity, small-input rule, GDC, norm/act/attn replacement, stages."""
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cvlab.models import create_model, list_models
from cvlab.models.backbones.mobilenet import SqueezeExcite, make_divisible, mobilenetv1, mobilenetv2, mobilenetv3_small

torch.set_num_threads(1)

PARAMS = {
    "mobilenetv1": 4_231_976,
    "mobilenetv2": 3_504_872,
    "mobilenetv3_small": 2_542_856,
    "mobilenetv3_large": 5_483_032,
}
TORCHVISION = {"mobilenetv2": "mobilenet_v2", "mobilenetv3_small": "mobilenet_v3_small",
               "mobilenetv3_large": "mobilenet_v3_large"}
N_BLOCKS = {"mobilenetv1": 13, "mobilenetv2": 17, "mobilenetv3_small": 11, "mobilenetv3_large": 15}
N_SE = {"mobilenetv1": 0, "mobilenetv2": 0, "mobilenetv3_small": 9, "mobilenetv3_large": 8}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def v2_keys_from_torchvision(state_dict: dict) -> dict:
    """torchvision's InvertedResidual keeps the projection as two entries ``conv.{k}`` (Conv2d) and ``conv.{k+1}``
    (BN); ours holds them in one ConvNormAct ``block.{k}.0`` / ``block.{k}.1``. Every other key is the same."""
    pattern = re.compile(r"(features\.\d+)\.conv\.(\d+)\.(.*)")
    last = {}
    for key in state_dict:
        if match := pattern.fullmatch(key):
            last[match[1]] = max(last.get(match[1], 0), int(match[2]))
    renamed = {}
    for key, value in state_dict.items():
        if match := pattern.fullmatch(key):
            block, index, rest = match[1], int(match[2]), match[3]
            if index == last[block] - 1:
                key = f"{block}.block.{index}.0.{rest}"
            elif index == last[block]:
                key = f"{block}.block.{index - 1}.1.{rest}"
            else:
                key = f"{block}.block.{index}.{rest}"
        renamed[key] = value
    return renamed


def test_make_divisible():
    assert [make_divisible(v) for v in (32, 32 * 0.35, 1280 * 1.4, 20, 9)] == [32, 16, 1792, 24, 16]


@pytest.mark.parametrize("name", PARAMS)
def test_param_count(name):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000, image_size=224)
        if name in TORCHVISION:
            assert n_params(getattr(torchvision.models, TORCHVISION[name])(weights=None)) == PARAMS[name]
    assert n_params(ours) == PARAMS[name]
    assert name in list_models(task="classification")


@pytest.mark.parametrize("name, width", [("mobilenetv2", 0.5), ("mobilenetv2", 1.4), ("mobilenetv3_small", 0.75),
                                         ("mobilenetv3_large", 0.5)])
def test_width_mult_matches_torchvision(name, width):
    with torch.device("meta"):
        ours = create_model(name, width_mult=width)
        theirs = getattr(torchvision.models, TORCHVISION[name])(weights=None, width_mult=width)
    assert n_params(ours) == n_params(theirs)


def test_mobilenetv1_width_mult():
    with torch.device("meta"):
        model = mobilenetv1(width_mult=0.5)
    assert [info["num_chs"] for info in model.feature_info] == [32, 64, 128, 256, 512]
    # Paper Table 6: 0.50 MobileNet-224 has 1.3 million parameters.
    assert n_params(model) == 1_331_592


@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv3_small", "mobilenetv3_large"])
def test_forward_parity_with_torchvision(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
    ours = create_model(name).eval()
    state = theirs.state_dict()
    # v3's keys are torchvision's; v2's projection keys are renamed.
    ours.load_state_dict(v2_keys_from_torchvision(state) if name == "mobilenetv2" else state, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_small_input_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, image_size=8)
    assert model.features[0][0].stride == (1, 1)
    assert model.feature_info[-1]["reduction"] == 8  # stem and first strided block lose their stride
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("image_size, stem, size", [(224, "auto", 7), (32, "auto", 4), (64, "standard", 2),
                                                  (224, "small", 28)])
def test_feature_map_size(image_size, stem, size):
    with torch.device("meta"):
        model = mobilenetv3_small(image_size=image_size, stem=stem)
        features = model.forward_features(torch.empty(2, 3, image_size, image_size))
    assert features.shape == (2, 576, size, size)
    assert model.feature_size == size


@pytest.mark.parametrize("name, channels", [("mobilenetv1", 1024), ("mobilenetv2", 1280),
                                            ("mobilenetv3_small", 576), ("mobilenetv3_large", 960)])
@pytest.mark.parametrize("image_size, size", [(224, 7), (32, 4)])
def test_gdc_head_param_count(name, channels, image_size, size):
    with torch.device("meta"):
        gap = create_model(name, image_size=image_size)
        gdc = create_model(name, image_size=image_size, head="gdc")
        logits = gdc(torch.empty(2, 3, image_size, image_size))
    assert n_params(gdc) == n_params(gap) + channels * size**2 + 2 * channels
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("name, default_act", [("mobilenetv1", nn.ReLU), ("mobilenetv2", nn.ReLU6),
                                               ("mobilenetv3_small", nn.Hardswish)])
def test_norm_and_act_replacement(name, default_act):
    model = create_model(name, num_classes=10, image_size=16, norm_layer=lambda c: nn.GroupNorm(8, c),
                         act_layer=nn.GELU)
    default = create_model(name, num_classes=10, image_size=16)
    assert count(model, nn.BatchNorm2d) == 0
    assert count(model, nn.GroupNorm) == count(default, nn.BatchNorm2d)
    assert count(model, nn.ReLU) == count(model, nn.ReLU6) == count(model, nn.Hardswish) == 0
    activations = count(default, nn.ReLU) + count(default, nn.ReLU6) + count(default, nn.Hardswish)
    assert count(default, default_act) > 0 and count(model, nn.GELU) == activations
    assert count(model, nn.Hardsigmoid) == N_SE[name]  # SE gates are kept
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class CountingAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.calls = 0

    def forward(self, x):
        assert x.shape[1] == self.channels
        self.calls += 1
        return x


@pytest.mark.parametrize("name", PARAMS)
def test_attn_layer_in_every_block_without_se(name):
    model = create_model(name, num_classes=10, image_size=16, attn_layer=CountingAttention)
    attentions = [m for m in model.modules() if isinstance(m, CountingAttention)]
    assert len(attentions) == N_BLOCKS[name] - N_SE[name]
    assert count(model, SqueezeExcite) == N_SE[name]
    model(torch.randn(2, 3, 16, 16))
    assert all(a.calls == 1 for a in attentions)


def test_attn_layer_follows_depthwise_conv():
    model = mobilenetv2(image_size=16, attn_layer=CountingAttention)
    block = model.features[2].block  # 16 → 96 expand, depthwise 96, attention on 96, project to 24
    assert block[1][0].groups == 96 and isinstance(block[2], CountingAttention) and block[2].channels == 96


@pytest.mark.parametrize("name, channels, ends", [("mobilenetv2", [16, 24, 32, 96, 1280], [1, 3, 6, 13, 18]),
                                                  ("mobilenetv3_large", [16, 24, 40, 112, 960], [1, 3, 6, 12, 16])])
def test_stages_match_torchvision_feature_extractor(name, channels, ends):
    """Each stage ends with the last layer before a stride-2 one: torchvision's ``features.<i>`` nodes."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
    features = create_model(name, features_only=True, image_size=64, stem="standard").eval()
    nodes = [f"features.{end}" for end in ends]
    assert features.feature_info.module_names() == nodes
    assert features.feature_info.channels() == channels
    assert features.feature_info.reductions() == [2, 4, 8, 16, 32]
    state = theirs.state_dict()
    missing, _ = features.load_state_dict(v2_keys_from_torchvision(state) if name == "mobilenetv2" else state,
                                          strict=False)
    assert missing == []
    reference = create_feature_extractor(theirs, return_nodes=nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, expected = features(x), reference(x)
    for output, node in zip(ours, nodes):
        torch.testing.assert_close(output, expected[node], rtol=0, atol=0)
    assert ours[-1].shape == (2, channels[-1], 2, 2)


def test_init_and_defaults():
    model = mobilenetv3_small(image_size=16)
    assert model.classifier[2].p == 0.2 and mobilenetv1(image_size=16).classifier[0].p == 0.0
    bn = model.features[0][1]
    assert bn.eps == 1e-3 and bn.momentum == 0.1  # the small-input rule (tests/test_zoo_defaults.py)
    with torch.device("meta"):
        assert mobilenetv3_small().features[0][1].momentum == 0.01  # the paper's at 224 px
    with torch.no_grad():
        fc = model.classifier[-1]
        assert abs(fc.weight.std().item() - 0.01) < 0.001 and bool((fc.bias == 0).all())
    with pytest.raises(ValueError):
        mobilenetv2(stem="tiny")
