"""instantiate_plugin: a `_target_` config receives exactly the offered values its signature names."""
import numpy as np
import pytest
import torch

from cvlab.utils.errors import UserError
from cvlab.utils.plugins import instantiate_plugin, missing_arguments


class Recorder:
    """Remembers what it was built with."""

    def __init__(self, labels, seed: int = 0, scale: float = 1.0):
        self.labels, self.seed, self.scale = labels, seed, scale


class TakesAnything:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


TARGET = f"{__name__}.Recorder"


def test_passes_only_the_accepted_values():
    plugin = instantiate_plugin({"_target_": TARGET, "name": "rec", "task": "classification"},
                                labels=[0, 1, 1], seed=7, num_classes=2, class_counts=[1, 2])
    assert type(plugin) is Recorder
    assert (plugin.labels, plugin.seed, plugin.scale) == ([0, 1, 1], 7, 1.0)  # name/task/num_classes not passed


def test_config_keys_win_over_offered_values():
    plugin = instantiate_plugin({"_target_": TARGET, "seed": 3, "scale": 0.5}, labels=[1], seed=7)
    assert (plugin.seed, plugin.scale) == (3, 0.5)


def test_offered_values_reach_the_target_untouched():
    labels = np.array([2, 0, 1])  # not an OmegaConf type: it must not pass through the config
    weights = torch.ones(3)
    plugin = instantiate_plugin({"_target_": f"{__name__}.TakesAnything"}, labels=labels, weights=weights)
    assert plugin.kwargs["labels"] is labels and plugin.kwargs["weights"] is weights


def test_nested_targets_in_the_config_are_built_by_hydra():
    plugin = instantiate_plugin({"_target_": TARGET, "scale": {"_target_": "builtins.float", "_args_": ["0.25"]}},
                                labels=[0])
    assert plugin.scale == 0.25


def test_no_target_gives_none():
    assert instantiate_plugin(None, labels=[0]) is None
    assert instantiate_plugin({"name": "default"}, labels=[0]) is None
    assert missing_arguments({"name": "default"}) == []


def test_a_missing_requirement_is_one_user_error_line():
    assert missing_arguments({"_target_": TARGET}, ["seed"]) == ["labels"]
    assert missing_arguments({"_target_": TARGET, "labels": [0]}) == []
    with pytest.raises(UserError, match=r"^rec needs labels, which is not available here \(available: num_samples, "
                                        r"seed\)\.$"):
        instantiate_plugin({"_target_": TARGET, "name": "rec"}, num_samples=4, seed=0)


def test_an_unimportable_target_is_a_user_error():
    with pytest.raises(UserError, match="cannot import 'cvlab.nowhere.Sampler'"):
        instantiate_plugin({"_target_": "cvlab.nowhere.Sampler"})
