"""The one feature call, ``create_model(name, features_only=True, out_indices=...)``, on every classification
backbone (and TinyDarknet): outputs agree with ``feature_info``, selection by index, trunk-only parameters, and
outputs equal to the stage outputs of the full classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.models import create_model, list_models
from cvlab.models.backbones.darknet import TinyDarknet, tiny_darknet_features
from cvlab.models.backbones.features import FeatureExtractor
from cvlab.utils.errors import UserError

torch.set_num_threads(1)

CLASSIFIERS = list_models(task="classification")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def family(name: str) -> str:
    name = name.removeprefix("csp")  # CSPDarknet53 keeps Darknet-53's stages
    return next(prefix for prefix in ("resnet", "resnext", "mobilenet", "vit", "darknet") if name.startswith(prefix))


# Reductions of every stage at the standard stem (224 px) and the small-image one (64 px). ViT has 14 stages
# (patch_embed, 12 blocks, norm) at the patch size: 16, or 64 // 8 = 8 for small images.
REDUCTIONS = {
    ("resnet", 224): [2, 4, 8, 16, 32], ("resnet", 64): [1, 1, 2, 4, 8],
    ("resnext", 224): [2, 4, 8, 16, 32], ("resnext", 64): [1, 1, 2, 4, 8],
    ("mobilenet", 224): [2, 4, 8, 16, 32], ("mobilenet", 64): [1, 1, 2, 4, 8],
    ("darknet", 224): [1, 2, 4, 8, 16, 32], ("darknet", 64): [1, 1, 1, 2, 4, 8],
    ("vit", 224): [16] * 14, ("vit", 64): [8] * 14,
}


def trunk_params(model: nn.Module, last_module: str) -> int:
    """Parameters of every module the classifier registers up to and including ``last_module`` (and its children):
    what a trunk ending there needs, read from the classifier, not from the feature module."""
    names = [name for name, _ in model.named_modules()]
    end = max(i for i, name in enumerate(names) if name == last_module or name.startswith(last_module + "."))
    return sum(p.numel() for _, module in list(model.named_modules())[: end + 1] for p in module.parameters(False))


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_outputs_agree_with_feature_info_and_hold_only_the_trunk(name, size):
    with torch.device("meta"):  # shapes and counts only
        model = create_model(name, image_size=size)
        features = create_model(name, features_only=True, image_size=size)
        outputs = features(torch.empty(2, 3, size, size))
    assert features.feature_info == model.feature_info
    assert features.feature_info.reductions() == REDUCTIONS[family(name), size]
    assert len(outputs) == len(features.feature_info)
    for output, info in zip(outputs, features.feature_info):
        assert output.shape == (2, info["num_chs"], size // info["reduction"], size // info["reduction"])
    assert features.feature_info.channels() == [output.shape[1] for output in outputs]
    assert n_params(features) == trunk_params(model, model.feature_info[-1]["module"]) < n_params(model)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_out_indices_select_stages_and_cut_the_trunk(name):
    with torch.device("meta"):
        model = create_model(name, image_size=224)
        last3 = create_model(name, features_only=True, out_indices=(-3, -2, -1), image_size=224)
        outputs = last3(torch.empty(1, 3, 224, 224))
        count = len(model.feature_info)
        for index in range(count):
            one = FeatureExtractor(model, out_indices=(index,))
            assert one.feature_info == [model.feature_info[index]]
            assert n_params(one) == trunk_params(model, model.feature_info[index]["module"])
        first_and_third = FeatureExtractor(model, out_indices=(0, 2 - count))
    assert last3.feature_info == model.feature_info[-3:]
    assert [o.shape[1:] for o in outputs] == [(i["num_chs"], 224 // i["reduction"], 224 // i["reduction"])
                                              for i in model.feature_info[-3:]]
    if family(name) != "vit":
        assert last3.feature_info.reductions() == [8, 16, 32]  # C3, C4, C5 of a detector
    assert first_and_third.feature_info == [model.feature_info[0], model.feature_info[2]]
    # A trunk cut at the first stage holds fewer weights than one to the last.
    assert n_params(FeatureExtractor(model, out_indices=(0,))) < n_params(last3)


def test_known_trunk_sizes():
    with torch.device("meta"):
        # Classifier minus its 1000-way linear layer: 25,557,032 - 2048·1000 - 1000 (timm's features_only count).
        assert n_params(create_model("resnet50", features_only=True)) == 23_508_032
        assert n_params(create_model("darknet53", features_only=True)) == 41_609_928 - 1024 * 1000 - 1000
        # Up to layer2 only: conv1 + bn1 (9,536) + layer1 (215,808) + layer2 (1,219,584).
        assert n_params(create_model("resnet50", features_only=True, out_indices=(2,))) == 1_444_928


def _cases():
    """(id, build the full backbone, build its feature module): small CPU sizes, one or two per family."""
    registered = {
        "resnet18": dict(image_size=32),
        "resnext50_32x4d": dict(image_size=16),
        "mobilenetv1": dict(image_size=32, width_mult=0.5),
        "mobilenetv2": dict(image_size=32, width_mult=0.5),
        "mobilenetv3_small": dict(image_size=32),
        "mobilenetv3_large": dict(image_size=32, width_mult=0.5),
        "vit_tiny": dict(image_size=8),
        "darknet19": dict(image_size=32, width=0.25),
        "darknet53": dict(image_size=96, width=0.125),  # standard stem: stride 32
    }
    for name, kwargs in registered.items():
        yield pytest.param(kwargs["image_size"], lambda n=name, k=kwargs: create_model(n, **k),
                           lambda n=name, k=kwargs: create_model(n, features_only=True, **k), id=name)
    yield pytest.param(64, lambda: TinyDarknet(width=0.25), lambda: tiny_darknet_features(width=0.25),
                       id="tiny_darknet")


def _as_map(output: torch.Tensor, size: int, reduction: int) -> torch.Tensor:
    """A stage output seen by a hook, as the feature call should return it: CNN maps as they are, ViT tokens without
    the class token, token k at row k // grid, column k % grid."""
    if output.ndim == 4:
        return output
    grid = size // reduction
    return output[:, 1:].reshape(output.shape[0], grid, grid, output.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size, build_backbone, build_features", _cases())
def test_features_equal_the_classifiers_stage_outputs(size, build_backbone, build_features):
    torch.manual_seed(0)
    model, features = build_backbone().eval(), build_features().eval()
    # The trunk keeps the classifier's names: its weights load from the classifier, none missing.
    missing, _ = features.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    seen = {}
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(
            lambda module, args, output, key=info["module"]: seen.__setitem__(key, output.clone()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        last = model.forward_features(x)
        outputs = features(x)
    assert len(outputs) == len(model.feature_info)
    for output, info in zip(outputs, model.feature_info):
        assert torch.equal(output, _as_map(seen[info["module"]], size, info["reduction"])), info
    assert torch.equal(outputs[-1], _as_map(last, size, model.feature_info[-1]["reduction"]))


@pytest.mark.parametrize("size, build_backbone, build_features", _cases())
def test_every_trunk_parameter_gets_a_gradient(size, build_backbone, build_features):
    features = build_features().train()
    outputs = features(torch.randn(2, 3, size, size))
    sum(output.square().mean() for output in outputs).backward()
    assert [name for name, p in features.named_parameters() if p.grad is None] == []


def test_wrong_requests_are_one_line_errors():
    with pytest.raises(UserError, match="go past this backbone's 5 stages"):
        create_model("resnet18", features_only=True, out_indices=(5,))
    with pytest.raises(UserError, match="go past"):
        create_model("resnet18", features_only=True, out_indices=(-6,))
    with pytest.raises(UserError, match="increasing order"):
        create_model("resnet18", features_only=True, out_indices=(-1, 0))
    with pytest.raises(UserError, match="increasing order"):
        create_model("resnet18", features_only=True, out_indices=(2, 2))
    with pytest.raises(UserError, match="needs features_only=True"):
        create_model("resnet18", out_indices=(1, 2))
    detector = list_models(task="detection")[0]
    with torch.device("meta"), pytest.raises(UserError, match="has no feature stages.*resnet18"):
        create_model(detector, features_only=True)
