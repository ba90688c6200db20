"""task=generation end to end on a tiny DCGAN-like model that keeps the GAN contract (tests/fixtures/tiny_gan.py,
registered only while these tests run): data in [-1, 1] at a power-of-two size, the two optimisers, the generator EMA,
exact resume, progressive growing by images seen, conditional labels, FID on cvlab features as the checkpoint
monitor, the figures, and `cvlab generate`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict

from conftest import FAST
from cvlab.callbacks.progressive import progress_at
from cvlab.engine import build_datamodule, build_task, run_train
from cvlab.models import _registry
from cvlab.tasks.base import load_task
from cvlab.tasks.generation import MetricSettings, feature_cache_file, feature_settings
from cvlab.utils.config import compose
from cvlab.utils.errors import UserError
from fixtures.tiny_gan import TinyGAN, tiny_gan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What `cvlab train model=<a GAN>` adds (cli.complete_task), the tiny run, and a cheap feature classifier.
GENERATION = ["task=generation", "~optimizer", "~scheduler", "~loss", "data=digits"]
TINY_RUN = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "metrics.feature_epochs=1", "task.grid_samples=16"]


@pytest.fixture(scope="module", autouse=True)
def registered_tiny_gan():
    """tiny_gan in the model registry for this module's tests only (never in cvlab itself)."""
    _registry._ensure_loaded()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_registry._MODELS, "tiny_gan", tiny_gan)
        patch.setitem(_registry._TASKS, "tiny_gan", "generation")
        yield


