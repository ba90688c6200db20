"""`cvlab train`: compose the groups, fit, pick the best checkpoint on val, report it on test (metrics.json, plots,
tables). The work is the engine's :func:`~cvlab.engine.run_train`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import run_guarded, run_train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    OmegaConf.set_readonly(cfg, False)
    return run_guarded(run_train, cfg)


if __name__ == "__main__":
    main()
