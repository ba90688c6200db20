"""`cvlab eval ckpt=PATH [data=...]`: restore the task from the checkpoint alone, recompute its metrics,
print them and write eval.json (in <run>/eval/<time>/)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.run.common import class_scores, output_dir, quiet_lightning, run_guarded, say_run_dir, write_json
from cvlab.utils.console import class_ap_table, console, metrics_table
from cvlab.utils.errors import UserError


def restore_task(ckpt: Path):
    """The task saved in ``ckpt``, or a UserError saying what is wrong with the file."""
    import pickle

    from cvlab.tasks.base import load_task

    if not ckpt.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} does not exist; runs keep theirs in "
                        "runs/<task>/<model>/<time>/weights/.")
    try:
        return load_task(str(ckpt))
    except (KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the loader wrote
        raise UserError(f"{ckpt} is not a cvlab checkpoint ({type(error).__name__}: {reason}).") from None


def run_eval(cfg: DictConfig) -> tuple[dict, dict]:
    from hydra.utils import instantiate

    from cvlab.run.train import write_run_plots

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
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False,
                          enable_progress_bar=False, default_root_dir=str(out))
    scores = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    metrics = {key: float(value) for key, value in scores.items()}
    metrics.update(ckpt=str(ckpt), data=str(data_cfg.name))
    report = getattr(task, "report", {})
    write_json(out / "eval.json", {**metrics, **class_scores(report)})
    write_run_plots(task, out)
    console.print(metrics_table(metrics, title=f"eval of {ckpt.name} on {data_cfg.name}"))
    if report:
        console.print(class_ap_table(report["ap50_per_class"], report["ap_per_class"]))
    say_run_dir(out, "end")
    return metrics, {"task": task}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig):
    return run_guarded(run_eval, cfg)


if __name__ == "__main__":
    main()
