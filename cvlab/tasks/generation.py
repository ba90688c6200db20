"""Image generation: a generator trained against a discriminator (the GANs of the zoo: progan, stylegan, stylegan2) on
any classification dataset's images, in [-1, 1]; its labels are used only by a class-conditional model
(``model.conditional=true``).

Training, by manual optimisation, per batch: a discriminator step on ``model.discriminator_loss``, a generator step
on ``model.generator_loss``, then an update of the generator's exponential moving average (EMA), the copy that is
sampled, evaluated and saved for ``cvlab generate``. The model owns its losses and regularisers (a lazy one comes on
its due steps only, already scaled by its interval), the resolution of the real images while it grows, and its
paper's optimiser settings. ``optimizer@opt_g=NAME`` / ``optimizer@opt_d=NAME`` replace either optimiser with an
``optimizer`` option (its lr and betas; a param group's own lr keeps its ratio to the model's rate). Each batch is two
optimiser steps, so Lightning's ``global_step`` (and ``trainer.max_steps``) counts twice the batches.

The EMA (Karras et al. 2018, ProGAN; StyleGAN's half-life form): after each batch of B images,
``ema <- lerp(generator, ema, beta)`` with ``beta = 0.5 ** (B / (1000 * ema_kimg))`` (``task.ema_kimg``, StyleGAN's 10),
the half-life capped at ``task.ema_rampup`` times the images seen so far (StyleGAN2-ADA's ramp-up; null: none); its
buffers (the tracked average w, the phase of growth) are copied.

Evaluation (:mod:`cvlab.metrics.generation`): every real image of the split against as many EMA samples of fixed
latents (and, when conditional, the real batch's labels). Validation logs ``val/fid_cvlab``, FID on cvlab features,
the checkpoint monitor (lowest best; NaN, and the score in ``val/fid_cvlab_growing``, while a progressive
model grows or fades in, so best.ckpt is a fully grown generator); before the first step, the untrained
generator's val FID (``untrained/fid_cvlab`` in metrics.json, with the test FID's ratio to it); test also KID,
precision and recall (k = 3) and, given
``metrics.inception_weights``, the same on torchmetrics' Inception (``*_inception``). The cvlab feature network is
a zoo classifier (``metrics.feature_model``) trained for ``metrics.feature_epochs`` on the training split when first
needed, cached under ``$CVLAB_CACHE/features`` by every data setting that changes it; it lives outside the module
tree, so checkpoints do not carry it.

Report: the quality table, ``samples.png`` (the EMA on the grid latents) and, for the style models (``model.mix``),
``truncation_sweep.png`` and ``style_mixing.png``. The sample-grid callback writes ``samples/epoch_<n>.png`` every
epoch and ``progression.png`` at the end; the progressive-growing callback grows progan and stylegan.
"""
from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cvlab.metrics.generation import ClassifierFeatures, GenerationScores, InceptionFeatures, peak_ratio
from cvlab.tasks.base import BaseTask, register_task
from cvlab.utils.errors import UserError

# Fixed seeds of the latents and noise each figure draws, so every epoch and every checkpoint is drawn the same way.
EVAL_SEED = 1_000_000   # + the batch index: the fakes scored against each batch of real images
GRID_SEED = 0           # the sample grids and samples.png
FIGURE_SEED = 1         # the truncation sweep and the style-mixing grid
TRUNCATIONS = (1.0, 0.85, 0.7, 0.5, 0.3, 0.0)
TRUNCATION_ROWS = 6
MIXING_SOURCES = (5, 3)  # style-mixing grid: A sources (columns), B sources (rows per band)
PEAK_SAMPLES = 64  # images whose synthesis feature maps the blob statistic reads
# The feature classifier's training: cvlab's classification defaults (AdamW 3e-3, weight decay 0.05, 5 % linear
# warm-up then cosine to 0) over minibatches of 64.
FEATURE_BATCH = 64
FEATURE_LR = 3e-3
FEATURE_WEIGHT_DECAY = 0.05
FEATURE_WARMUP = 0.05
FEATURE_CACHE_VERSION = 1
# Data settings that do not change what the feature classifier learns (its batches are its own).
_NOT_IN_FEATURE_KEY = ("batch_size", "num_workers", "sampler", "download")
_MEASURE_NAMES = {"fid": "FID", "kid": "KID", "kid_std": "KID std", "precision": "precision", "recall": "recall"}
_FEATURE_NAMES = {"cvlab": "cvlab features", "inception": "Inception"}


