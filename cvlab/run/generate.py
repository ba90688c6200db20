"""`cvlab generate ckpt=PATH [n=64] [seed=1] [truncation=1.0] [truncation_cutoff=null] [label=null]`: sample a
generation checkpoint's generator EMA; write ``n`` PNGs (``images/``), ``grid.png`` and ``generate.json`` into
<run>/generate/<time>/. The same seed gives the same images (latents and noise are drawn from it)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import (
    inference_device,
    output_dir,
    quiet_lightning,
    restore_task,
    run_guarded,
    say_run_dir,
    write_json,
)
from cvlab.utils.console import console


def run_generate(cfg: DictConfig) -> tuple[dict, dict]:
    quiet_lightning()
    device = inference_device(str(cfg.device))
    ckpt = Path(str(cfg.ckpt)).expanduser()
    task = restore_task(ckpt).to(device).eval()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    say_run_dir(out, "start")
    record = task.generate_images(out, int(cfg.n), int(cfg.seed), truncation=float(cfg.truncation),
                                  truncation_cutoff=cfg.truncation_cutoff, label=cfg.label,
                                  batch_size=int(cfg.batch_size))
    write_json(out / "generate.json", {"ckpt": str(ckpt), **record})
    console.print(f"{record['n']} images of {record['image_size']} px (seed {record['seed']}, truncation "
                  f"{record['truncation']:g}): {out / 'images'}/, {out / record['grid']}", highlight=False)
    say_run_dir(out, "end")
    return {"images": record["n"]}, {"task": task, "record": record}


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig):
    return run_guarded(run_generate, cfg)


if __name__ == "__main__":
    main()
