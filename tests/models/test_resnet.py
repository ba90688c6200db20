"""ResNet / ResNeXt: exact sizes, torchvision parity, and cvlab's options (stem, output stride, GDC, norm/act/attn)."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cvlab.models import create_model, list_models
from cvlab.models.backbones.resnet import BasicBlock, resnet18, resnet50, resnext50_32x4d

torch.set_num_threads(1)

PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", PARAMS)
def test_param_count_matches_paper_and_torchvision(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = create_model(name, num_classes=1000, image_size=224)
        theirs = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == PARAMS[name]
    assert n_params(theirs) == PARAMS[name]


def test_registered():
    assert set(PARAMS) <= set(list_models(task="classification"))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_forward_parity_with_torchvision(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name).eval()
    # Same key names: torchvision's state_dict loads strictly, no mapping.
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_dilated_parity_with_torchvision():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    ours = resnet50(image_size=64, stem="standard", output_stride=8).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_stride, size, reductions", [(32, 7, [2, 4, 8, 16, 32]), (16, 14, [2, 4, 8, 16, 16]),
                                                             (8, 28, [2, 4, 8, 8, 8])])
def test_output_stride(output_stride, size, reductions):
    with torch.device("meta"):
        model = resnet50(output_stride=output_stride)
        features = model.forward_features(torch.empty(1, 3, 224, 224))
    assert features.shape == (1, 2048, size, size)
    assert n_params(model) == PARAMS["resnet50"]
    assert [info["reduction"] for info in model.feature_info] == reductions


def test_small_input_forward_and_backward():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_chans=1, image_size=8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("image_size, stem, small", [(64, "auto", True), (65, "auto", False), (224, "small", True),
                                                   (32, "standard", False)])
def test_stem_choice(image_size, stem, small):
    with torch.device("meta"):
        model = resnet18(image_size=image_size, stem=stem)
    assert isinstance(model.maxpool, nn.Identity) == small
    assert model.conv1.kernel_size == ((3, 3) if small else (7, 7))


def test_deep_stem():
    """ResNet-C (MMSegmentation's ResNetV1c): 3×3 convs 3→32 (stride 2), 32→32, 32→64 in conv1, then bn1 / act1 /
    max-pool; 19,232 parameters more than the 7×7 stem, same stages and reductions at every image size."""
    with torch.device("meta"):
        deep = resnet50(stem="deep", image_size=32)  # no small-stem rule: the deep stem is asked for by name
    convs = [m for m in deep.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert count(deep.conv1, nn.BatchNorm2d) == 2 and isinstance(deep.maxpool, nn.MaxPool2d)
    assert n_params(deep) == PARAMS["resnet50"] + 19_232 == 25_576_264
    assert [info["reduction"] for info in deep.feature_info] == [2, 4, 8, 16, 32]
    features = create_model("resnet18", features_only=True, stem="deep", norm_layer=lambda c: nn.GroupNorm(4, c))
    assert count(features.conv1, nn.GroupNorm) == 2
    outputs = features(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                     (512, 2, 2)]
    with pytest.raises(ValueError, match="'deep'"):
        resnet18(stem="deeper")


@pytest.mark.parametrize("image_size, output_stride, feature_size",
                         [(224, 32, 7), (224, 8, 28), (8, 32, 1), (32, 32, 4)])
def test_gdc_head_param_count(image_size, output_stride, feature_size):
    with torch.device("meta"):
        gap = resnet18(image_size=image_size, output_stride=output_stride)
        gdc = resnet18(image_size=image_size, output_stride=output_stride, head="gdc")
        logits = gdc(torch.empty(2, 3, image_size, image_size))
    channels = 512
    assert gdc.feature_size == feature_size
    assert n_params(gdc) == n_params(gap) + channels * feature_size**2 + 2 * channels
    assert logits.shape == (2, 1000)


def test_gdc_small_input_trains():
    model = resnet18(num_classes=10, in_chans=1, image_size=8, head="gdc")
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_norm_and_act_replacement():
    model = resnet18(num_classes=10, image_size=32, norm_layer=lambda c: nn.GroupNorm(8, c), act_layer=nn.GELU)
    assert count(model, nn.BatchNorm2d) == 0
    assert count(model, nn.GroupNorm) == 20  # stem 1 + 8 blocks × 2 + 3 downsample projections
    assert count(model, nn.ReLU) == 0
    assert count(model, nn.GELU) == 17  # stem 1 + 8 blocks × 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class ZeroAttention(nn.Module):
    """Multiplies by 0: a block whose branch is silenced must reduce to act(shortcut)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.calls = 0

    def forward(self, x):
        assert x.shape[1] == self.channels
        self.calls += 1
        return x * 0


@pytest.mark.parametrize("factory, n_blocks", [(resnet18, 8), (resnet50, 16)])
def test_attn_layer_once_per_block_before_add(factory, n_blocks):
    model = factory(num_classes=10, image_size=16, attn_layer=ZeroAttention).eval()
    attentions = [m for m in model.modules() if isinstance(m, ZeroAttention)]
    assert len(attentions) == n_blocks
    block = model.layer1[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        shortcut = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(block(x), torch.relu(shortcut))
        model(torch.randn(2, 3, 16, 16))
    assert [a.calls for a in attentions] == [2] + [1] * (n_blocks - 1)  # layer1[0] ran twice above


def test_zero_init_residual_makes_blocks_identity():
    model = resnet18(image_size=16, zero_init_residual=True).eval()
    assert all(bool((b.bn2.weight == 0).all()) for b in model.modules() if isinstance(b, BasicBlock))
    x = torch.rand(2, 64, 16, 16)  # non-negative, so relu(x + 0) == x
    with torch.no_grad():
        torch.testing.assert_close(model.layer1(x), x)
    plain = resnet18(image_size=16)
    assert bool((plain.layer1[0].bn2.weight == 1).all())


def test_init_follows_torchvision():
    torch.manual_seed(0)
    model = resnext50_32x4d(image_size=32)
    conv = model.layer3[0].conv1  # 1×1, 512 → 512, fan_out = 512
    assert abs(conv.weight.std().item() - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)


def test_stages_match_torchvision_feature_extractor():
    """The stages are torchvision's nodes (our ``act1`` is its stem ``relu``); the trunk keeps torchvision's keys."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(weights=None).eval()
    features = create_model("resnet50", features_only=True, image_size=64, stem="standard").eval()
    assert features.feature_info.module_names() == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert features.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert features.feature_info.reductions() == [2, 4, 8, 16, 32]
    missing, unexpected = features.load_state_dict(theirs.state_dict(), strict=False)
    assert missing == [] and unexpected == ["fc.weight", "fc.bias"]
    nodes = ["relu", "layer1", "layer2", "layer3", "layer4"]
    reference = create_feature_extractor(theirs, return_nodes=nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, expected = features(x), reference(x)
    for output, node in zip(ours, nodes):
        torch.testing.assert_close(output, expected[node], rtol=0, atol=0)
    assert [tuple(o.shape[-2:]) for o in ours] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_drop_rate_and_bad_options():
    assert resnet18(image_size=16, drop_rate=0.3).drop.p == 0.3
    with pytest.raises(ValueError):
        resnet18(output_stride=4)
    with pytest.raises(ValueError):
        resnet18(head="max")
    with pytest.raises(ValueError):
        resnet18(groups=32)
