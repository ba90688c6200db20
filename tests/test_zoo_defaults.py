"""Every classification model learns the default data (digits, 8x8) at its defaults, or says why.

Measured before these rules (``cvlab train model=NAME``, 6 epochs, test accuracy): mobilenetv3_small 0.100,
mobilenetv3_large 0.100 (BatchNorm momentum 0.01: trains to 0.99 in train mode, eval-mode statistics lag),
vit_tiny 0.137 (1x1 patches: nothing learned). After: 0.956, 0.956; the ViTs at 4x4 patches and the CNNs' AdamW
rate 3e-3 reach vit_tiny 0.896, vit_small 0.393, vit_base 0.837, so their configs start AdamW at their recipes' 1e-3
(``model.adam_lr``), and a rate above it warns, naming ``optimizer.lr=0.001``. The fast tests pin the rules; the slow
ones train.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.models import create_model
from cvlab.models.backbones.vit import VisionTransformer
from cvlab.tasks.base import build_model, to_plain
from cvlab.utils.errors import UserError

MOBILENETS = ["mobilenetv1", "mobilenetv2", "mobilenetv3_small", "mobilenetv3_large"]
DEFAULT_LAYERS = dict(norm={"name": "default"}, activation={"name": "default"}, attention={"name": "none"},
                      init={"name": "default"})


def bn_momenta(model: nn.Module) -> set[float]:
    return {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


def digits_config(*overrides: str):
    from cvlab.utils.config import compose

    return compose("train", list(overrides))


def digits_model(*overrides: str) -> nn.Module:
    """The model ``cvlab train`` builds for digits from the composed config (model yaml included)."""
    cfg = digits_config(*overrides)
    return build_model(to_plain(cfg.model), **DEFAULT_LAYERS, num_classes=10, in_chans=1,
                       image_size=int(cfg.data.image_size))


# ---------------------------------------------------------------------------------------------- MobileNet BN momentum
@pytest.mark.parametrize("name, small, large", [("mobilenetv1", 0.1, 0.1), ("mobilenetv2", 0.1, 0.1),
                                                ("mobilenetv3_small", 0.1, 0.01), ("mobilenetv3_large", 0.1, 0.01)])
def test_bn_momentum_small_input_rule(name, small, large):
    with torch.device("meta"):
        assert bn_momenta(create_model(name, image_size=8)) == {small}
        assert bn_momenta(create_model(name, image_size=64)) == {small}  # the small-stem threshold
        assert bn_momenta(create_model(name, image_size=65)) == {large}
        assert bn_momenta(create_model(name, image_size=224)) == {large}  # the paper's


@pytest.mark.parametrize("name", MOBILENETS)
def test_bn_momentum_option_overrides_the_rule(name):
    with torch.device("meta"):
        assert bn_momenta(create_model(name, image_size=8, bn_momentum=0.03)) == {0.03}
        assert bn_momenta(create_model(name, image_size=224, bn_momentum=0.2)) == {0.2}


def test_v3_keeps_its_eps_under_the_rule():
    with torch.device("meta"):
        model = create_model("mobilenetv3_small", image_size=8)
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_bn_momentum_is_refused_where_it_cannot_apply():
    with pytest.raises(UserError, match="norm=bn norm.momentum"):
        create_model("mobilenetv3_small", image_size=8, bn_momentum=0.1, norm_layer=nn.BatchNorm2d)
    with pytest.raises(UserError, match=r"must lie in \(0, 1\]"):
        create_model("mobilenetv3_small", image_size=8, bn_momentum=0.0)


def test_bn_momentum_reaches_the_model_from_the_config():
    assert bn_momenta(digits_model("model=mobilenetv3_small")) == {0.1}
    assert bn_momenta(digits_model("model=mobilenetv3_large", "model.bn_momentum=0.01")) == {0.01}
    assert bn_momenta(digits_model("model=mobilenetv2", "model.bn_momentum=0.05")) == {0.05}


# ---------------------------------------------------------------------------------------------- ViT
@pytest.mark.parametrize("image_size, patch", [(8, 4), (16, 4), (28, 4), (32, 4), (64, 8), (224, 16)])
def test_vit_patch_rule_keeps_patches_of_4_px_or_more(image_size, patch):
    with torch.device("meta"):
        model = create_model("vit_tiny", image_size=image_size)
    assert model.patch_embed.proj.kernel_size == (patch, patch)


def test_vit_on_digits_embeds_4x4_patches():
    model = digits_model("model=vit_tiny")
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.num_patches == 4


def mini_vit() -> VisionTransformer:
    return VisionTransformer(num_classes=10, in_chans=1, image_size=8, embed_dim=32, depth=1, num_heads=2)


def test_vit_warns_above_the_adam_rates_of_its_recipes():
    model = mini_vit()
    (line,) = model.training_warnings(torch.optim.AdamW(model.parameters(), lr=3e-3))
    assert "lr 0.003" in line and line.endswith("set optimizer.lr=0.001")
    assert len(model.training_warnings(torch.optim.Adam(model.parameters(), lr=2e-3))) == 1
    assert model.training_warnings(torch.optim.AdamW(model.parameters(), lr=1e-3)) == []
    assert model.training_warnings(torch.optim.SGD(model.parameters(), lr=0.1)) == []


def test_vit_warning_reads_the_rate_before_warm_up():
    from cvlab.utils.schedules import WarmupCosineLR

    model = mini_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    WarmupCosineLR(optimizer, total_steps=100, warmup_fraction=0.5)  # the first step's lr is 3e-3 / 51
    assert optimizer.param_groups[0]["lr"] < 1e-3
    assert len(model.training_warnings(optimizer)) == 1


# ---------------------------------------------------------------------------------------------- real trainings
def train_digits(model: str, tmp_path, *overrides: str) -> dict:
    from cvlab.engine import run_train
    from cvlab.utils.config import compose

    cfg = compose("train", [f"model={model}", "logger=none", "~callbacks.progress_bar",
                            "trainer.enable_progress_bar=false", *overrides, f"paths.output_dir={tmp_path / 'run'}"])
    metrics, _ = run_train(cfg)
    return metrics


@pytest.mark.slow
def test_mobilenetv3_small_learns_digits_at_its_defaults(tmp_path):
    assert train_digits("mobilenetv3_small", tmp_path)["test/acc"] >= 0.90  # measured 0.956 (0.100 before)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit_tiny", "vit_small"])
def test_vits_learn_digits_at_their_defaults(model, tmp_path):
    assert train_digits(model, tmp_path)["test/acc"] >= 0.90  # measured 0.915 / 0.956 (0.137 / 0.393 before)


def test_vit_configs_start_adamw_at_their_recipes_rate():
    assert digits_config("model=vit_tiny").optimizer.lr == 1e-3
    assert digits_config("model=resnet18").optimizer.lr == 3e-3  # the CNNs keep cvlab's rate
    assert digits_config("model=vit_base", "model.adam_lr=5e-4").optimizer.lr == 5e-4
    assert digits_config("model=vit_small", "optimizer.lr=0.002").optimizer.lr == 0.002  # the user's rate wins
    assert digits_config("model=vit_tiny", "optimizer=sgd").optimizer.lr == 0.1  # other optimizers keep theirs


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_cli_run_prints_the_vit_warning_once(cli):
    from conftest import FAST

    # At the default rate (model.adam_lr, the recipe's) nothing is printed: test_vit_warns_above_the_adam_rates...
    result = cli("train", "model=vit_tiny", "optimizer.lr=0.003", *FAST)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning: ViT trains")]
    assert len(lines) == 1 and lines[0].endswith("set optimizer.lr=0.001")
