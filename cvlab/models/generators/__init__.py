"""Generative adversarial networks of the model zoo (``task=generation``); every module here is imported (and so
registered) by cvlab.models.

This package also holds what every GAN shares: the contract the generation task trains (:class:`GAN`): a generator
and a discriminator, latents, sampling, and each paper's losses and regularisers and optimiser settings.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cvlab.models.generators.layers import Progressive, check_noise_mode, downsample_box, fade_in, upsample_nearest
from cvlab.utils.errors import UserError


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters do not require grad inside the block: a graph built there does not reach them (the
    discriminator, while the generator's loss is computed). Those that required grad do again afterwards."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def due(step: int, interval: int, weight: float) -> bool:
    """Whether a regulariser of ``weight`` (0 = off) evaluated every ``interval`` minibatches is due at ``step``."""
    return weight > 0 and interval > 0 and step % interval == 0


def lazy_adam(lr: float, betas: tuple[float, float], interval: int, on: bool) -> dict[str, Any]:
    """StyleGAN2's lazy regularisation: a network regularised every ``interval`` minibatches trains with Adam's
    ``lr · c / (c + 1)`` and ``beta ** (c / (c + 1))``, ``c = interval`` (the regulariser's step is folded into the
    main steps); unchanged when the regulariser is off or runs every step."""
    ratio = interval / (interval + 1) if on and interval > 1 else 1.0
    return {"lr": lr * ratio, "betas": (betas[0] ** ratio, betas[1] ** ratio)}


def refuse_layer_options(model: str, norm_layer: Any, act_layer: Any, attn_layer: Any) -> None:
    """The GANs keep their papers' layers (pixel norm / AdaIN / demodulation, leaky ReLU 0.2, no attention): a
    ``norm=`` / ``activation=`` / ``attention=`` option other than the default is refused."""
    given = [name for name, value in (("norm", norm_layer), ("activation", act_layer), ("attention", attn_layer))
             if value is not None]
    if given:
        raise UserError(f"{model} keeps its paper's layers, so {', '.join(f'{g}=' for g in given)} cannot apply; "
                        "drop the option (norm=default, activation=default, attention=none).")


class GAN(nn.Module):
    """The generation contract: ``.generator`` and ``.discriminator`` (the task keeps an EMA copy of the generator,
    ``copy.deepcopy(model.generator)``, which :meth:`generate` keeps in step: :meth:`sync_copy`),
    ``latent_dim``, ``conditional`` and ``num_classes``, and:

    - :meth:`sample_latents`, :meth:`generate` (images ``Tensor[n, C, image_size, image_size]`` in [-1, 1]);
    - :meth:`discriminator_loss` and :meth:`generator_loss`: dicts of scalar terms whose sum is the loss of one
      optimiser step; a lazy regulariser appears only on its due steps, already multiplied by its interval;
    - :meth:`optimizer_settings`: the paper's Adam settings for each network; :meth:`profile_forward`, the work of
      one image for ``cvlab info``;
    - progressive growing: ``progressive``, ``num_phases``, :meth:`set_progress`, ``current_resolution``.

    Subclasses build the networks and give their loss terms (:meth:`discriminator_terms`, :meth:`generator_terms`)
    and their way of running the generator (:meth:`run_generator`, :meth:`training_fakes`).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int, image_size: int,
                 in_chans: int, num_classes: int, conditional: bool, kimg_per_phase: float | None = None):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.in_chans = in_chans
        self.conditional = bool(conditional)
        self.num_classes = int(num_classes)
        # Read by the progressive-growing callback: thousands of real images shown per phase.
        self.kimg_per_phase = kimg_per_phase

    # ------------------------------------------------------------------------------------------ progress
    def _progress_modules(self, *networks: nn.Module) -> list[Progressive]:
        return [m for net in networks for m in net.modules() if isinstance(m, Progressive)]

    @property
    def _progress(self) -> Progressive:
        return self._progress_modules(self.generator)[0]

    @property
    def progressive(self) -> bool:
        return self.num_phases > 1

    @property
    def num_phases(self) -> int:
        modules = self._progress_modules(self.generator)
        return modules[0].num_phases if modules else 1

    @property
    def current_resolution(self) -> int:
        return self._progress.current_resolution if self.progressive else self.image_size

    @property
    def fully_grown(self) -> bool:
        """Whether the generator draws at its full resolution with no block fading in (always, when not
        progressive): only then are its images, and their scores, those of the finished architecture."""
        progress = self._progress if self.progressive else None
        return progress is None or (progress.phase == self.num_phases - 1 and not progress.fading)

    def set_progress(self, phase: int, alpha: float = 1.0) -> None:
        """Grow both networks to ``phase`` (0 = 4×4) with the newest block faded in by ``alpha`` in [0, 1]."""
        for module in self._progress_modules(self.generator, self.discriminator):
            module.set_progress(phase, alpha)

    def sync_copy(self, generator: nn.Module) -> None:
        """Give a copy of the generator (the task's EMA) the state it shares with the trained one rather than
        averages: the progress and (style models) ``w_avg``, as StyleGAN2-ADA copies the buffers to its G_ema."""
        if generator is not self.generator and self.progressive:
            for module in self._progress_modules(generator):
                module.set_progress(self._progress.phase, self._progress.alpha)

    def profile_forward(self, images: Tensor) -> None:
        """The work of one image, for ``cvlab info``'s counts (a GAN has no forward): the generator draws one
        from a latent, the discriminator scores one (``images``: Tensor[1, C, S, S])."""
        labels = torch.zeros(len(images), dtype=torch.long, device=images.device) if self.conditional else None
        self.generator(self.sample_latents(len(images), device=images.device), labels)
        self.discriminator(images, labels)

    # ------------------------------------------------------------------------------------------ sampling
    def sample_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``Tensor[n, latent_dim]`` of N(0, 1), on ``device`` (default: the model's); drawn from ``generator`` on its
        own device (fixed latents from a CPU generator are the same on any accelerator)."""
        device = device if device is not None else next(self.parameters()).device
        draw_on = generator.device if generator is not None else device
        return torch.randn(n, self.latent_dim, generator=generator, device=draw_on).to(device)

    def labels_for(self, labels: Tensor | None, n: int, device, *, default: str) -> Tensor | None:
        """The class labels ``Tensor[n]`` the networks see: None when unconditional; when conditional, ``labels``
        (checked), or for None ``default``: ``"random"`` (uniform), ``"cycle"`` (0, 1, 2, ... per sample, for
        grids) or ``"required"`` (a UserError)."""
        if not self.conditional:
            return None
        if labels is None:
            if default == "required":
                raise UserError("model.conditional=true needs class labels, but the data gave none; use a "
                                "labelled dataset or model.conditional=false.")
            if default == "random":
                return torch.randint(self.num_classes, (n,), device=device)
            return torch.arange(n, device=device) % self.num_classes
        labels = labels.to(device=device, dtype=torch.long)
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"labels must be {n} class indices in [0, {self.num_classes - 1}], got "
                            f"shape {tuple(labels.shape)}, range [{int(labels.min())}, {int(labels.max())}].")
        return labels

    def run_generator(self, generator: nn.Module, z: Tensor, labels: Tensor | None, truncation: float,
                      truncation_cutoff: int | None, noise: str) -> Tensor:
        """Images from ``generator`` at the current resolution, unclamped (subclasses add truncation, noise)."""
        raise NotImplementedError

    def training_fakes(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """The generator's images in training (with the paper's training-only pieces: style mixing, the W average)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, z: Tensor, labels: Tensor | None = None, generator_module: nn.Module | None = None,
                 truncation: float = 1.0, truncation_cutoff: int | None = None, noise: str = "random") -> Tensor:
        """Images ``Tensor[n, C, image_size, image_size]`` in [-1, 1] for latents ``z: Tensor[n, latent_dim]`` from
        ``generator_module`` (the task's EMA copy; default ``self.generator``). While growing, the current phase's
        images are upsampled (nearest) to ``image_size``, as the official progressive generators output them.
        ``labels`` (conditional models): class indices, default 0, 1, 2, ... per sample. ``truncation`` (ψ) and
        ``truncation_cutoff`` (the number of first layers truncated, None = all) and ``noise`` (``random``,
        ``const``, ``none``) apply to the style models."""
        net = self.generator if generator_module is None else generator_module
        self.sync_copy(net)
        labels = self.labels_for(labels, z.shape[0], z.device, default="cycle")
        images = self.run_generator(net, z, labels, float(truncation), truncation_cutoff, check_noise_mode(noise))
        return upsample_nearest(images, self.image_size // images.shape[-1]).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------ losses
    def prepare_reals(self, real: Tensor) -> Tensor:
        """Real images as the discriminator sees them now: box-downsampled to ``current_resolution`` and, while a
        block fades in, blended with their half-resolution copy (upsampled) by the same alpha, as ProGAN's
        training loop does (``process_reals``), so that reals and fakes change resolution together."""
        resolution = self.current_resolution
        if real.shape[-1] < resolution or real.shape[-1] % resolution:
            raise UserError(f"real images of {real.shape[-1]} px cannot feed a discriminator at {resolution} px; "
                            f"set data.image_size={self.image_size}.")
        real = downsample_box(real, real.shape[-1] // resolution)
        progress = self._progress if self.progressive else None
        if progress is not None and progress.fading:
            real = fade_in(upsample_nearest(downsample_box(real)), real, progress.alpha)
        return real

    def discriminator_terms(self, real: Tensor, fake: Tensor, labels: Tensor | None, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def generator_terms(self, fake_scores: Tensor, batch_size: int, labels: Tensor | None,
                        step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def discriminator_loss(self, real: Tensor, labels: Tensor | None, step: int) -> dict[str, Tensor]:
        """The discriminator's terms for reals ``Tensor[N, C, H, W]`` in [-1, 1] (any multiple of the current
        resolution; ``prepare_reals``) and as many fakes, made without a graph (with the reals' labels when
        conditional). ``"loss_d"`` and the paper's regularisers; their sum is the loss."""
        real = real.float()
        labels = self.labels_for(labels, real.shape[0], real.device, default="required")
        real = self.prepare_reals(real)
        with torch.no_grad():
            fake = self.training_fakes(self.sample_latents(real.shape[0], device=real.device), labels)
        return self.discriminator_terms(real, fake, labels, step)

    def generator_loss(self, batch_size: int, labels: Tensor | None, step: int) -> dict[str, Tensor]:
        """The generator's terms for ``batch_size`` fakes (random labels when conditional and none given):
        ``"loss_g"`` and the paper's regularisers. The discriminator is frozen meanwhile, so its parameters get no
        gradient from this loss."""
        device = next(self.parameters()).device
        labels = self.labels_for(labels, batch_size, device, default="random")
        with frozen(self.discriminator):
            fake = self.training_fakes(self.sample_latents(batch_size, device=device), labels)
            return self.generator_terms(self.discriminator(fake, labels), batch_size, labels, step)

    # ------------------------------------------------------------------------------------------ optimisers
    def param_groups(self, network: nn.Module) -> list[dict[str, Any]]:
        """``network``'s parameters as optimiser param groups (one, named; the style models name the mapping)."""
        return [{"name": "all", "params": list(network.parameters())}]

    def adam_settings(self) -> dict[str, dict[str, Any]]:
        """Adam's ``lr`` and ``betas`` per network (``"generator"``, ``"discriminator"``)."""
        raise NotImplementedError

    def optimizer_settings(self) -> dict[str, dict[str, Any]]:
        """The paper's optimiser per network: ``{"generator": {"lr", "betas", "param_groups"}, "discriminator":
        {...}}``, Adam (eps 1e-8, PyTorch's default), lazy regularisation's ``c / (c + 1)`` already applied."""
        settings = self.adam_settings()
        return {name: {**settings[name], "param_groups": self.param_groups(net)}
                for name, net in (("generator", self.generator), ("discriminator", self.discriminator))}