def gan_cfg(out: Path, *overrides: str, **model):
    """The train config of task=generation with the tiny GAN (``model`` its kwargs) writing to ``out``."""
    cfg = compose("train", [*GENERATION, *FAST, *TINY_RUN, *overrides, f"paths.output_dir={out}"])
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"name": "tiny_gan", "task": "generation", **model})
    return cfg


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of three batches, uninterrupted: (run dir, metrics, objects)."""
    out = tmp_path_factory.mktemp("gan") / "run"
    metrics, objects = run_train(gan_cfg(out, "trainer.max_epochs=2", style=True))
    return out, metrics, objects


# ------------------------------------------------------------------------------------------------ data
def test_digits32_is_the_digits_at_32_px_in_minus_one_to_one(tmp_path):
    cfg = gan_cfg(tmp_path, "data=digits32")
    datamodule = build_datamodule(cfg)
    task = build_task(cfg, datamodule)
    images, labels = next(iter(datamodule.train_dataloader()))
    real = task.real_images(images)
    assert datamodule.info.image_size == 32 and real.shape[1:] == (1, 32, 32) and labels.dtype == torch.long
    assert real.min() == pytest.approx(-1.0, abs=1e-5) and real.max() == pytest.approx(1.0, abs=1e-3)
    assert task.model.image_size == 32  # the model is built at the data's size


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.image_size=24"], "data.image_size=24: a GAN generates powers of two from 4x4 up; set "
                             "data.image_size=16 or 32."),
    (["data=shapes_det", "data.train_size=4", "data.val_size=2"],
     "task=generation trains on the images of classification data"),
    (["optimizer@opt_g=adam", "opt_g.lr=-1"], "optimizer@opt_g=Adam refuses its settings: Invalid learning rate"),
])
def test_bad_settings_are_one_line_before_training(tmp_path, overrides, message):
    cfg = gan_cfg(tmp_path, *overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        build_task(cfg, build_datamodule(cfg))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ optimisers and EMA
def test_the_optimisers_are_the_models_own_unless_a_group_chooses(tmp_path):
    cfg = gan_cfg(tmp_path)
    datamodule = build_datamodule(cfg)
    opt_g, opt_d = build_task(cfg, datamodule).configure_optimizers()
    assert type(opt_g).__name__ == type(opt_d).__name__ == "Adam"
    assert [(g["name"], g["lr"], g["betas"]) for g in opt_g.param_groups] == [("fc", 2e-5, (0.0, 0.99)),
                                                                             ("rest", 2e-3, (0.0, 0.99))]
    chosen = gan_cfg(tmp_path, "optimizer@opt_g=sgd", "opt_g.lr=0.5", "optimizer@opt_d=rmsprop")
    opt_g, opt_d = build_task(chosen, datamodule).configure_optimizers()
    assert type(opt_g).__name__ == "SGD" and type(opt_d).__name__ == "RMSprop"
    # The chosen rate, the model's fc group kept at its 1/100 of it.
    assert [(g["name"], g["lr"]) for g in opt_g.param_groups] == [("fc", pytest.approx(0.005)), ("rest", 0.5)]
    assert opt_d.param_groups[0]["lr"] == 0.001  # conf/optimizer/rmsprop.yaml's


def test_the_ema_follows_the_half_life_and_its_ramp_up(tmp_path):
    cfg = gan_cfg(tmp_path, "task.ema_kimg=2", "task.ema_rampup=null")
    datamodule = build_datamodule(cfg)
    task = build_task(cfg, datamodule)
    live, average = task.model.generator.fc.weight, task.generator_ema.fc.weight
    with torch.no_grad():
        live.fill_(1.0)
        average.fill_(0.0)
    task.update_ema(16)
    beta = 0.5 ** (16 / 2000)  # half-life 2 kimg: after 2,000 images the old average weighs one half
    torch.testing.assert_close(average, torch.full_like(average, 1 - beta))
    # The ramp-up caps the half-life at 5 % of the images seen: 1,000 seen -> 50 images.
    ramped = build_task(gan_cfg(tmp_path, "task.ema_kimg=2", "task.ema_rampup=0.05"), datamodule)
    ramped.images_seen.fill_(1000)
    with torch.no_grad():
        ramped.model.generator.fc.weight.fill_(1.0)
        ramped.generator_ema.fc.weight.fill_(0.0)
    ramped.update_ema(16)
    torch.testing.assert_close(ramped.generator_ema.fc.weight, torch.full_like(average, 1 - 0.5 ** (16 / 50)))
    # task.ema_kimg=0: no averaging, the EMA is the generator.
    plain = build_task(gan_cfg(tmp_path, "task.ema_kimg=0"), datamodule)
    with torch.no_grad():
        plain.model.generator.fc.weight.fill_(3.0)
    plain.update_ema(16)
    torch.testing.assert_close(plain.generator_ema.fc.weight, plain.model.generator.fc.weight)


# ------------------------------------------------------------------------------------------------ a run
def test_a_run_trains_both_networks_and_reports_fid_on_cvlab_features(trained):
    out, metrics, objects = trained
    task = objects["task"]
    assert int(task.images_seen) == 2 * 3 * 16  # 2 epochs x 3 batches of 16
    assert objects["trainer"].global_step == 2 * 2 * 3  # two optimiser steps a batch
    assert {"val/fid_cvlab", "test/fid_cvlab", "test/kid_cvlab", "test/kid_std_cvlab", "test/precision_cvlab",
            "test/recall_cvlab"} <= set(metrics)
    assert not any(key.endswith("/fid") for key in metrics)  # never plain "FID"
    assert metrics["test/fid_cvlab"] > 0 and 0 <= metrics["test/precision_cvlab"] <= 1
    rows = read_csv(out / "results.csv")
    scores = [float(r["val/fid_cvlab"]) for r in rows]
    assert len(scores) == 2 and {"train/loss_d", "train/loss_r1", "train/loss_g"} <= set(rows[0])
    best = torch.load(out / "weights" / "best.ckpt", weights_only=False)
    assert best["epoch"] == scores.index(min(scores))  # the lowest FID is the best checkpoint
    assert metrics["val/fid_cvlab"] == pytest.approx(min(scores), abs=1e-4)
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["feature_network"]["model"] == {"name": "resnet18", "stem": "standard"}
    assert Path(stored["feature_network"]["file"]).is_file()


def test_the_report_gives_the_untrained_generators_fid_as_the_yardstick(trained, tmp_path):
    out, metrics, _ = trained
    stored = json.loads((out / "metrics.json").read_text())
    untrained = stored["untrained/fid_cvlab"]
    assert stored["test/fid_cvlab_to_untrained"] == pytest.approx(metrics["test/fid_cvlab"] / untrained)
    state = torch.load(out / "weights" / "last.ckpt", weights_only=False)["state_dict"]
    assert float(state["untrained_fid"]) == pytest.approx(untrained)  # kept for a resumed run's report
    assert all(abs(float(r["val/fid_cvlab"]) - untrained) > 1e-3 for r in read_csv(out / "results.csv"))
    # A generator that cannot learn (lr 0) stays the untrained one: its first val FID is the yardstick, exactly.
    frozen, _ = run_train(gan_cfg(tmp_path / "frozen", "trainer.max_epochs=1", "optimizer@opt_g=adam", "opt_g.lr=0"))
    assert frozen["val/fid_cvlab"] == pytest.approx(
        json.loads((tmp_path / "frozen" / "metrics.json").read_text())["untrained/fid_cvlab"], rel=1e-5)


def test_fid_falls_as_the_gan_trains(tmp_path):
    # The sanity check of the measure on a real training: the tiny GAN, 6 epochs of 20 batches on digits.
    out = tmp_path / "run"
    metrics, _ = run_train(gan_cfg(out, "trainer.max_epochs=6", "trainer.limit_train_batches=20"))
    untrained = json.loads((out / "metrics.json").read_text())["untrained/fid_cvlab"]
    fids = [float(row["val/fid_cvlab"]) for row in read_csv(out / "results.csv")]
    # Measured: untrained 134.4; val 85.2, 77.5, 80.2, 52.4, 27.6, 17.3 by epoch; test 30.3.
    assert fids[-1] < fids[0] < untrained and metrics["test/fid_cvlab"] < 0.5 * untrained, (untrained, fids)


def test_the_blob_statistic_reads_each_synthesis_convolution_of_a_style_model(tmp_path, trained):
    assert "feature_map_peaks" not in json.loads((trained[0] / "metrics.json").read_text())  # tiny_gan names none
    cfg = compose("train", [*GENERATION, "model=stylegan2", "model.latent_dim=16", "model.w_dim=16",
                            "model.fmap_max=16", f"paths.output_dir={tmp_path}"])
    task = build_task(cfg, build_datamodule(cfg))  # digits: 8 px
    modules = task.generator_ema.synthesis.feature_map_modules()
    peaks = task.feature_map_peaks()
    assert list(peaks) == ["4px.conv1", "8px.conv0", "8px.conv1"]

    def one_spike(module, inputs, output):  # every map of 8px.conv1 becomes a single spike in 64 pixels
        spike = torch.zeros_like(output)
        spike[..., 3, 5] = 1.0
        return spike

    hook = modules["8px.conv1"].register_forward_hook(one_spike)
    spiked = task.feature_map_peaks()
    hook.remove()
    assert spiked["8px.conv1"] == pytest.approx(64.0) and spiked["8px.conv0"] == pytest.approx(peaks["8px.conv0"])
    assert all(1.0 <= peaks[key] < 64.0 for key in peaks)


def test_the_run_draws_its_figures(trained):
    out, _, objects = trained
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_000.png", "epoch_001.png"]
    with PIL.Image.open(out / "samples" / "epoch_001.png") as grid:
        # 16 grid samples in 4 x 4 tiles of 8 px enlarged to 64, 2 px apart: 4 * 64 + 5 * 2.
        assert grid.size == (266, 266)
    for name in ("samples.png", "progression.png", "truncation_sweep.png", "style_mixing.png", "curves.png"):
        assert (out / name).is_file(), name
    # samples.png is the best checkpoint's EMA on the grid latents, as every epoch's grid is.
    from cvlab.utils.plots import save_image_grid

    task = objects["task"]
    save_image_grid(task.grid_images(), out.parent / "again.png", task.grid_shape[1])
    assert (out.parent / "again.png").read_bytes() == (out / "samples.png").read_bytes()


def test_checkpoints_hold_the_gan_and_its_ema_but_not_the_feature_network(trained):
    out, _, objects = trained
    state = torch.load(out / "weights" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("generator_ema.") for k in state) and "images_seen" in state
    assert {k.split(".")[0] for k in state} == {"model", "generator_ema", "images_seen", "untrained_fid"}
    restored = load_task(out / "weights" / "best.ckpt")
    assert type(restored).__name__ == "GenerationTask" and restored.hparams.opt_g is None
    z = restored.latents(4, 0)
    torch.testing.assert_close(restored.sample(z), objects["task"].sample(z))  # the run ended on best's weights


def test_resume_continues_exactly(trained, tmp_path):
    # The uninterrupted run trained this session's feature classifier, these two read it from the cache: equal
    # weights also show that building it (or not) leaves the training's random stream alone.
    full_dir, full_metrics, _ = trained
    first = tmp_path / "run"
    run_train(gan_cfg(first, "trainer.max_epochs=1", style=True))
    _, objects = run_train(gan_cfg(first, "trainer.max_epochs=2", f"resume={first / 'weights' / 'last.ckpt'}",
                                   style=True))
    resumed = torch.load(first / "weights" / "last.ckpt", weights_only=False)
    straight = torch.load(full_dir / "weights" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 12
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for mine, theirs in zip(resumed["optimizer_states"], straight["optimizer_states"]):
        for index, state in theirs["state"].items():
            torch.testing.assert_close(mine["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-6)
    fids = [float(r["val/fid_cvlab"]) for r in read_csv(first / "results.csv")]
    assert fids == pytest.approx([float(r["val/fid_cvlab"]) for r in read_csv(full_dir / "results.csv")], abs=1e-4)


# ------------------------------------------------------------------------------------------------ options
def test_the_growth_schedule_by_images_seen():
    # 1,000 images a phase: phase 0 whole, then half fading in, half stable; the last phase runs on.
    assert [progress_at(n, 1.0, 3) for n in (0, 999, 1000, 1250, 1500, 1999, 2000, 2250, 9000)] == [
        (0, 1.0), (0, 1.0), (1, 0.0), (1, 0.5), (1, 1.0), (1, 1.0), (2, 0.0), (2, 0.5), (2, 1.0)]


def test_a_progressive_model_grows_by_the_images_it_has_seen(tmp_path):
    # 64 images a phase, batches of 16: the sixth batch starts after 80 images, half way through phase 1's fade.
    _, objects = run_train(gan_cfg(tmp_path / "run", "data.image_size=16", "trainer.limit_train_batches=6",
                                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                                   progressive=True, kimg_per_phase=0.064))
    task = objects["task"]
    assert int(task.images_seen) == 96
    assert task.model.generator.progress.tolist() == [1.0, 0.5] == list(progress_at(80, 0.064, 3))
    assert task.generator_ema.progress.tolist() == [1.0, 0.5]  # the EMA copies the generator's buffers
    assert task.model.current_resolution == 8 and task.grid_images().shape[-1] == 16


def test_no_epoch_of_a_growing_model_becomes_the_best_checkpoint(tmp_path):
    # 8 px (phases 4, 8), 64 images a phase, 48 an epoch: epoch 0 at 4x4, epoch 1 fading in (alpha 0.5 at its last
    # batch), epochs 2 and 3 fully grown.
    out = tmp_path / "run"
    run_train(gan_cfg(out, "trainer.max_epochs=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                      progressive=True, kimg_per_phase=0.064))
    rows = read_csv(out / "results.csv")
    monitor = [float(row["val/fid_cvlab"]) for row in rows]
    assert [math.isnan(value) for value in monitor] == [True, True, False, False]
    growing = [float(row["val/fid_cvlab_growing"]) for row in rows]
    assert all(value > 0 for value in growing[:2]) and all(math.isnan(value) for value in growing[2:])
    best = torch.load(out / "weights" / "best.ckpt", weights_only=False)
    assert best["epoch"] == 2 + monitor[2:].index(min(monitor[2:]))


def test_a_conditional_model_gets_the_batch_labels(tmp_path):
    class Labels(pl.Callback):
        seen: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(batch[1].clone())

    for conditional in (True, False):
        cfg = gan_cfg(tmp_path / str(conditional), "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1", conditional=conditional)
        Labels.seen = []
        _, objects = run_train(cfg, extra_callbacks=[Labels()])
        seen = objects["task"].model.seen_labels
        if conditional:
            assert [labels.tolist() for labels in seen] == [labels.tolist() for labels in Labels.seen]
        else:
            assert seen == [None, None]


# ------------------------------------------------------------------------------------------------ features
def test_the_feature_classifier_is_cached_by_the_data_settings(trained, tmp_path, monkeypatch):
    cfg = gan_cfg(tmp_path, "metrics.feature_epochs=1")
    datamodule = build_datamodule(cfg)
    metrics = MetricSettings.from_dict(OmegaConf.to_container(cfg.metrics))
    cached = feature_cache_file(feature_settings(datamodule, metrics))
    assert cached.is_file() and cached.name.startswith("digits-8px-resnet18-")
    bigger = build_datamodule(gan_cfg(tmp_path, "data.image_size=16"))
    other_batch = build_datamodule(gan_cfg(tmp_path, "data.batch_size=8"))
    assert feature_cache_file(feature_settings(bigger, metrics)) != cached
    assert feature_cache_file(feature_settings(other_batch, metrics)) == cached  # its batches are its own
    more_epochs = MetricSettings.from_dict({**OmegaConf.to_container(cfg.metrics), "feature_epochs": 2})
    assert feature_cache_file(feature_settings(datamodule, more_epochs)) != cached

    def no_training(*args):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr("cvlab.tasks.generation.train_feature_classifier", no_training)
    _, objects = run_train(gan_cfg(tmp_path / "run", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                                   "trainer.limit_test_batches=1"))
    assert objects["task"].feature_record["file"] == str(cached)


# ------------------------------------------------------------------------------------------------ cvlab generate
def _generate(ckpt: Path, out: Path, *overrides: str):
    from cvlab.run.generate import run_generate

    return run_generate(compose("generate", [f"ckpt={ckpt}", "n=6", *overrides, f"paths.output_dir={out}"]))[1]


def test_generate_writes_n_images_and_a_grid_deterministic_per_seed(trained, tmp_path):
    out, _, _ = trained
    ckpt = out / "weights" / "best.ckpt"
    result = _generate(ckpt, tmp_path / "a", "seed=1")
    files = sorted((tmp_path / "a" / "images").iterdir())
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(6)] and (tmp_path / "a" / "grid.png").is_file()
    record = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert record["n"] == 6 and record["seed"] == 1 and record["image_size"] == 8
    _generate(ckpt, tmp_path / "b", "seed=1")
    _generate(ckpt, tmp_path / "c", "seed=2")
    _generate(ckpt, tmp_path / "d", "seed=1", "truncation=0.5")

    def pixels(run: str) -> np.ndarray:
        return np.stack([np.asarray(PIL.Image.open(tmp_path / run / "images" / f"{i:04d}.png")) for i in range(6)])

    assert np.array_equal(pixels("a"), pixels("b"))
    assert not np.array_equal(pixels("a"), pixels("c")) and not np.array_equal(pixels("a"), pixels("d"))
    # The EMA's images, not the live generator's.
    task = result["task"]
    from cvlab.tasks.generation import seeded
    from cvlab.utils.plots import uint8_images

    z = task.latents(6, 1)
    with seeded(1, z.device):
        ema = uint8_images(task.model.generate(z, generator_module=task.generator_ema))
    with seeded(1, z.device):
        live = uint8_images(task.model.generate(z))
    assert np.array_equal(pixels("a"), ema[:, 0].numpy()) and not torch.equal(ema, live)


def test_generate_refuses_what_it_cannot_do(trained, tmp_path, train_cfg):
    out, _, _ = trained
    with pytest.raises(UserError, match="label=3 picks a class, but this checkpoint's model is not conditional"):
        _generate(out / "weights" / "best.ckpt", tmp_path / "a", "label=3")
    classifier = build_task(train_cfg(), build_datamodule(train_cfg()))
    with pytest.raises(UserError, match="cvlab generate samples a generation checkpoint; this one holds a "
                                        "classification task"):
        classifier.generate_images(tmp_path, 4, 1)


def test_the_cli_fills_in_the_generation_task_and_refuses_groups_it_does_not_read(capsys):
    from cvlab.cli import complete_task

    assert complete_task(["model=stylegan2"])[:5] == ["task=generation", "data=digits32", "~optimizer",
                                                      "~scheduler", "~loss"]
    assert complete_task(["model=stylegan2", "data=shapes", "optimizer@opt_d=adam"])[:4] == [
        "task=generation", "~optimizer", "~scheduler", "~loss"]
    again = complete_task(complete_task(["model=stylegan2"]))  # a study's cell completes its overrides again
    assert sorted(again) == sorted(complete_task(["model=stylegan2"]))
    with pytest.raises(SystemExit) as stop:
        complete_task(["model=stylegan2", "optimizer=adam"])
    assert stop.value.code == 2
    assert "task=generation does not read optimizer: a GAN trains two optimisers, chosen with optimizer@opt_g=NAME" \
           in " ".join(capsys.readouterr().err.split())


def test_cvlab_generate_needs_a_checkpoint(cli_here):
    result = cli_here("generate", "n=4")
    assert result.returncode == 2
    assert "generate needs a checkpoint: cvlab generate ckpt=" in result.stderr


def test_tiny_gan_keeps_the_contract():
    """The test model itself: images in [-1, 1] at its size, a scalar per term, gradients to both networks."""
    model = TinyGAN(image_size=16, conditional=True)
    z = model.sample_latents(3)
    images = model.generate(z)
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    terms = model.discriminator_loss(images, torch.tensor([0, 1, 2]), step=0)
    assert set(terms) == {"loss_d", "loss_r1"} and all(t.ndim == 0 for t in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())


# ------------------------------------------------------------------------------------------------ the zoo's GANs
# Narrow, shallow versions of the three, so that a few steps at 8 px cost seconds.
# Progressive ones grow fully within their first 24 images (16 at 4x4, 8 fading in), so best.ckpt can exist.
SMALL_GANS = {
    "progan": ["model.latent_dim=16", "model.fmap_base=64", "model.fmap_max=16", "model.kimg_per_phase=0.016"],
    "stylegan": ["model.latent_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.fmap_base=64",
                 "model.fmap_max=16", "model.kimg_per_phase=0.016"],
    "stylegan2": ["model.latent_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.fmap_base=64",
                  "model.fmap_max=16"],
}


# stylegan grows like progan and styles like stylegan2, which make test keeps; make test-slow runs it too
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "stylegan" else name
                                  for name in sorted(SMALL_GANS)])
def test_a_zoo_gan_trains_resumes_exactly_and_generates(name, tmp_path):
    """`cvlab train model=NAME` as the CLI composes it (task, data and groups filled in, every override checked),
    two epochs straight against one and a resume; then `cvlab generate` twice with one seed."""
    from cvlab.cli import complete_task
    from cvlab.utils.config import check

    def cfg(out: Path, *extra: str):
        overrides = [f"model={name}", *FAST, *TINY_RUN, "trainer.limit_train_batches=2", "data.image_size=8",
                     *SMALL_GANS[name], *extra, f"paths.output_dir={out}"]
        return check("train", complete_task(overrides)).cfg

    straight, _ = run_train(cfg(tmp_path / "straight", "trainer.max_epochs=2"))
    run_train(cfg(tmp_path / "first", "trainer.max_epochs=1"))
    resumed, objects = run_train(cfg(tmp_path / "first", "trainer.max_epochs=2",
                                     f"resume={tmp_path / 'first' / 'weights' / 'last.ckpt'}"))
    assert objects["task"].model.image_size == 8 and type(objects["task"].model).__name__.lower() == name
    mine = torch.load(tmp_path / "first" / "weights" / "last.ckpt", weights_only=False)["state_dict"]
    theirs = torch.load(tmp_path / "straight" / "weights" / "last.ckpt", weights_only=False)["state_dict"]
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-6, msg=key)
        else:
            assert mine[key] == value, key
    assert resumed["val/fid_cvlab"] == pytest.approx(straight["val/fid_cvlab"], abs=1e-4)
    best = tmp_path / "first" / "weights" / "best.ckpt"
    first = _generate(best, tmp_path / "a", "seed=3")["record"]
    _generate(best, tmp_path / "b", "seed=3")
    assert first["image_size"] == 8 and len(first["files"]) == 6
    for file in first["files"]:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
