"""ProGAN, StyleGAN and StyleGAN2 (cvlab.models.generators, cvlab.losses.gan): the papers' parameter counts at
1024 px from construction alone, the generation contract (shapes, range, loss terms, gradients), and each defining
piece switched on and off: fade-in, equalised lr, pixel norm, minibatch std, WGAN-GP and drift, R1 and its lazy
form, path length, demodulation, truncation, style mixing, noise, conditioning. Tiny networks at 16 px."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cvlab.losses.gan import drift_penalty, gradient_penalty, path_length_penalty, r1_penalty
from cvlab.models import create_model, list_models, model_task
from cvlab.models.generators.layers import (
    DiscriminatorEpilogue,
    EqualizedConv2d,
    EqualizedLinear,
    FIRFilter,
    MinibatchStd,
    ModulatedConv2d,
    NoiseInjection,
    PixelNorm,
    Progressive,
)
from cvlab.utils.config import read_option
from cvlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GANS = ["progan", "stylegan", "stylegan2"]
PROGRESSIVE = ["progan", "stylegan"]
STYLE = ["stylegan", "stylegan2"]
SIZE = 16


def tiny(name: str, **kwargs):
    torch.manual_seed(0)
    options = dict(image_size=SIZE, in_chans=1, num_classes=3, latent_dim=16, fmap_base=32, fmap_max=16)
    if name != "progan":
        options["w_dim"] = 16
    return create_model(name, **{**options, **kwargs})


def reals(n: int = 4, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- registry and counts
def test_generation_models_are_registered_for_the_generation_task():
    assert list_models("generation") == GANS
    assert {model_task(name) for name in GANS} == {"generation"}


@pytest.mark.parametrize("name, generator, discriminator", [
    ("progan", 23_079_115, 23_087_249),
    ("stylegan", 26_219_627, 23_087_249),  # StyleGAN's discriminator is ProGAN's (with a parameter-free blur)
    ("stylegan2", 30_370_060, 29_012_513),
])
def test_published_parameter_counts_at_1024_px(name, generator, discriminator):
    with torch.device("meta"):
        model = create_model(name, image_size=1024, in_chans=3)
    assert (count(model.generator), count(model.discriminator)) == (generator, discriminator)


@pytest.mark.parametrize("name, generator, discriminator", [
    ("progan", 843_812, 845_537), ("stylegan", 898_148, 845_537), ("stylegan2", 847_787, 871_521)])
def test_config_defaults_match_the_docstring_table(name, generator, discriminator):
    config = {k: v for k, v in read_option("model", name).items() if k not in ("name", "task")}
    with torch.device("meta"):
        model = create_model(name, image_size=32, in_chans=1, num_classes=10, **config)
    assert (count(model.generator), count(model.discriminator)) == (generator, discriminator)
    assert model.current_resolution == 32 and model.latent_dim == 128


# ---------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", GANS)
@pytest.mark.parametrize("conditional", [False, True])
def test_generate_gives_images_in_range_at_full_size(name, conditional):
    model = tiny(name, conditional=conditional)
    z = model.sample_latents(5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (5, 16)
    images = model.generate(z)
    assert images.shape == (5, 1, SIZE, SIZE)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    if model.progressive:  # while growing, the current phase's images come upsampled to the full size
        model.set_progress(0, 1.0)
        assert model.current_resolution == 4
        small = model.generate(z)
        assert small.shape == (5, 1, SIZE, SIZE)
        assert torch.equal(small[..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), small)


@pytest.mark.parametrize("name", STYLE)
def test_feature_map_modules_are_the_synthesis_convolutions_by_resolution(name):
    model = tiny(name)
    modules = model.generator.synthesis.feature_map_modules()
    assert list(modules) == ["4px.conv1", "8px.conv0", "8px.conv1", "16px.conv0", "16px.conv1"]
    sizes = {}
    hooks = [module.register_forward_hook(lambda m, i, out, key=key: sizes.__setitem__(key, out.shape[-1]))
             for key, module in modules.items()]
    model.generate(model.sample_latents(2))
    assert sizes == {"4px.conv1": 4, "8px.conv0": 8, "8px.conv1": 8, "16px.conv0": 16, "16px.conv1": 16}
    for hook in hooks:
        hook.remove()
    if model.progressive:  # while at 4x4, only the convolutions grown so far
        model.set_progress(0, 1.0)
        assert list(model.generator.synthesis.feature_map_modules()) == ["4px.conv1"]


EXPECTED_TERMS = {"progan": ({"loss_d", "loss_gp", "loss_drift"}, {"loss_g"}),
                  "stylegan": ({"loss_d", "loss_r1"}, {"loss_g"}),
                  "stylegan2": ({"loss_d", "loss_r1"}, {"loss_g", "loss_pl"})}


@pytest.mark.parametrize("name", GANS)
@pytest.mark.parametrize("conditional", [False, True])
def test_losses_and_every_parameter_gets_a_gradient_from_one_d_and_g_step(name, conditional):
    model = tiny(name, conditional=conditional)
    labels = torch.tensor([0, 1, 2, 0]) if conditional else None
    d_grads, g_grads = set(), set()
    # A progressive model's toRGB / fromRGB layers train in their phases: one D + G step at each phase, fading in.
    for phase in range(model.num_phases):
        model.set_progress(phase, 0.5)
        model.zero_grad()
        terms = model.discriminator_loss(reals(), labels, step=0)
        assert set(terms) == EXPECTED_TERMS[name][0]
        assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
        sum(terms.values()).backward()
        assert all(p.grad is None for p in model.generator.parameters())  # fakes made without a graph
        d_grads |= {n for n, p in model.discriminator.named_parameters() if p.grad is not None}
        model.zero_grad()
        terms = model.generator_loss(4, labels, step=0)
        assert set(terms) == EXPECTED_TERMS[name][1]
        assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
        sum(terms.values()).backward()
        assert all(p.grad is None for p in model.discriminator.parameters())  # D frozen for G's loss
        assert all(p.requires_grad for p in model.discriminator.parameters())  # and trainable again
        g_grads |= {n for n, p in model.generator.named_parameters() if p.grad is not None}
    assert d_grads == {n for n, _ in model.discriminator.named_parameters()}
    assert g_grads == {n for n, _ in model.generator.named_parameters()}


@pytest.mark.parametrize("name", GANS)
def test_optimizer_settings_are_the_papers(name):
    model = tiny(name)
    settings = model.optimizer_settings()
    lr = 0.002 if name == "stylegan2" else 0.001
    generator, discriminator = settings["generator"], settings["discriminator"]
    if name != "stylegan2":
        assert generator["lr"] == discriminator["lr"] == lr
        assert generator["betas"] == discriminator["betas"] == (0.0, 0.99)
    for network, part in ((model.generator, generator), (model.discriminator, discriminator)):
        grouped = [p for group in part["param_groups"] for p in group["params"]]
        assert len(grouped) == len(list(network.parameters())) and set(map(id, grouped)) == set(
            map(id, network.parameters()))
    if name in STYLE:
        assert [g["name"] for g in generator["param_groups"]] == ["mapping", "synthesis"]


def test_optimizer_options_override_the_papers():
    settings = tiny("progan", lr=0.01, betas=(0.5, 0.9)).optimizer_settings()
    assert settings["generator"]["lr"] == settings["discriminator"]["lr"] == 0.01
    assert settings["generator"]["betas"] == settings["discriminator"]["betas"] == (0.5, 0.9)
    assert tiny("stylegan", lr=0.003).optimizer_settings()["generator"]["lr"] == 0.003


@pytest.mark.parametrize("name", GANS)
def test_state_dict_restores_progress_and_regulariser_state(name, tmp_path):
    model = tiny(name)
    if model.progressive:
        model.set_progress(1, 0.25)
    model.training_fakes(model.sample_latents(4), None)
    if name == "stylegan2":
        model.generator_loss(4, None, step=0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = tiny(name)
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert restored.current_resolution == model.current_resolution
    progress = [(m.phase, m.alpha) for m in restored.modules() if isinstance(m, Progressive)]
    assert progress == ([(1, 0.25)] * 2 if model.progressive else [])
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("name", GANS)
def test_generate_with_an_ema_copy_follows_the_models_progress_and_w_avg(name):
    import copy

    model = tiny(name)
    ema = copy.deepcopy(model.generator)
    if model.progressive:
        model.set_progress(0, 1.0)
    z = model.sample_latents(2)
    if name == "progan":
        assert torch.equal(model.generate(z, generator_module=ema), model.generate(z))
        return
    model.training_fakes(model.sample_latents(4), None)  # moves w_avg; the copy's is stale until generate
    truncated = model.generate(z, generator_module=ema, truncation=0.5, noise="const")
    assert torch.equal(ema.mapping.w_avg, model.generator.mapping.w_avg)
    assert torch.equal(truncated, model.generate(z, truncation=0.5, noise="const"))


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="power of two"):
        tiny("stylegan2", image_size=24)
    with pytest.raises(UserError, match="keeps its paper's layers"):
        tiny("progan", norm_layer=torch.nn.BatchNorm2d)
    with pytest.raises(UserError, match="g_architecture"):
        tiny("stylegan2", g_architecture="resnet")
    with pytest.raises(UserError, match="no truncation"):
        tiny("progan").generate(torch.randn(2, 16), truncation=0.7)
    with pytest.raises(UserError, match="needs class labels"):
        tiny("stylegan2", conditional=True).discriminator_loss(reals(), None, step=0)
    with pytest.raises(UserError, match="noise must be one of"):
        tiny("stylegan").generate(torch.randn(2, 16), noise="fixed")


# ---------------------------------------------------------------------------------------------- progressive growing
@pytest.mark.parametrize("name", PROGRESSIVE)
def test_fade_in_alpha_blends_the_previous_resolution(name):
    model = tiny(name, kimg_per_phase=3)
    assert model.progressive and model.num_phases == 3 and model.kimg_per_phase == 3
    z = model.sample_latents(3)
    run = {"noise": "const"} if name == "stylegan" else {}
    outputs = {}
    for phase, alpha in ((0, 1.0), (1, 0.0), (1, 0.5), (1, 1.0)):
        model.set_progress(phase, alpha)
        assert model.current_resolution == 4 * 2**phase
        outputs[phase, alpha] = model.run_generator(model.generator, z, None, 1.0, None, run.get("noise", "random"))
    # alpha 0: exactly the 4x4 image upsampled; alpha 1: the new block alone; in between: the blend.
    assert torch.allclose(outputs[1, 0.0], F.interpolate(outputs[0, 1.0], scale_factor=2), atol=1e-6)
    assert not torch.allclose(outputs[1, 1.0], outputs[1, 0.0], atol=1e-3)
    assert torch.allclose(outputs[1, 0.5], (outputs[1, 0.0] + outputs[1, 1.0]) / 2, atol=1e-5)
    # The discriminator fades in the same way: alpha 0 sees the 8x8 image as the 4x4 one, box-downsampled.
    images = reals(size=8)
    model.set_progress(1, 0.0)
    faded = model.discriminator(images)
    model.set_progress(0, 1.0)
    assert torch.allclose(faded, model.discriminator(F.avg_pool2d(images, 2)), atol=1e-5)
    model.set_progress(1, 1.0)
    assert not torch.allclose(model.discriminator(images), faded, atol=1e-4)


def test_reals_follow_the_current_resolution_and_fade():
    model = tiny("progan")
    images = reals()
    model.set_progress(0, 1.0)
    assert torch.allclose(model.prepare_reals(images), F.avg_pool2d(images, 4))
    model.set_progress(1, 0.25)
    sharp, coarse = F.avg_pool2d(images, 2), F.interpolate(F.avg_pool2d(images, 4), scale_factor=2)
    assert torch.allclose(model.prepare_reals(images), 0.75 * coarse + 0.25 * sharp, atol=1e-6)
    with pytest.raises(UserError, match="progress takes"):
        model.set_progress(3, 1.0)


def test_progressive_false_trains_at_full_size_with_one_rgb_layer():
    grown, fixed = tiny("progan"), tiny("progan", progressive=False)
    assert list(grown.generator.to_rgb) == ["4", "8", "16"] and list(fixed.generator.to_rgb) == ["16"]
    assert list(fixed.discriminator.from_rgb) == ["16"]
    assert not fixed.progressive and fixed.num_phases == 1 and fixed.current_resolution == SIZE
    assert set(fixed.discriminator_loss(reals(), None, step=0)) == EXPECTED_TERMS["progan"][0]


# ---------------------------------------------------------------------------------------------- ProGAN's pieces
def test_equalized_lr_runtime_scale_is_he_constant():
    torch.manual_seed(0)
    conv = EqualizedConv2d(32, 64, 3)
    assert conv.weight_gain == pytest.approx(math.sqrt(2 / (32 * 9)))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.02)  # stored at unit variance
    plain = EqualizedConv2d(32, 64, 3, equalized=False)
    assert plain.weight_gain == 1.0 and plain.weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.03)
    mapping = EqualizedLinear(512, 512, lr_mul=0.01)  # StyleGAN's mapping: 100x slower, same effective init
    assert mapping.weight_gain == pytest.approx(math.sqrt(2 / 512) * 0.01)
    assert (mapping.weight * mapping.weight_gain).std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    model = tiny("progan", equalized_lr=False)
    layers = [m for m in model.modules() if isinstance(m, (EqualizedConv2d, EqualizedLinear))]
    assert layers and all(m.weight_gain == 1.0 for m in layers)
    assert all(m.weight_gain != 1.0 for m in tiny("progan").modules() if isinstance(m, EqualizedConv2d))


def test_pixel_norm_normalises_each_pixel_and_is_switchable():
    x = torch.randn(2, 8, 5, 5) * 3
    assert torch.allclose(PixelNorm()(x).square().mean(dim=1), torch.ones(2, 5, 5), atol=1e-5)
    with_norm = sum(isinstance(m, PixelNorm) for m in tiny("progan").generator.modules())
    without = sum(isinstance(m, PixelNorm) for m in tiny("progan", pixel_norm=False).generator.modules())
    assert with_norm == 7 and without == 1  # after every layer (2 at 4x4, 2 per block) and on the latent


def test_minibatch_std_adds_one_channel_of_group_statistics():
    x = torch.randn(8, 3, 4, 4)
    y = MinibatchStd(4)(x)
    assert y.shape == (8, 4, 4, 4) and torch.equal(y[:, :3], x)
    # Groups of 4 take every second sample (the official reshape [G, M, ...]): samples 0, 2, 4, 6 form group 0.
    expected = (x[0::2].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    assert torch.allclose(y[0, 3], expected.expand(4, 4)) and torch.allclose(y[6, 3], expected.expand(4, 4))
    assert MinibatchStd(4)(torch.randn(6, 3, 4, 4)).shape == (6, 4, 4, 4)  # a short batch: groups of 3
    assert DiscriminatorEpilogue(16, 16, mbstd_group=4).conv[0].weight.shape[1] == 17
    off = tiny("progan", mbstd_group=0)
    assert off.discriminator.epilogue.mbstd is None and off.discriminator.epilogue.conv[0].weight.shape[1] == 16


def test_wgan_gp_and_drift_terms():
    torch.manual_seed(0)
    direction = torch.randn(1, 1, 4, 4)
    critic = lambda x: (x * direction).sum(dim=(1, 2, 3))  # noqa: E731  a linear critic: gradient = direction
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx((direction.norm().item() - 1) ** 2, rel=1e-5)
    scores = torch.tensor([1.0, -2.0, 3.0])
    assert drift_penalty(scores).item() == pytest.approx(14 / 3)
    model = tiny("progan")
    model.set_progress(2, 1.0)
    torch.manual_seed(1)
    terms = model.discriminator_loss(reals(), None, step=0)
    real_scores = model.discriminator(model.prepare_reals(reals()))
    assert terms["loss_drift"].item() == pytest.approx(0.001 * real_scores.square().mean().item(), rel=1e-4)
    assert set(tiny("progan", gp_weight=0, drift_weight=0).discriminator_loss(reals(), None, 0)) == {"loss_d"}
    norm = direction.norm().item()
    assert gradient_penalty(critic, real, fake, target=2.0).item() == pytest.approx((norm - 2) ** 2 / 4, rel=1e-5)
    assert tiny("progan", gp_target=2.0).gp_target == 2.0


# ---------------------------------------------------------------------------------------------- R1, lazy, path length
def test_r1_penalty_is_the_squared_gradient_norm():
    direction = torch.randn(1, 1, 4, 4)
    real = torch.randn(3, 1, 4, 4, requires_grad=True)
    scores = (real * direction).sum(dim=(1, 2, 3))
    assert r1_penalty(scores, real).item() == pytest.approx(direction.square().sum().item(), rel=1e-5)


def test_lazy_regularisation_appears_only_on_due_steps_and_is_scaled():
    model = tiny("stylegan2")
    r1_steps = [s for s in range(18) if "loss_r1" in model.discriminator_loss(reals(), None, step=s)]
    pl_steps = [s for s in range(9) if "loss_pl" in model.generator_loss(4, None, step=s)]
    assert r1_steps == [0, 16] and pl_steps == [0, 4, 8]
    # R1 on the same reals: scaled by the interval.
    lazy = model.discriminator_loss(reals(), None, step=32)["loss_r1"]
    model.r1_interval = 1
    assert lazy.item() == pytest.approx(16 * model.discriminator_loss(reals(), None, step=32)["loss_r1"].item(),
                                        rel=1e-4)
    # Path length with the same random draws and the same running mean: scaled by the interval.
    values = {}
    for interval in (4, 1):
        model.pl_interval = interval
        model.pl_mean.fill_(0.5)
        torch.manual_seed(3)
        values[interval] = model.generator_loss(4, None, step=0)["loss_pl"].item()
    assert values[4] == pytest.approx(4 * values[1], rel=1e-4)
    assert set(tiny("stylegan2", pl_weight=0).generator_loss(4, None, 0)) == {"loss_g"}
    assert set(tiny("stylegan2", r1_gamma=0).discriminator_loss(reals(), None, 0)) == {"loss_d"}
    assert set(tiny("stylegan", r1_gamma=0).discriminator_loss(reals(), None, 0)) == {"loss_d"}


def test_path_length_runs_on_the_shrunk_batch_with_its_decay(monkeypatch):
    import cvlab.models.generators.stylegan2 as stylegan2

    seen = []

    def spy(images, ws, pl_mean, decay):
        seen.append((images.shape[0], decay))
        return path_length_penalty(images, ws, pl_mean, decay)

    monkeypatch.setattr(stylegan2, "path_length_penalty", spy)
    tiny("stylegan2").generator_loss(8, None, step=0)
    tiny("stylegan2", pl_batch_shrink=1, pl_decay=0.1).generator_loss(8, None, step=0)
    assert seen == [(4, 0.01), (8, 0.1)]


def test_lazy_intervals_scale_adam_by_c_over_c_plus_1():
    settings = tiny("stylegan2").optimizer_settings()
    assert settings["generator"]["lr"] == pytest.approx(0.002 * 4 / 5)
    assert settings["generator"]["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))
    assert settings["discriminator"]["lr"] == pytest.approx(0.002 * 16 / 17)
    assert settings["discriminator"]["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    plain = tiny("stylegan2", pl_weight=0, r1_interval=1).optimizer_settings()
    assert plain["generator"]["lr"] == plain["discriminator"]["lr"] == 0.002
    assert tiny("stylegan", r1_interval=8).optimizer_settings()["discriminator"]["lr"] == pytest.approx(0.001 * 8 / 9)


def test_path_length_penalty_measures_the_jacobian_norm():
    ws = torch.randn(16, 1, 64 * 64, requires_grad=True)
    images = 3.0 * ws.reshape(16, 1, 64, 64)  # J = 3 I: the length is 3 · ‖y‖ ≈ 3
    torch.manual_seed(1)
    penalty, mean = path_length_penalty(images, ws, torch.tensor(2.0), decay=0.01)
    torch.manual_seed(1)
    lengths = (3.0 * torch.randn(16, 1, 64, 64) / 64).flatten(1).norm(dim=1)  # the same direction y
    assert lengths.mean().item() == pytest.approx(3.0, rel=0.01)
    target = 0.99 * 2.0 + 0.01 * lengths.mean()
    assert mean.item() == pytest.approx(target.item(), rel=1e-5)
    assert penalty.item() == pytest.approx((lengths - target).square().mean().item(), rel=1e-4)


def test_path_length_mean_is_tracked_in_a_buffer():
    model = tiny("stylegan2")
    assert "pl_mean" in model.state_dict() and model.pl_mean.item() == 0
    model.generator_loss(4, None, step=0)
    first = model.pl_mean.item()
    assert first > 0
    model.generator_loss(4, None, step=1)  # not due: unchanged
    assert model.pl_mean.item() == first


# ---------------------------------------------------------------------------------------------- StyleGAN2's pieces
def test_demodulation_gives_unit_output_variance_per_channel():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 32, 32)
    w = torch.randn(64, 16)
    for demodulate in (True, False):
        conv = ModulatedConv2d(8, 6, 3, w_dim=16, demodulate=demodulate)
        with torch.no_grad():
            conv.affine.bias.fill_(3.0)  # styles of 3: without demodulation the variance is Σ (3 w)² ≈ 9
            conv.affine.weight.zero_()
            y = conv(x, w)[:, :, 1:-1, 1:-1]  # the border sees zero padding
            modulated = (conv.weight * conv.weight_gain * 3.0).square().sum(dim=(1, 2, 3))
        expected = torch.ones(6) if demodulate else modulated
        assert torch.allclose(y.var(dim=(0, 2, 3)), expected, rtol=0.05), (demodulate, y.var(dim=(0, 2, 3)))
        assert demodulate or modulated.min() > 4
    convs = [m for m in tiny("stylegan2", demodulate=False).generator.modules() if isinstance(m, ModulatedConv2d)]
    assert convs and not any(m.demodulate for m in convs)
    demodulated = [m.demodulate for m in tiny("stylegan2").generator.modules() if isinstance(m, ModulatedConv2d)]
    assert demodulated.count(True) == 5 and demodulated.count(False) == 3  # the toRGBs never demodulate


def _upfirdn_reference(x, taps, up, down, pad):
    """upfirdn2d as its definition: zero-insertion by ``up``, zero padding ``pad``, the FIR filter, keep every
    ``down``-th pixel."""
    channels = x.shape[1]
    if up > 1:
        upsampled = x.new_zeros(x.shape[0], channels, x.shape[2] * up, x.shape[3] * up)
        upsampled[:, :, ::up, ::up] = x
        x = upsampled
    kernel = torch.outer(torch.tensor(taps), torch.tensor(taps))
    kernel = kernel / kernel.sum() * up**2
    x = F.conv2d(F.pad(x, pad), kernel.expand(channels, 1, *kernel.shape), groups=channels)
    return x[:, :, ::down, ::down]


def test_fir_resampling_matches_upfirdn2d():
    x = torch.randn(2, 3, 8, 8)
    taps = (1.0, 3.0, 3.0, 1.0)
    assert torch.allclose(FIRFilter(taps, up=2)(x), _upfirdn_reference(x, taps, 2, 1, (2, 1, 2, 1)), atol=1e-6)
    assert torch.allclose(FIRFilter(taps, down=2)(x), _upfirdn_reference(x, taps, 1, 2, (1, 1, 1, 1)), atol=1e-6)
    assert torch.allclose(FIRFilter(taps, padding=2)(x), _upfirdn_reference(x, taps, 1, 1, (2, 2, 2, 2)), atol=1e-6)
    assert FIRFilter(taps, up=2)(torch.ones(1, 1, 8, 8))[0, 0, 3:5, 3:5].allclose(torch.ones(2, 2))  # keeps DC


def test_architectures_are_switchable():
    skip, orig = tiny("stylegan2"), tiny("stylegan2", g_architecture="orig", d_architecture="orig")
    assert [b.to_rgb is not None for b in skip.generator.synthesis.blocks] == [True, True, True]
    assert [b.to_rgb is not None for b in orig.generator.synthesis.blocks] == [False, False, True]
    assert all(b.skip is not None for b in skip.discriminator.blocks)
    assert all(b.skip is None for b in orig.discriminator.blocks)
    assert orig.generate(orig.sample_latents(2)).shape == (2, 1, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------- style pieces
@pytest.mark.parametrize("name", STYLE)
def test_truncation_psi_zero_gives_the_average_image(name):
    model = tiny(name)
    model.training_fakes(model.sample_latents(8), None)  # tracks w_avg: (1 - 0.995) · the batch's mean w
    assert model.generator.mapping.w_avg.abs().sum() > 0
    z = model.sample_latents(4)
    images = model.generate(z, truncation=0.0, noise="const")
    assert torch.allclose(images, images[:1].expand_as(images), atol=1e-6)
    ws = model.generator.mapping.w_avg.expand(1, model.num_ws, -1)
    assert torch.allclose(images[:1], model.generator.synthesis(ws, "const").clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(model.generate(z, noise="const")[0], images[0], atol=1e-4)
    # A cutoff truncates only the first layers: the later ones still vary with z.
    partial = model.generate(z, truncation=0.0, truncation_cutoff=2, noise="const")
    assert not torch.allclose(partial, partial[:1].expand_as(partial), atol=1e-4)


def test_w_avg_tracks_the_mean_of_w_in_training_only():
    model = tiny("stylegan2", w_avg_beta=0.9)
    z = model.sample_latents(8)
    w = model.generator.mapping(z)
    model.training_fakes(z, None)
    assert torch.allclose(model.generator.mapping.w_avg, 0.1 * w.mean(dim=0), atol=1e-6)
    before = model.generator.mapping.w_avg.clone()
    model.generate(z)
    assert torch.equal(model.generator.mapping.w_avg, before)


@pytest.mark.parametrize("name", STYLE)
def test_style_mixing_changes_images(name):
    model = tiny(name)
    z1, z2 = model.sample_latents(3), model.sample_latents(3)
    one, two = model.generate(z1, noise="const"), model.generate(z2, noise="const")
    mixed = model.mix(z1, z2, crossover=2)
    assert mixed.shape == one.shape
    assert not torch.allclose(mixed, one, atol=1e-4) and not torch.allclose(mixed, two, atol=1e-4)
    assert torch.allclose(model.mix(z1, z2, crossover=model.num_ws), one, atol=1e-6)
    assert torch.allclose(model.mix(z1, z2, crossover=0), two, atol=1e-6)
    # In training: style_mixing=1 always mixes, 0 never (noise off, so that only the mixing is random).
    z = model.sample_latents(3)
    for probability, changes in ((0.0, False), (1.0, True)):
        mixer = tiny(name, use_noise=False, style_mixing=probability)
        plain = mixer.generator(z)
        assert torch.allclose(mixer.training_fakes(z, None), plain, atol=1e-6) != changes


@pytest.mark.parametrize("name", STYLE)
def test_noise_inputs_and_their_modes(name):
    model = tiny(name)
    for layer in model.modules():
        if isinstance(layer, NoiseInjection):
            layer.strength.data.fill_(0.5)
    z = model.sample_latents(2)
    assert torch.equal(model.generate(z, noise="const"), model.generate(z, noise="const"))
    assert not torch.allclose(model.generate(z), model.generate(z), atol=1e-4)
    assert not torch.allclose(model.generate(z, noise="none"), model.generate(z, noise="const"), atol=1e-4)
    strengths = [m.strength.shape for m in model.modules() if isinstance(m, NoiseInjection)]
    assert strengths and all(s == (() if name == "stylegan2" else s) for s in strengths)
    assert not any(isinstance(m, NoiseInjection) for m in tiny(name, use_noise=False).modules())


def test_stylegan_constant_input_and_instance_norm_are_switchable():
    const, dense = tiny("stylegan"), tiny("stylegan", const_input=False)
    assert const.generator.synthesis.const.shape == (1, 16, 4, 4) and torch.equal(
        const.generator.synthesis.const, torch.ones(1, 16, 4, 4))
    assert not hasattr(dense.generator.synthesis, "const") and hasattr(dense.generator.synthesis, "dense")
    z = dense.sample_latents(2)
    assert dense.generate(z, noise="const").shape == (2, 1, SIZE, SIZE)
    normed, raw = tiny("stylegan"), tiny("stylegan", instance_norm=False)
    assert not torch.allclose(normed.generate(z, noise="const"), raw.generate(z, noise="const"), atol=1e-4)
    blurred = [m for m in tiny("stylegan").modules() if isinstance(m, FIRFilter)]
    assert blurred and not any(isinstance(m, FIRFilter) for m in tiny("stylegan", blur=False).modules())


def test_mapping_has_eight_layers_with_the_lr_multiplier():
    mapping = tiny("stylegan2").generator.mapping
    layers = [m for m in mapping.modules() if isinstance(m, EqualizedLinear)]
    assert len(layers) == 8 and all(m.lr_mul == 0.01 for m in layers)
    assert all(m.lr_mul == 0.1 for m in tiny("stylegan", mapping_lr_mul=0.1).generator.mapping.modules()
               if isinstance(m, EqualizedLinear))
    assert len([m for m in tiny("stylegan2", mapping_layers=2).generator.mapping.modules()
                if isinstance(m, EqualizedLinear)]) == 2


# ---------------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("name", GANS)
def test_conditional_labels_steer_both_networks(name):
    model = tiny(name, conditional=True)
    assert model.conditional and model.num_classes == 3
    z = model.sample_latents(2)
    zeros, ones = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    noise = {} if name == "progan" else {"noise": "const"}
    assert not torch.allclose(model.generate(z, zeros, **noise), model.generate(z, ones, **noise), atol=1e-5)
    images = reals(2)
    model.set_progress(model.num_phases - 1, 1.0)
    assert not torch.allclose(model.discriminator(images, zeros), model.discriminator(images, ones), atol=1e-6)
    with pytest.raises(UserError, match="class indices"):
        model.generate(z, torch.tensor([0, 3]))
    unconditional = tiny(name, conditional=False)
    assert count(unconditional.generator) < count(model.generator)
    assert unconditional.generate(z, zeros).shape == (2, 1, SIZE, SIZE)  # labels ignored
