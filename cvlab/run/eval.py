"""`cvlab eval ckpt=PATH [data=...]`: restore the task from the checkpoint alone, recompute its metrics,
print them and write eval.json (in <run>/eval/<time>/)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.run.common import output_dir, quiet_lightning, run_guarded, say_run_dir
from cvlab.utils.errors import UserError, missing_checkpoint


def restore_task(ckpt: Path, what: str = "checkpoint", file: str = ""):
    """The task saved in ``ckpt``, or a UserError saying what is wrong with the file (``what`` names the option
    that gave it, ``file`` the checkpoint a run usually gives it)."""
    import pickle

    from cvlab.tasks.base import load_task

    if not ckpt.is_file():
        raise missing_checkpoint(what, ckpt, file)
    try:
        return load_task(str(ckpt))
    except (KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the loader wrote
        raise UserError(f"{what} {str(ckpt)!r} is not a cvlab checkpoint "
                        f"({type(error).__name__}: {reason}).") from None


def validate_task(task, datamodule, trainer_cfg: DictConfig, out: Path) -> dict:
    """One validation pass of ``task`` on ``datamodule`` with a quiet trainer: {metric: float}."""
    from hydra.utils import instantiate

    trainer = instantiate(trainer_cfg, logger=False, callbacks=[], enable_model_summary=False,
                          enable_progress_bar=False, default_root_dir=str(out))
    scores = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    return {key: float(value) for key, value in scores.items()}


def run_eval(cfg: DictConfig) -> tuple[dict, dict]:
    from hydra.utils import instantiate

    from cvlab.run.train import finish_run

    quiet_lightning()
    ckpt = Path(str(cfg.ckpt)).expanduser()
    task = restore_task(ckpt)
    out = output_dir(cfg)
    say_run_dir(out, "start")
    data_cfg = cfg.data if cfg.get("data") is not None else OmegaConf.create(task.hparams.data)
    datamodule = instantiate(data_cfg, seed=cfg.seed)
    info = datamodule.info
    expected = task.hparams.data_info
    if info["num_classes"] != expected["num_classes"] or info["in_chans"] != expected["in_chans"]:
        raise UserError(f"data {data_cfg.name!r} has {info['num_classes']} classes x {info['in_chans']} channels but the "
                        f"checkpoint was trained on {expected['num_classes']} x {expected['in_chans']}.")
    metrics = validate_task(task, datamodule, cfg.trainer, out)
    metrics.update(ckpt=str(ckpt), data=str(data_cfg.name))
    finish_run(task, out, "eval.json", metrics, title=f"eval of {ckpt.name} on {data_cfg.name}")
    return metrics, {"task": task}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig):
    return run_guarded(run_eval, cfg)


if __name__ == "__main__":
    main()