@dataclass(frozen=True)
class GenerationSettings:
    """The ``task`` node's settings (conf/task/generation.yaml)."""

    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    grid_samples: int = 64

    @classmethod
    def from_dict(cls, task: dict | None) -> "GenerationSettings":
        task = task or {}
        settings = cls(**{key: task[key] for key in ("ema_kimg", "ema_rampup", "grid_samples") if key in task})
        if settings.ema_kimg < 0 or (settings.ema_rampup is not None and settings.ema_rampup <= 0):
            raise UserError(f"task.ema_kimg must be >= 0 and task.ema_rampup positive or null, got "
                            f"{settings.ema_kimg} and {settings.ema_rampup}.")
        if settings.grid_samples < 1:
            raise UserError(f"task.grid_samples must be at least 1, got {settings.grid_samples}.")
        return settings


@dataclass(frozen=True)
class MetricSettings:
    """The ``metrics`` node's settings (conf/task/base/generation_metrics.yaml)."""

    feature_model: dict
    feature_epochs: int = 5
    k: int = 3
    kid_subset_size: int = 1000
    inception_weights: str | None = None

    @classmethod
    def from_dict(cls, metrics: dict | None) -> "MetricSettings":
        metrics = dict(metrics or {})
        settings = cls(**{"feature_model": {"name": "resnet18", "stem": "standard"}, **metrics})
        if not isinstance(settings.feature_model, dict) or "name" not in settings.feature_model:
            raise UserError("metrics.feature_model is a zoo classifier and its kwargs: {name: resnet18, ...}.")
        if settings.feature_epochs < 1 or settings.k < 1 or settings.kid_subset_size < 2:
            raise UserError(f"metrics.feature_epochs and metrics.k must be at least 1 and metrics.kid_subset_size at "
                            f"least 2, got {settings.feature_epochs}, {settings.k}, {settings.kid_subset_size}.")
        return settings


@contextmanager
def seeded(seed: int, device: torch.device):
    """Draws from the global random generators inside the block (a StyleGAN's noise inputs) repeat for ``seed`` and
    leave training's random stream where it was."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def pixel_statistics(datamodule) -> dict[str, list[float]]:
    """The per-channel mean and std the datamodule normalised its images with (its evaluation transform's
    ``Normalize``; 0 and 1 without one), to bring them back to [-1, 1]."""
    from torchvision.transforms import v2

    transform = getattr(datamodule.val_set, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    normalize = next((step for step in steps if isinstance(step, v2.Normalize)), None)
    channels = datamodule.info.in_chans
    if normalize is None:
        return {"mean": [0.0] * channels, "std": [1.0] * channels}
    return {"mean": [float(v) for v in normalize.mean], "std": [float(v) for v in normalize.std]}


def _optimizer_name(cfg: dict) -> str:
    return str(cfg.get("_target_", "?")).rpartition(".")[2]


def check_optimizer(cfg: dict | None, group: str) -> None:
    """``optimizer@<group>``'s settings, tried on one dummy parameter (torch checks lr, betas, momentum itself)."""
    if cfg is None:
        return
    from hydra.utils import instantiate

    try:
        instantiate(cfg)([nn.Parameter(torch.zeros(1))])
    except Exception as error:  # torch raises ValueError / TypeError; Hydra wraps them
        cause = error.__cause__ or error
        raise UserError(f"optimizer@{group}={_optimizer_name(cfg)} refuses its settings: "
                        f"{str(cause).splitlines()[0]}") from None


