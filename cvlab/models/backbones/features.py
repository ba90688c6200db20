"""The one feature call every backbone answers: its stage outputs, aligned with ``feature_info``.

    features = create_model("resnet50", features_only=True, out_indices=(-3, -2, -1))
    c3, c4, c5 = features(images)              # Tensor[N, 512, H/8, W/8], [N, 1024, H/16, W/16], [N, 2048, H/32, W/32]
    features.feature_info.channels()           # [512, 1024, 2048]
    features.feature_info.reductions()         # [8, 16, 32]

Every backbone (:class:`Backbone`) lists its stages in ``feature_info``, in forward order: one dict per stage with
``num_chs`` (channels of its output), ``reduction`` (input side / output side, so an ``H × W`` input gives
``H // reduction × W // reduction``) and ``module`` (the dotted name of the module whose output the stage is).
:class:`FeatureExtractor` keeps the part of the backbone those stages need and returns their outputs.

Why timm's ``features_only`` spelling rather than ``forward_intermediates(x, indices)``: a detector or segmentor
wants a trunk, not a classifier that can also stop early. ``features_only`` builds a module that holds only the
weights up to the last selected stage (no global pool, no classifier, no later stage), so a detector's parameter
count is exactly trunk + neck + head and its ``state_dict`` has no unused keys; the kept modules keep their names,
so a classifier's ``state_dict`` loads into the trunk with ``strict=False`` and no key is missing.

Why a small stage runner rather than ``torchvision.models.feature_extraction.create_feature_extractor``: that one
traces the model with torch.fx, which stops at data-dependent checks (ViT's input-size check), would need ViT's
tokens reshaped to maps outside the graph anyway, and names nodes by fx's rules rather than by ``feature_info``.
The stage list is already in ``feature_info``, and running it is a loop over module names.

The runner relies on one rule each backbone keeps (and ``tests/models/test_features.py`` checks):
``forward_features`` runs the backbone's top-level children in the order they are registered, and a stage's
``module`` is one of them, or a child of a plain ``nn.Sequential`` on that path.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cvlab.utils.errors import UserError


class FeatureInfo(list):
    """The stages of a backbone (or the selected ones of a :class:`FeatureExtractor`), in forward order: a list of
    ``dict(num_chs=int, reduction=int, module=str)``."""

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reductions(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_names(self) -> list[str]:
        return [info["module"] for info in self]

    def select(self, out_indices: Sequence[int] | None) -> FeatureInfo:
        """The stages at ``out_indices`` (negative counts from the last; None = all), which must be increasing."""
        if out_indices is None:
            out_indices = range(len(self))
        count = len(self)
        positions = []
        for index in out_indices:
            if not -count <= index < count:
                raise UserError(f"out_indices {tuple(out_indices)} go past this backbone's {count} stages "
                                f"(valid: 0..{count - 1} or -{count}..-1).")
            positions.append(index % count)
        if not positions or any(a >= b for a, b in zip(positions, positions[1:])):
            raise UserError(f"out_indices {tuple(out_indices)} must name stages in increasing order "
                            f"(of {count}: 0..{count - 1} or -{count}..-1).")
        return FeatureInfo(dict(self[position]) for position in positions)


class Backbone(nn.Module):
    """Base of every backbone: ``feature_info`` (a :class:`FeatureInfo`) describes its stages, and
    ``forward_features(x: Tensor[N, C, H, W])`` runs its top-level children in registration order (see the module
    docstring); ``create_model(name, features_only=True)`` turns it into a :class:`FeatureExtractor`.
    """

    feature_info: FeatureInfo

    @staticmethod
    def feature_map(output: torch.Tensor, input_size: tuple[int, int], reduction: int) -> torch.Tensor:
        """A stage's output as a ``Tensor[N, C, H // reduction, W // reduction]`` map for an ``H × W`` input.

        CNN stages already give maps; a token model overrides this (ViT drops its class token and lays the patch
        tokens out on their grid).
        """
        return output


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _trunk(container: nn.Module, paths: list[str], last: str, prefix: str = ""
           ) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The children of ``container`` (all of them, or up to the one that holds ``last``), and the dotted names of
    the modules to run, in order.

    A child with one of ``paths`` strictly inside it is replaced by an ``nn.Sequential`` of its own children, cut
    the same way, under the same names, so every kept parameter keeps its ``state_dict`` key.
    """
    kept, steps = [], []
    for name, child in container.named_children():
        path = prefix + name
        inner = [p for p in paths if p.startswith(path + ".")]
        if inner:
            if not _is_plain_sequential(child):
                raise ValueError(f"feature_info names {inner[0]!r} inside {path!r}, which is not a plain nn.Sequential")
            grandchildren, inner_steps = _trunk(child, inner, last, path + ".")
            child = nn.Sequential(OrderedDict(grandchildren))
            steps += inner_steps
        else:
            steps.append(path)
        kept.append((name, child))
        if path == last or last.startswith(path + "."):
            return kept, steps
    if last.startswith(prefix):
        raise ValueError(f"feature_info names {last!r}, which is not a module of {type(container).__name__}")
    return kept, steps


class FeatureExtractor(nn.Module):
    """A backbone's trunk up to its last selected stage:
    ``forward(x: Tensor[N, C, H, W]) -> list[Tensor[N, C_i, H // r_i, W // r_i]]``, one per ``feature_info`` entry
    (``C_i = num_chs``, ``r_i = reduction``), in that order.

    It holds the backbone's modules under their own names (``layer1``, ``features.3``, ``blocks.11``...), up to the
    last selected stage and nothing after it.
    """

    def __init__(self, backbone: Backbone, out_indices: Sequence[int] | None = None):
        super().__init__()
        self.feature_info = backbone.feature_info.select(out_indices)
        self._feature_map = type(backbone).feature_map
        paths = self.feature_info.module_names()
        kept, self._steps = _trunk(backbone, paths, paths[-1])
        for name, module in kept:
            self.add_module(name, module)
        nested = set(paths) - set(self._steps)
        if nested:
            raise ValueError(f"feature_info names {sorted(nested)}, which hold other stages inside them")
        self._reduction_at = dict(zip(paths, self.feature_info.reductions()))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        input_size = (x.shape[-2], x.shape[-1])
        outputs = []
        for step in self._steps:
            x = self.get_submodule(step)(x)
            if step in self._reduction_at:
                outputs.append(self._feature_map(x, input_size, self._reduction_at[step]))
        return outputs
