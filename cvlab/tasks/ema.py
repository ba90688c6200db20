"""Weight EMA: an exponential moving average of a network's weights, the copy a task evaluates and deploys.

Polyak averaging with exponential weights as the YOLOv5 / v6 / v7 trainers keep it (``ModelEMA`` in their
``utils/torch_utils.py``; Ultralytics' too): after the k-th optimiser step

    ema <- d_k · ema + (1 − d_k) · live,    d_k = decay · (1 − exp(−k / tau))

with ``decay`` 0.9999 and ``tau`` 2000. The ramp keeps the early average near the moving weights (d_1 ≈ 0.0005,
d_2000 ≈ 0.63) and lets it reach ``decay`` (a horizon of ~10,000 steps) late in a long run.

torch's :class:`~torch.optim.swa_utils.AveragedModel` keeps the copy and applies the update (``multi_avg_fn``, one
``torch._foreach_lerp_`` per device and dtype); only the ramped decay is cvlab's. As AveragedModel does without
``use_buffers``, the buffers (BatchNorm's running statistics) are copied from the live network at every update,
where YOLOv5's ModelEMA averages them like the weights. The first update copies the weights (AveragedModel's start;
YOLOv5's first keeps 0.05 % of the initial weights, d_1 ≈ 0.0005).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(updates: int, decay: float = 0.9999, tau: float = 2000.0) -> float:
    """The decay ``d_k`` of the k-th update (``updates`` = k >= 1), see the module docstring."""
    return decay * (1.0 - math.exp(-updates / tau))


class WeightEMA(AveragedModel):
    """The EMA of ``network``'s weights (the module docstring): ``.module`` is the averaged copy (no gradients),
    ``update_parameters(network)`` one update after an optimiser step, ``n_averaged`` the updates so far (a buffer:
    checkpoints carry it, so a resumed run continues the ramp).

    Args:
        network: the live network; its copy starts as it is now.
        decay: the asymptotic decay, in [0, 1) (0.9999).
        tau: the ramp's time constant in updates, > 0 (2000).
    """

    def __init__(self, network: nn.Module, decay: float = 0.9999, tau: float = 2000.0):
        if not 0 <= decay < 1 or not tau > 0:
            raise ValueError(f"WeightEMA needs decay in [0, 1) and tau > 0, got {decay} and {tau}")
        super().__init__(network, multi_avg_fn=self._average, use_buffers=False)
        self.decay, self.tau = float(decay), float(tau)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def _average(self, averaged: list[Tensor], live: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel calls this from the second update on, with the count of updates before this one.
        weight = 1.0 - ema_decay(int(num_averaged) + 1, self.decay, self.tau)
        torch._foreach_lerp_(averaged, live, weight)
