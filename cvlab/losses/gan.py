"""Adversarial losses and regularisers of ProGAN, StyleGAN and StyleGAN2, on discriminator scores ``Tensor[N]``.

Papers:
    Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville 2017, "Improved Training of Wasserstein GANs" (WGAN-GP): the
        critic loss ``E[D(fake)] - E[D(real)]`` and the gradient penalty ``λ · E[(‖∇D(x̂)‖ - 1)²]`` at random
        interpolates ``x̂`` of real and fake images.
    Karras et al. 2018, "Progressive Growing of GANs ..." (ProGAN): WGAN-GP with λ = 10 and the drift penalty
        ``ε · E[D(real)²]``, ε = 0.001, which keeps the critic's output near 0.
    Goodfellow et al. 2014, "Generative Adversarial Nets": the non-saturating logistic loss, ``softplus(D(fake)) +
        softplus(-D(real))`` for D and ``softplus(-D(fake))`` for G (StyleGAN's and StyleGAN2's).
    Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do actually Converge?": R1,
        ``γ / 2 · E[‖∇D(real)‖²]``.
    Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2): the path-length
        regulariser ``E[(‖J_wᵀ y‖ - a)²]``, y ~ N(0, I) / sqrt(H · W) an image-space direction and ``a`` the moving
        average of the lengths (decay 0.01); lazy regularisation.

Written by hand: no library cvlab uses has GAN losses (torchgan is unmaintained). Each returns the unweighted term
(a mean over the batch); the caller weights it (λ, ε, γ / 2, the path-length weight, the lazy interval).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def wgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The critic's Wasserstein loss ``E[D(fake)] - E[D(real)]``."""
    return fake_scores.mean() - real_scores.mean()


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """``-E[D(fake)]``."""
    return -fake_scores.mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, target: float = 1.0) -> Tensor:
    """WGAN-GP's ``E[(‖∇_x̂ D(x̂)‖ - target)² / target²]`` at ``x̂ = real + u · (fake - real)``, ``u ~ U(0, 1)`` per
    sample (ProGAN's form, with its ``wgan_target``); the graph is kept so that the penalty trains the critic."""
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = real.detach().lerp(fake.detach(), u).requires_grad_(True)
    (grads,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    norms = grads.flatten(1).norm(dim=1)
    return ((norms - target).square() / target**2).mean()


def drift_penalty(real_scores: Tensor) -> Tensor:
    """ProGAN's ``E[D(real)²]``."""
    return real_scores.square().mean()


def logistic_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """``E[softplus(D(fake))] + E[softplus(-D(real))]`` (``-log(1 - σ(D(fake))) - log σ(D(real))``)."""
    return F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()


def logistic_generator_loss(fake_scores: Tensor) -> Tensor:
    """The non-saturating ``E[softplus(-D(fake))]`` (``-log σ(D(fake))``)."""
    return F.softplus(-fake_scores).mean()


def r1_penalty(real_scores: Tensor, real: Tensor) -> Tensor:
    """``E[‖∇_x D(x)‖²]`` at the real images ``real`` (which must require grad and have produced ``real_scores``);
    the graph is kept so that the penalty trains D."""
    (grads,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    return grads.square().sum(dim=(1, 2, 3)).mean()


def path_length_penalty(images: Tensor, ws: Tensor, pl_mean: Tensor, decay: float = 0.01) -> tuple[Tensor, Tensor]:
    """StyleGAN2's ``E[(‖J_wᵀ y‖ - a)²]`` for ``images: Tensor[N, C, H, W]`` made from ``ws: Tensor[N, L, w_dim]``
    (the per-layer latents, which must require grad): ``y ~ N(0, I) / sqrt(H · W)``, the length
    ``sqrt(mean_l ‖∂(images · y) / ∂w_l‖²)`` per sample, and ``a = pl_mean.lerp(mean length, decay)``.
    Returns ``(penalty, a)``; the caller stores ``a`` (detached) as the new ``pl_mean``."""
    noise = torch.randn_like(images) / (images.shape[2] * images.shape[3]) ** 0.5
    (grads,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()
    # Not detached, as in the official code: 1% of the penalty's gradient goes through the batch's mean length.
    target = pl_mean.lerp(lengths.mean(), decay)
    return (lengths - target).square().mean(), target
