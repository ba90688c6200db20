"""`cvlab tune optimizer.lr="tag(log,interval(1e-4,1e-1))" optimizer=choice(adamw,sgd)`: an Optuna search, each
trial a training run in the tune's directory, ending with a leaderboard, best.yaml and importance.png. The CLI hands
the search to Hydra as ``tune.space`` (:func:`~cvlab.engine.tune_overrides`); the work is the engine's
:func:`~cvlab.engine.run_tune`."""
from __future__ import annotations

import functools

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import run_guarded, run_tune


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig):
    OmegaConf.set_readonly(cfg, False)
    overrides = list(HydraConfig.get().overrides.task)  # those that are not tune.* apply to every trial
    return run_guarded(functools.partial(run_tune, overrides=overrides), cfg)


if __name__ == "__main__":
    main()
