"""`cvlab eval ckpt=PATH [split=test|val] [data=...]`: restore the task from the checkpoint alone (a detector fused,
as `cvlab export` writes it), score it on one split of its data (the same split the training run cut: the checkpoint
keeps the data config and seed), print the metrics and write eval.json (in <run>/eval/<time>/)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvlab.engine import (
    checkpoint_datamodule,
    evaluate_checkpoint,
    finish_run,
    output_dir,
    quiet_lightning,
    restore_for_inference,
    run_guarded,
    say_run_dir,
)
from cvlab.utils.config import check_split


def run_eval(cfg: DictConfig) -> tuple[dict, dict]:
    quiet_lightning()
    split = check_split(str(cfg.split))
    ckpt = Path(str(cfg.ckpt)).expanduser()
    task = restore_for_inference(ckpt)
    out = output_dir(cfg)
    say_run_dir(out, "start")
    datamodule = checkpoint_datamodule(task, cfg.get("data"), cfg.seed)
    data_name = (cfg.data if cfg.get("data") is not None else task.hparams.data)["name"]
    metrics = evaluate_checkpoint(task, datamodule, cfg.trainer, out, split)
    metrics.update(ckpt=str(ckpt), data=str(data_name), split=split)
    finish_run(task, out, "eval.json", metrics, title=f"eval of {ckpt.name} on the {split} split of {data_name}")
    return metrics, {"task": task}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig):
    return run_guarded(run_eval, cfg)


if __name__ == "__main__":
    main()