def build_optimizer(chosen: dict | None, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """One network's optimiser over the model's param groups (``settings["param_groups"]``): the model's own, Adam at
    its paper's ``lr`` / ``betas`` (``settings``), when ``chosen`` is None; else the ``optimizer`` option ``chosen``
    at its own settings, a group's own lr keeping its ratio to the model's rate."""
    groups = [dict(group) for group in settings["param_groups"]]
    if chosen is None:
        return torch.optim.Adam(groups, **{key: value for key, value in settings.items() if key != "param_groups"})
    from hydra.utils import instantiate

    make = instantiate(chosen)
    lr = make.keywords.get("lr")
    for group in groups:
        if "lr" in group and lr is not None:
            group["lr"] = lr * group["lr"] / settings["lr"]
        for key in set(group) - {"params", "name", "lr"}:  # the model's betas & co. belong to its own Adam
            del group[key]
    return make(groups)


# ---------------------------------------------------------------------------------------------- feature network
def feature_settings(datamodule, metrics: MetricSettings) -> dict:
    """Everything the feature classifier of ``datamodule``'s data depends on: the data settings (but its loaders'),
    the zoo model and its kwargs, the epochs, and the version of the recipe."""
    data = {key: value for key, value in dict(datamodule.hparams).items() if key not in _NOT_IN_FEATURE_KEY}
    return {"data": data, "model": metrics.feature_model, "epochs": metrics.feature_epochs,
            "version": FEATURE_CACHE_VERSION}


def feature_cache_file(settings: dict) -> Path:
    """Where the feature classifier of ``settings`` (:func:`feature_settings`) is cached: its data name, size and
    model in the name, a digest of every setting after them."""
    from cvlab.utils.cache import cache_dir

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data = settings["data"]
    name = f"{data.get('name') or data.get('source')}-{data.get('image_size')}px-{settings['model']['name']}-{digest}"
    return cache_dir("features") / f"{name}.pt"


def _new_classifier(settings: dict, info, seed: int) -> nn.Module:
    """The feature classifier, initialised from ``seed`` (the global random stream stays where it was)."""
    from cvlab.models import create_model

    kwargs = {key: value for key, value in settings["model"].items() if key != "name"}
    try:
        with seeded(seed, torch.device("cpu")):
            return create_model(settings["model"]["name"], num_classes=info.num_classes, in_chans=info.in_chans,
                                image_size=info.image_size, **kwargs)
    except TypeError as error:
        raise UserError(f"metrics.feature_model {settings['model']}: {error}; give the zoo model's own kwargs "
                        "(`cvlab info model=NAME`).") from None


def _accuracy(classifier: nn.Module, dataset, device: torch.device) -> float:
    from torch.utils.data import DataLoader

    correct = total = 0
    classifier.eval()
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=FEATURE_BATCH * 4):
            correct += int((classifier(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def train_feature_classifier(settings: dict, datamodule, device: torch.device, seed: int) -> tuple[nn.Module, float]:
    """A zoo classifier trained with cross-entropy on ``datamodule``'s training split (its own transforms) for
    ``settings["epochs"]`` epochs at cvlab's classification defaults (AdamW 3e-3, warm-up + cosine, batches of 64),
    seeded; returns it (eval mode) and its validation accuracy. The global random stream stays where it was (even a
    DataLoader draws from it), so a run trains alike whether its features were cached or not."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from cvlab.utils.schedules import WarmupCosineLR

    with seeded(seed, device):
        classifier = _new_classifier(settings, datamodule.info, seed).to(device)
        train_set = datamodule.train_set
        loader = DataLoader(train_set, batch_size=FEATURE_BATCH, shuffle=True, drop_last=len(train_set) > FEATURE_BATCH,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=FEATURE_LR, weight_decay=FEATURE_WEIGHT_DECAY)
        schedule = WarmupCosineLR(optimizer, settings["epochs"] * len(loader), FEATURE_WARMUP)
        classifier.train()
        for _ in range(settings["epochs"]):
            for images, labels in loader:
                loss = F.cross_entropy(classifier(images.to(device)), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return classifier.eval(), _accuracy(classifier, datamodule.val_set, device)


def cvlab_feature_network(datamodule, metrics: MetricSettings, pixels: dict, device: torch.device,
                          seed: int) -> tuple[ClassifierFeatures, dict]:
    """The cvlab feature network of ``datamodule``'s data: the cached classifier when its settings were trained
    before (read with ``weights_only=True``), else one trained now and cached (a cache that cannot be written is
    skipped with a line). Returns it and a record for metrics.json (model, epochs, validation accuracy, file)."""
    from cvlab.utils.cache import write_atomic
    from cvlab.utils.console import console

    settings = feature_settings(datamodule, metrics)
    path = feature_cache_file(settings)
    info = datamodule.info
    classifier, accuracy = None, None
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            classifier = _new_classifier(settings, info, seed)
            classifier.load_state_dict(stored["state_dict"])
            accuracy = float(stored["val_acc"])
            classifier = classifier.to(device).eval()
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError):
            classifier = None  # unreadable or of another layout: trained again and replaced
    what = (f"{settings['model']['name']} on the {len(datamodule.train_set):,} training images of "
            f"{settings['data'].get('name') or settings['data'].get('source')}")
    if classifier is None:
        console.print(f"FID features: training {what} ({metrics.feature_epochs} epochs), once; cached for later runs",
                      style="dim", highlight=False)
        classifier, accuracy = train_feature_classifier(settings, datamodule, device, seed)
        buffer = io.BytesIO()
        torch.save({"state_dict": {k: v.cpu() for k, v in classifier.state_dict().items()}, "val_acc": accuracy,
                    "settings": json.dumps(settings, sort_keys=True, default=str)}, buffer)
        try:
            write_atomic(path, lambda out: out.write(buffer.getvalue()))
        except OSError as error:
            console.print(f"FID features not cached ({error}); set CVLAB_CACHE to a writable folder", style="dim",
                          highlight=False)
    console.print(f"FID (cvlab features): penultimate layer of {what}, validation accuracy {accuracy:.4f} ({path})",
                  style="dim", highlight=False)
    record = {"model": settings["model"], "epochs": metrics.feature_epochs, "val_acc": accuracy, "file": str(path)}
    return ClassifierFeatures(classifier, pixels["mean"], pixels["std"]), record


def _display_name(key: str, k: int) -> str:
    """``fid_cvlab`` -> "FID (cvlab features)", ``precision_inception`` -> "precision (Inception, k=3)"."""
    measure, _, features = key.rpartition("_")
    neighbours = f", k={k}" if measure in ("precision", "recall") else ""
    return f"{_MEASURE_NAMES.get(measure, measure)} ({_FEATURE_NAMES.get(features, features)}{neighbours})"


def _cells(images: Tensor) -> list:
    """uint8 ``H x W`` / ``H x W x 3`` arrays of images in [-1, 1]."""
    from cvlab.utils.plots import uint8_images

    pixels = uint8_images(images).permute(0, 2, 3, 1).numpy()
    return [p[..., 0] if p.shape[-1] == 1 else p for p in pixels]


@register_task("generation")
class GenerationTask(BaseTask):
    """See the module docstring. Hyper-parameters besides BaseTask's: ``opt_g`` / ``opt_d`` (``optimizer`` options or
    None: the model's own), ``task`` (:class:`GenerationSettings`), ``metrics`` (:class:`MetricSettings`) and
    ``pixels`` (the data's normalisation, resolved from the datamodule)."""

    groups = ("model", "opt_g", "opt_d", "norm", "activation", "attention", "init", "data", "task", "metrics")

    def __init__(self, *args, opt_g: dict | None = None, opt_d: dict | None = None, task: dict | None = None,
                 metrics: dict | None = None, pixels: dict | None = None, optimizer: dict | None = None, **kwargs):
        super().__init__(*args, optimizer=optimizer, **kwargs)
        self.automatic_optimization = False
        self.settings = GenerationSettings.from_dict(task)
        self.metric_settings = MetricSettings.from_dict(metrics)
        info = self.data_info
        self.model = self.build_model(image_size=info.image_size, in_chans=info.in_chans, num_classes=info.num_classes)
        self.generator_ema = copy.deepcopy(self.model.generator).requires_grad_(False)
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))
        # val FID of the generator before its first step, the yardstick of "how far has training come" (in the
        # checkpoint, so a resumed run still reports it); NaN until measured.
        self.register_buffer("untrained_fid", torch.tensor(float("nan")))
        pixels = pixels or {"mean": [0.0] * info.in_chans, "std": [1.0] * info.in_chans}
        self.register_buffer("pixel_mean", torch.tensor(pixels["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixels["std"]).view(1, -1, 1, 1), persistent=False)
        self.pixels = pixels
        # The feature network and the scores live outside the module tree (no part of a checkpoint: object.__setattr__
        # and a dict bypass nn.Module's registration), built when first needed (setup): {split: {"cvlab" |
        # "inception": GenerationScores}}.
        object.__setattr__(self, "_features", None)
        self._scores: dict[str, dict[str, GenerationScores]] = {}
        self.feature_record: dict = {}
        self.quality: dict[str, dict[str, float]] = {}  # the last evaluation of each split, for the report

    @classmethod
    def resolve(cls, configs: dict, datamodule, seed: int) -> dict:
        """Refuses data whose items are not (image, label) pairs and sizes that are not a power of two; tries the
        chosen optimisers; records the data's normalisation (``pixels``)."""
        data_name = (configs.get("data") or {}).get("name")
        if getattr(datamodule, "kind", None) != "classification":
            raise UserError(f"task=generation trains on the images of classification data (digits32, digits, shapes, "
                            f"imagefolder, mnist, cifar10); data={data_name} is {getattr(datamodule, 'kind', '?')} "
                            "data.")
        size = datamodule.info.image_size
        if size < 4 or size & (size - 1):
            below = 1 << max(2, size.bit_length() - 1)
            raise UserError(f"data.image_size={size}: a GAN generates powers of two from 4x4 up; set "
                            f"data.image_size={below} or {below * 2}.")
        for group in ("opt_g", "opt_d"):
            check_optimizer(configs.get(group), group)
        weights = MetricSettings.from_dict(configs.get("metrics")).inception_weights
        if weights is not None and not Path(str(weights)).expanduser().is_file():
            raise UserError(f"metrics.inception_weights {str(weights)!r} is not a file; give the FID Inception "
                            "weights (pt_inception-2015-12-05-6726825d.pth) or leave it null.")
        return {**configs, "pixels": pixel_statistics(datamodule)}

    # ------------------------------------------------------------------------------------------ sampling
    def real_images(self, images: Tensor) -> Tensor:
        """The datamodule's normalised images back in [-1, 1]."""
        return (images * self.pixel_std + self.pixel_mean).mul(2).sub(1).clamp(-1, 1)

    def latents(self, n: int, seed: int) -> Tensor:
        """``n`` latents drawn from ``seed`` (on the CPU, so any device gets the same), on the task's device."""
        generator = torch.Generator().manual_seed(seed)
        return self.model.sample_latents(n, generator=generator, device="cpu").to(self.device)

    @torch.no_grad()
    def sample(self, z: Tensor, labels: Tensor | None = None, seed: int = GRID_SEED, **kwargs) -> Tensor:
        """Images ``Tensor[n, C, S, S]`` in [-1, 1] of the generator's EMA for latents ``z``; its noise inputs are drawn
        from ``seed`` (``kwargs``: truncation, truncation_cutoff, as ``model.generate``)."""
        with seeded(seed, z.device):
            return self.model.generate(z, labels, generator_module=self.generator_ema, **kwargs)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of the sample grids: ``task.grid_samples`` images, as square as they go."""
        columns = math.ceil(math.sqrt(self.settings.grid_samples))
        return math.ceil(self.settings.grid_samples / columns), columns

    def grid_images(self) -> Tensor:
        """The EMA's samples of the grid latents (a conditional model's classes in turn)."""
        return self.sample(self.latents(self.settings.grid_samples, GRID_SEED), seed=GRID_SEED)

    # ------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        settings = self.model.optimizer_settings()
        optimizers = []
        for group, network in (("opt_g", "generator"), ("opt_d", "discriminator")):
            try:
                optimizers.append(build_optimizer(self.hparams[group], settings[network]))
            except (TypeError, ValueError) as error:
                name = _optimizer_name(self.hparams[group]) if self.hparams[group] else "default"
                raise UserError(f"optimizer@{group}={name} cannot train the {network}: {error}") from None
        return optimizers

    def training_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        real = self.real_images(images)
        labels = labels if self.model.conditional else None
        step = self.global_step // 2  # two optimiser steps a batch
        opt_g, opt_d = self.optimizers()
        terms = self._step(opt_d, self.model.discriminator_loss(real, labels, step))
        terms.update(self._step(opt_g, self.model.generator_loss(len(real), labels, step)))
        self.update_ema(len(real))
        self.images_seen += len(real)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, prog_bar=name in ("loss_d", "loss_g"),
                     batch_size=len(real))

    def _step(self, optimizer, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(sum(terms.values()))
        optimizer.step()
        return {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def update_ema(self, batch_size: int) -> None:
        """One EMA step after a batch of ``batch_size`` images (see the module docstring)."""
        half_life = self.settings.ema_kimg * 1000
        if self.settings.ema_rampup is not None:
            half_life = min(half_life, int(self.images_seen) * self.settings.ema_rampup)
        beta = 0.5 ** (batch_size / half_life) if half_life > 0 else 0.0
        for average, live in zip(self.generator_ema.parameters(), self.model.generator.parameters()):
            average.copy_(live.detach().lerp(average, beta))
        for average, live in zip(self.generator_ema.buffers(), self.model.generator.buffers()):
            average.copy_(live)

    # ------------------------------------------------------------------------------------------ val and test
    def setup(self, stage: str) -> None:
        if stage == "predict" or self._features is not None:
            return
        datamodule = self.trainer.datamodule
        seed = int((self.hparams.data or {}).get("seed", 0))
        features, self.feature_record = cvlab_feature_network(datamodule, self.metric_settings, self.pixels,
                                                              self.trainer.strategy.root_device, seed)
        object.__setattr__(self, "_features", features)

    def on_train_start(self) -> None:
        """On a fresh start, scores the untrained generator's EMA on the val split (the report's yardstick)."""
        if int(self.images_seen) or not torch.isnan(self.untrained_fid):
            return
        was_training = self.training
        self.eval()
        trainer = self.trainer
        loader = trainer.val_dataloaders or trainer.datamodule.val_dataloader()
        count = trainer.num_val_batches[0] if trainer.num_val_batches else None  # validation's own batches
        for batch_idx, batch in enumerate(itertools.islice(loader, count)):
            self._evaluate_batch([part.to(self.device) for part in batch], batch_idx, "untrained")
        scores = self._split_scores("untrained")["cvlab"]
        self.untrained_fid.fill_(scores.compute()["fid"])
        scores.reset()
        self.train(was_training)

    def _split_scores(self, split: str) -> dict[str, GenerationScores]:
        if split not in self._scores:
            full, metrics = split == "test", self.metric_settings
            scores = {"cvlab": GenerationScores(self._features, full, metrics.k, metrics.kid_subset_size)}
            if full and metrics.inception_weights is not None:
                scores["inception"] = GenerationScores(InceptionFeatures(str(Path(metrics.inception_weights)
                                                                             .expanduser())),
                                                       True, metrics.k, metrics.kid_subset_size)
            self._scores[split] = scores
        for scores in self._scores[split].values():
            scores.to(self.device)
        return self._scores[split]

    def _evaluate_batch(self, batch, batch_idx: int, split: str) -> None:
        images, labels = batch
        real = self.real_images(images)
        seed = EVAL_SEED + batch_idx * self.trainer.world_size + self.global_rank
        fake = self.sample(self.latents(len(real), seed), labels if self.model.conditional else None, seed=seed)
        for scores in self._split_scores(split).values():
            scores.update(real, real=True)
            scores.update(fake, real=False)

    def _log_evaluation(self, split: str) -> None:
        figures = {}
        for features, scores in self._split_scores(split).items():
            figures.update({f"{measure}_{features}": value for measure, value in scores.compute().items()})
            scores.reset()
        self.quality[split] = figures
        logged = {f"{split}/{key}": value for key, value in figures.items()}
        if self.trainer.state.fn == "fit" and getattr(self.model, "progressive", False):
            # A growing generator's images are a smaller one's, upsampled: on data as smooth as digits32 they can
            # score better than the finished generator ever does, so no such epoch may become best.ckpt. While it
            # grows the monitor is NaN (never ranked best) and the score goes to *_growing (NaN once grown).
            nan = float("nan")
            grown = getattr(self.model, "fully_grown", True)
            logged = {**{key: value if grown else nan for key, value in logged.items()},
                      **{f"{key}_growing": nan if grown else value for key, value in logged.items()}}
        self.log_dict(logged, prog_bar=split == "val")

    # ------------------------------------------------------------------------------------------ report
    def report(self, out: Path) -> dict:
        """The quality table (every measure under its features' name), samples.png, and for the style models the
        truncation sweep and the style-mixing grid; the feature classifier's record goes to the json."""
        from cvlab.utils.console import console, split_metrics_table
        from cvlab.utils.plots import save_image_grid

        super().report(out)
        record = {"feature_network": self.feature_record} if self.feature_record else {}
        named = {f"{split}/{_display_name(key, self.metric_settings.k)}": value
                 for split, figures in self.quality.items() for key, value in figures.items()}
        if named:
            console.print(split_metrics_table(named, title="generation quality (generator EMA)"))
        save_image_grid(self.grid_images(), out / "samples.png", self.grid_shape[1])
        peaks = self.feature_map_peaks()
        if peaks:
            worst = max(peaks, key=peaks.get)
            record["feature_map_peaks"] = peaks
            record["test/feature_peak_ratio"] = peaks[worst]
            console.print(f"feature maps (blob artefact): max |x| / mean |x| per map, mean over {PEAK_SAMPLES} "
                          f"images, highest at {worst}: {peaks[worst]:.2f}")
        if hasattr(self.model, "mix"):
            self.plot_truncation_sweep(out / "truncation_sweep.png")
            self.plot_style_mixing(out / "style_mixing.png")
        if not torch.isnan(self.untrained_fid):
            untrained = float(self.untrained_fid)
            record["untrained/fid_cvlab"] = untrained
            trained = self.quality.get("test", {}).get("fid_cvlab")
            if trained is not None:
                record["test/fid_cvlab_to_untrained"] = trained / untrained
                console.print(f"test FID (cvlab features) {trained:.2f} = {trained / untrained:.3f} x the untrained "
                              f"generator's val FID {untrained:.2f}")
        return record

    @torch.no_grad()
    def feature_map_peaks(self) -> dict[str, float]:
        """For generators that name their synthesis convolutions (``synthesis.feature_map_modules``, the style
        models): per convolution, the mean :func:`peak_ratio` of its output maps over the EMA's images of
        ``PEAK_SAMPLES`` fixed latents. Empty for the others."""
        synthesis = getattr(self.generator_ema, "synthesis", None)
        if not hasattr(synthesis, "feature_map_modules"):
            return {}
        peaks: dict[str, float] = {}

        def record(name: str):
            return lambda module, inputs, output: peaks.__setitem__(name, float(peak_ratio(output).mean()))

        hooks = [module.register_forward_hook(record(name))
                 for name, module in synthesis.feature_map_modules().items()]
        try:
            self.sample(self.latents(PEAK_SAMPLES, FIGURE_SEED), seed=FIGURE_SEED)
        finally:
            for hook in hooks:
                hook.remove()
        return peaks

    def plot_truncation_sweep(self, path: Path) -> None:
        """One row per latent, one column per truncation ψ (1 = none, 0 = the average w), same noise throughout."""
        from cvlab.utils.plots import plot_image_table

        z = self.latents(TRUNCATION_ROWS, FIGURE_SEED)
        columns = [_cells(self.sample(z, seed=FIGURE_SEED, truncation=psi)) for psi in TRUNCATIONS]
        plot_image_table([list(row) for row in zip(*columns)], path, column_labels=[f"ψ = {psi:g}" for psi in
                                                                                    TRUNCATIONS],
                         title="truncation trick (generator EMA)")

    def plot_style_mixing(self, path: Path) -> None:
        """StyleGAN's Figure 3: sources A across the top, sources B down the side; in the first band each image
        takes B's coarse styles (the first ``c`` style layers) and A's others, in the second A's coarse and B's fine
        (``c``: the 4x4-8x8 layers, or half of them on small images)."""
        from cvlab.utils.plots import plot_image_table

        count_a, count_b = MIXING_SOURCES
        z = self.latents(count_a + count_b, FIGURE_SEED)
        z_a, z_b = z[:count_a], z[count_a:]
        crossover = min(4, self.generator_ema.num_ws // 2)
        with seeded(FIGURE_SEED, z.device):
            a, b = (_cells(self.model.generate(latents, generator_module=self.generator_ema, noise="const"))
                    for latents in (z_a, z_b))
            rows, labels = [[None, *a]], ["sources A"]
            for band, coarse_from_b in (("coarse", True), ("fine", False)):
                for i, source in enumerate(b):
                    first, second = (z_b[i:i + 1].expand(count_a, -1), z_a) if coarse_from_b else \
                        (z_a, z_b[i:i + 1].expand(count_a, -1))
                    mixed = self.model.mix(first, second, crossover, generator_module=self.generator_ema)
                    rows.append([source, *_cells(mixed)])
                    labels.append(f"B{i + 1}: {band} from B")
        plot_image_table(rows, path, row_labels=labels,
                         title=f"style mixing (generator EMA): the first {crossover} style layers from one source")

    # ------------------------------------------------------------------------------------------ cvlab generate
    def generate_images(self, out: Path, n: int, seed: int, truncation: float = 1.0,
                        truncation_cutoff: int | None = None, label: int | str | None = None,
                        batch_size: int = 64) -> dict:
        """``cvlab generate``: ``n`` images of the generator's EMA from latents and noise drawn from ``seed`` (the same
        seed, the same images), saved as ``images/<i>.png`` at the model's resolution and together as ``grid.png``;
        ``label`` (conditional models) fixes one class for all. Returns the json record."""
        from torchvision.transforms.v2.functional import to_pil_image

        from cvlab.utils.plots import save_image_grid, uint8_images

        if n < 1 or batch_size < 1:
            raise UserError(f"n and batch_size must be at least 1, got n={n}, batch_size={batch_size}.")
        labels = self._labels_of(label, n)
        z = self.latents(n, seed)
        with seeded(seed, z.device):
            images = torch.cat([self.model.generate(z[i:i + batch_size], None if labels is None else
                                                    labels[i:i + batch_size], generator_module=self.generator_ema,
                                                    truncation=truncation, truncation_cutoff=truncation_cutoff)
                                for i in range(0, n, batch_size)])
        folder = out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, pixels in enumerate(uint8_images(images)):
            files.append(f"images/{index:04d}.png")
            to_pil_image(pixels).save(out / files[-1])
        save_image_grid(images, out / "grid.png", math.ceil(math.sqrt(n)))
        return {"n": n, "seed": seed, "truncation": truncation, "truncation_cutoff": truncation_cutoff,
                "label": None if labels is None else label, "image_size": int(images.shape[-1]), "files": files,
                "grid": "grid.png"}

    def _labels_of(self, label: int | str | None, n: int) -> Tensor | None:
        if label is None:
            return None
        if not self.model.conditional:
            raise UserError(f"label={label} picks a class, but this checkpoint's model is not conditional "
                            "(model.conditional=false); leave label=null.")
        names = self.class_names
        index = names.index(str(label)) if str(label) in names else label
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise UserError(f"label={label!r} is no class of this checkpoint: give an index in [0, {len(names) - 1}] "
                            f"or a name ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}).")
        return torch.full((n,), index, dtype=torch.long, device=self.device)
