"""Segmentors of the model zoo; every module here is imported (and so registered) by cvlab.models.

This package also holds what every segmentor shares: the output contract (:class:`Segmentor`) and the zoo-backbone
option (:func:`segmentation_backbone`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import create_model, list_models, model_task
from cvlab.models.backbones.features import FeatureExtractor
from cvlab.utils.errors import UserError


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``Tensor[N, C, h, w]`` → ``Tensor[N, C, *size]`` by bilinear interpolation (``align_corners=False``, as
    MMSegmentation); unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class Segmentor(nn.Module):
    """The segmentation contract: ``forward(images: Tensor[N, in_chans, H, W])`` gives

    - in eval mode the logits ``Tensor[N, num_classes, H, W]``, at the input's size;
    - in training mode ``{"out": Tensor[N, num_classes, H, W], "aux": [Tensor[N, num_classes, H, W], ...]}``, one
      auxiliary output per entry of ``aux_weights`` (the loss weight of each: the task's loss is
      ``loss(out) + Σ w_i · loss(aux_i)``).

    Subclasses implement :meth:`forward_logits`; the outputs are resized here (bilinearly) to the input's size.
    """

    aux_weights: tuple[float, ...] = ()

    def forward_logits(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tensor[N, in_chans, H, W] → (logits, auxiliary logits), each ``Tensor[N, num_classes, h, w]`` at the
        resolution its head works at; the auxiliary list is empty unless ``with_aux``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        size = images.shape[-2:]
        out, aux = self.forward_logits(images, with_aux=self.training)
        out = resize_logits(out, size)
        if not self.training:
            return out
        return {"out": out, "aux": [resize_logits(logits, size) for logits in aux]}


def loss_weights(weights: Sequence[float], count: int, option: str) -> tuple[float, ...]:
    """``weights`` (a list from the config) as a tuple of ``count`` floats; a UserError otherwise."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise UserError(f"{option} takes {count} loss weights, one per auxiliary output; got {list(weights)}.")
    return weights


def segmentation_backbone(name: str, model: str, out_indices: Sequence[int] | None, in_chans: int, image_size: int,
                          norm_layer: NormFactory | None, act_layer: ActFactory | None,
                          attn_layer: AttnFactory | None, **options) -> FeatureExtractor:
    """The zoo classification backbone ``name`` as the trunk of ``model``: its stages at ``out_indices``
    (``create_model(name, features_only=True, ...)``), built with the segmentor's input and layer factories
    (``act_layer=None`` leaves it its own activation) and ``options`` (``stem=``, ``output_stride=``; None
    values are left to the backbone). A backbone that refuses an option is one line naming it."""
    backbones = list_models(task="classification")
    if name not in backbones:
        model_task(name)  # an unknown name gets the registry's close matches
        raise UserError(f"{model}'s backbone must be a classification model, got {name!r}; "
                        f"choose one of {', '.join(backbones)}.")
    options = {key: value for key, value in options.items() if value is not None}
    try:
        return create_model(name, features_only=True, out_indices=out_indices, in_chans=in_chans,
                            image_size=image_size, norm_layer=norm_layer, act_layer=act_layer,
                            attn_layer=attn_layer, **options)
    except (TypeError, ValueError) as error:
        if not options:
            raise
        settings = ", ".join(f"model.{key}={value}" for key, value in options.items())
        raise UserError(f"{model} cannot build backbone {name!r} with {settings} ({error}); set another value, "
                        "or null to leave the backbone its own.") from error
