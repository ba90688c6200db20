"""UNet, BiSeNet V1, DANet: exact sizes (the paper's UNet, MMSegmentation's BiSeNet and DANet layouts), the
segmentation contract, and every option (padding, width, backbone, stem, output stride, auxiliary heads, norm / act /
attn factories, init)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from cvlab.layers.attention import ChannelAttention, PositionAttention, SqueezeExcite
from cvlab.layers.conv import ConvNormAct
from cvlab.layers.norm import no_norm
from cvlab.models import create_model
from cvlab.models.backbones.features import FeatureExtractor
from cvlab.models.heads.segmentation import FCNHead, SegmentationClassifier
from cvlab.models.segmentors.danet import DAHead
from cvlab.models.segmentors.unet import UNetEncoder, _valid_sizes, mirror_pad
from cvlab.utils.errors import UserError

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return create_model(name, **kwargs)


# ------------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name, kwargs, params", [
    # The paper's UNet: 1 input channel, 2 classes, no norm, biased convs.
    ("unet", dict(num_classes=2, in_chans=1), 31_030_658),
    ("unet", dict(num_classes=2, in_chans=1, padding="same"), 31_030_658),  # padding changes no weight
    ("unet", dict(num_classes=6, in_chans=3, width=0.25), 1_941_190),  # conf/model/unet.yaml on shapes_seg
    # MMSegmentation bisenetv1_r18-d32 at 19 classes, with and without its two auxiliary heads.
    ("bisenet", dict(num_classes=19), 13_425_721),
    ("bisenet", dict(num_classes=19, aux_heads=False), 13_275_539),
    # MMSegmentation danet_r101-d8 / danet_r50-d8 (ResNetV1c: deep stem) at 19 classes, with the auxiliary head.
    ("danet", dict(num_classes=19, backbone="resnet101"), 68_838_702),
    ("danet", dict(num_classes=19, backbone="resnet50"), 49_846_574),
    ("danet", dict(num_classes=19, backbone="resnet101", stem="standard"), 68_838_702 - 19_232),
    ("danet", dict(num_classes=19, backbone="resnet101", aux_head=False), 68_838_702 - 2_364_691),
])
def test_parameter_counts(name, kwargs, params):
    assert n_params(meta(name, **kwargs)) == params


def test_part_counts_match_mmsegmentation_layout():
    with torch.device("meta"):
        bisenet = create_model("bisenet", num_classes=19)
        assert n_params(bisenet.context_path.backbone) == 11_689_512 - 513_000  # resnet18 minus its fc
        assert n_params(bisenet.spatial_path) == 91_968
        assert n_params(bisenet.ffm) == 132_096
        assert n_params(bisenet.decode_head) == n_params(FCNHead(256, 256, 19)) == 595_219
        assert [n_params(head) for head in bisenet.aux_heads] == [75_091, 75_091]
        assert n_params(DAHead(2048, 512, 19, None, nn.ReLU)) == 23_954_619
        assert n_params(FCNHead(1024, 256, 19)) == 2_364_691


# ------------------------------------------------------------------------------------------------- the contract
TINY = {"unet": dict(width=0.125), "bisenet": {}, "danet": dict(backbone="resnet18")}


@pytest.mark.parametrize("name", TINY)
def test_eval_logits_at_input_size_for_odd_sizes(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=3, image_size=64, **TINY[name]).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 45, 70))
    assert logits.shape == (1, 4, 45, 70)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name, aux_weights", [("unet", ()), ("bisenet", (1.0, 1.0)), ("danet", (1.0, 1.0, 0.4))])
def test_train_outputs_and_aux_weights(name, aux_weights):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=3, image_size=64, **TINY[name]).train()
    outputs = model(torch.rand(2, 3, 64, 64))
    assert set(outputs) == {"out", "aux"}
    assert model.aux_weights == aux_weights
    assert len(outputs["aux"]) == len(aux_weights)
    assert all(t.shape == (2, 4, 64, 64) for t in [outputs["out"], *outputs["aux"]])
    # Each auxiliary output comes from its own classifier.
    assert all(not torch.allclose(aux, outputs["out"]) for aux in outputs["aux"])


@pytest.mark.parametrize("name, train_calls", [("bisenet", 3), ("danet", 4)])
def test_eval_runs_only_the_main_classifier(name, train_calls):
    """Eval: the fused prediction only; training adds the auxiliary heads (BiSeNet 2; DANet PAM, CAM, FCN)."""
    model = create_model(name, num_classes=3, image_size=64, **TINY[name]).eval()
    calls = []
    for module in model.modules():
        if isinstance(module, SegmentationClassifier):
            module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert len(calls) == 1
    calls.clear()
    model.train()
    model(torch.rand(2, 3, 64, 64))
    assert len(calls) == train_calls


# ------------------------------------------------------------------------------------------------- unet options
def test_unet_padding_sets_every_conv():
    for padding, pad in (("valid", (0, 0)), ("same", (1, 1))):
        model = meta("unet", padding=padding)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 18 and all(conv.padding == pad for conv in convs)


def test_valid_sizes_are_the_papers_tile():
    assert _valid_sizes(388, 5) == (572, 388)  # the paper's Fig. 1
    assert _valid_sizes(64, 5) == (252, 68)  # 68 = the smallest valid output covering 64


def test_mirror_pad_equals_numpy_reflect_for_wide_pads():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded = mirror_pad(x, 20, 3, 11, 17)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (11, 17), (20, 3)), mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), expected)


def test_unet_valid_runs_on_the_mirror_padded_image_and_crops_back():
    model = create_model("unet", num_classes=3, in_chans=3, width=0.125, padding="valid").eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(image)
    assert logits.shape == (1, 3, 64, 64)
    tile = seen[0]
    assert tile.shape[-2:] == (252, 252)  # 92-px margin on top / left, 92 + 4 below / right
    torch.testing.assert_close(tile[..., 92:156, 92:156], image, rtol=0, atol=0)
    torch.testing.assert_close(tile[..., 91, 92:156], image[..., 1, :], rtol=0, atol=0)  # mirrored, not zeros


def test_unet_width_scales_every_level():
    model = meta("unet", width=0.25)
    assert model.encoder.channels == [16, 32, 64, 128, 256]
    assert [up.up.out_channels for up in model.decoder] == [128, 64, 32, 16]


def test_unet_default_has_no_norm_and_biased_convs_norm_layer_replaces_it():
    plain = meta("unet", width=0.25)
    convs = [m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(conv.bias is not None for conv in convs)
    assert count(plain, nn.BatchNorm2d) == 0
    normed = meta("unet", width=0.25, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU)
    assert count(normed, nn.BatchNorm2d) == 18 and count(normed, nn.GELU) == 18 and count(normed, nn.ReLU) == 0
    assert all(m.bias is None for m in normed.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


def test_unet_attn_layer_after_every_block():
    model = meta("unet", width=0.25, attn_layer=SqueezeExcite)
    assert count(model, SqueezeExcite) == 9  # 5 encoder levels + 4 up-steps


def test_unet_paper_init():
    torch.manual_seed(0)
    model = create_model("unet", num_classes=2, in_chans=1)
    conv = model.encoder.levels[3][1][0]  # 3×3, 512 → 512: N = 9 · 512
    assert abs(conv.weight.std().item() - math.sqrt(2 / (9 * 512))) < 0.02 * math.sqrt(2 / (9 * 512))
    up = model.decoder[0].up  # 2×2 stride 2, 1024 → 512: each output sees one tap of each of the 1024 inputs
    assert abs(up.weight.std().item() - math.sqrt(2 / 1024)) < 0.02 * math.sqrt(2 / 1024)
    assert all(bool((m.bias == 0).all()) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_unet_on_a_zoo_backbone():
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, in_chans=3, image_size=96, padding="same", backbone="resnet18")
    assert isinstance(model.encoder, FeatureExtractor)
    # resnet18 at 96 px (standard stem): act1 /2, layer1 /4 ... layer4 /32, one skip each; decoder = skip widths.
    assert model.encoder.feature_info.reductions() == [2, 4, 8, 16, 32]
    assert [up.up.out_channels for up in model.decoder] == [256, 128, 64, 64]
    assert n_params(model) == n_params(model.encoder) + n_params(model.decoder) + n_params(model.classifier)
    assert n_params(model.encoder) == 11_689_512 - 513_000
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 96)).shape == (1, 3, 96, 96)


@pytest.mark.parametrize("backbone, reductions", [("mobilenetv3_small", [1, 2, 4, 8]), ("vit_tiny", [8])])
def test_unet_decoder_follows_any_backbone(backbone, reductions):
    # mobilenetv3_small at 64 px: the small-input rule puts two stages at /1 (one skip, the later); ViT: every stage
    # at /8 (one skip: no up-step, the classifier's logits are upsampled).
    model = create_model("unet", num_classes=3, in_chans=3, image_size=64, padding="same", backbone=backbone)
    assert [model.encoder.feature_info.reductions()[i] for i in model.skip_indices] == reductions
    assert len(model.decoder) == len(reductions) - 1
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_unet_refuses_bad_options():
    with pytest.raises(UserError, match="padding=same"):
        meta("unet", backbone="resnet18", padding="valid")
    with pytest.raises(UserError, match="'same' or 'valid'"):
        meta("unet", padding="full")
    with pytest.raises(UserError, match="resnet18"):
        meta("unet", backbone="resnet19", padding="same")
    with pytest.raises(UserError, match="classification model"):
        meta("unet", backbone="yolov3", padding="same")


# ------------------------------------------------------------------------------------------------- bisenet options
def test_bisenet_layout():
    model = meta("bisenet", num_classes=19)
    spatial = [m for m in model.spatial_path.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in spatial] == [(7, 2, 64), (3, 2, 64), (3, 2, 64),
                                                                               (1, 1, 128)]
    assert model.context_path.backbone.feature_info.reductions() == [16, 32]
    assert model.context_path.backbone.conv1.kernel_size == (7, 7)  # stem=standard: MMSegmentation's ResNet-18


def test_bisenet_forward_sizes():
    model = create_model("bisenet", num_classes=3, image_size=96).eval()
    seen = {}
    model.ffm.register_forward_hook(lambda m, i, o: seen.update(spatial=i[0].shape, context=i[1].shape))
    with torch.no_grad():
        model(torch.rand(1, 3, 96, 96))
    assert seen == {"spatial": (1, 128, 12, 12), "context": (1, 128, 12, 12)}


def test_bisenet_aux_options():
    plain = create_model("bisenet", num_classes=3, image_size=64, aux_heads=False).train()
    assert plain.aux_weights == () and len(plain.aux_heads) == 0
    assert plain(torch.rand(2, 3, 64, 64))["aux"] == []
    weighted = meta("bisenet", num_classes=3, aux_weights=[0.5, 2.0])
    assert weighted.aux_weights == (0.5, 2.0)
    with pytest.raises(UserError, match="2 loss weights"):
        meta("bisenet", aux_weights=[1.0])


def test_bisenet_backbone_and_stem_options():
    mobile = meta("bisenet", num_classes=19, backbone="mobilenetv2")
    chs16, chs32 = mobile.context_path.backbone.feature_info.channels()
    assert mobile.context_path.arm16.conv[0].in_channels == chs16 == 96
    assert mobile.context_path.arm32.conv[0].in_channels == chs32 == 1280
    assert meta("bisenet", stem="small").context_path.backbone.conv1.kernel_size == (3, 3)
    # stem=None leaves the backbone its own: a ViT has no stem option.
    vit = create_model("bisenet", num_classes=3, image_size=64, backbone="vit_tiny", stem=None).eval()
    with torch.no_grad():
        assert vit(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(UserError, match="model.stem=standard"):
        meta("bisenet", backbone="vit_tiny")


def test_bisenet_factories_reach_every_layer():
    model = meta("bisenet", norm_layer=lambda c: nn.GroupNorm(1, c), act_layer=nn.GELU)
    assert count(model, nn.BatchNorm2d) == 0 and count(model, nn.ReLU) == 0
    # Backbone: stem 1 + 8 blocks x 2 (+ 3 shortcut norms); spatial path 4, ARMs 2 x 2, refinement 2, global
    # branch 1, FFM 2, heads 3.
    assert count(model, nn.GELU) == 17 + 4 + 2 + 2 + 1 + 2 + 3
    assert count(model, nn.GroupNorm) == 20 + 4 + 4 + 2 + 1 + 2 + 3
    assert count(meta("bisenet", attn_layer=SqueezeExcite), SqueezeExcite) == 8  # in each backbone block


def test_bisenet_and_danet_init():
    torch.manual_seed(0)
    for model in (create_model("bisenet", num_classes=19, image_size=64),
                  create_model("danet", num_classes=19, image_size=64, backbone="resnet18")):
        classifiers = [m.conv for m in model.modules() if isinstance(m, SegmentationClassifier)]
        assert all(abs(c.weight.std().item() - 0.01) < 0.002 and bool((c.bias == 0).all()) for c in classifiers)


# ------------------------------------------------------------------------------------------------- danet options
def test_danet_attention_starts_as_identity():
    model = create_model("danet", num_classes=3, image_size=64, backbone="resnet18").eval()
    head = model.decode_head
    assert isinstance(head.pam, PositionAttention) and isinstance(head.cam, ChannelAttention)
    assert head.pam.gamma.item() == 0 and head.cam.gamma.item() == 0
    assert head.pam.query.out_channels == 128 // 8 and head.pam_in[0].out_channels == 512 // 4
    x = torch.rand(1, 128, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(head.pam(x), x)
        torch.testing.assert_close(head.cam(x), x)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_danet_output_stride(output_stride):
    model = create_model("danet", num_classes=3, image_size=64, backbone="resnet18", output_stride=output_stride)
    with torch.no_grad():
        stage3, stage4 = model.backbone(torch.rand(1, 3, 64, 64))
    assert stage3.shape[-1] == stage4.shape[-1] == 64 // output_stride  # stage 3 is dilated at 8, strided at 16


def test_danet_stem_aux_and_backbone_options():
    assert isinstance(meta("danet").backbone.conv1, nn.Sequential)  # deep stem (ResNetV1c)
    assert meta("danet", stem="standard").backbone.conv1.kernel_size == (7, 7)
    assert meta("danet", aux_head=False).aux_weights == (1.0, 1.0)
    assert meta("danet", aux_weight=0.2).aux_weights == (1.0, 1.0, 0.2)
    plain = create_model("danet", num_classes=3, image_size=64, backbone="resnet18", aux_head=False).train()
    assert len(plain(torch.rand(2, 3, 64, 64))["aux"]) == 2
    assert meta("danet", backbone="resnet18").decode_head.pam_in[0].in_channels == 512
    with pytest.raises(UserError, match="model.stem=deep"):
        meta("danet", backbone="mobilenetv2")


# ------------------------------------------------------------------------------------------------- shared layers
def test_conv_norm_act_auto_bias_and_padding():
    assert ConvNormAct(4, 8, norm_layer=no_norm, bias=None)[0].bias is not None
    assert ConvNormAct(4, 8, bias=None)[0].bias is None  # BatchNorm follows
    assert ConvNormAct(4, 8)[0].bias is None and ConvNormAct(4, 8)[0].padding == (1, 1)
    assert ConvNormAct(4, 8, padding=0)(torch.rand(2, 4, 9, 9)).shape == (2, 8, 7, 7)


def test_paper_encoder_levels():
    encoder = UNetEncoder(1, [8, 16, 32, 64, 128], "same", no_norm, nn.ReLU, None)
    maps = encoder(torch.rand(1, 1, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
