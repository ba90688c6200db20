"""Test time per image of trained R-CNN, Fast R-CNN and Faster R-CNN runs on the CPU, split into proposals and
network, with their training times: the measurements behind the Fast R-CNN paper's claims (Girshick 2015, Table 4:
213× faster than R-CNN at test, 9× in training, VGG16 on a GPU) and Faster R-CNN's (Ren et al. 2015: the RPN
replaces selective search's ~2 s an image).

    python scripts/bench_rcnn_speed.py --run rcnn=runs/detection/A --run fast_rcnn=runs/detection/B \\
        --run faster_rcnn=runs/detection/C --images 50 --threads 2 [--proposals 2000]

Each run's ``weights/best.ckpt`` is restored as `cvlab eval` restores it (fused for inference) and timed on the
first ``--images`` images of the test split its training cut, one image at a time (batch 1, as the paper times):

- *proposals*: selective search on the image, uncached (``cvlab.ops.proposals.compute_proposals`` with the model's
  own settings); Faster R-CNN's proposals come from its RPN, inside the network;
- *network*: the detector's forward on the image (given the proposals for R-CNN and Fast R-CNN), post-processing
  included.

Training time is the run's own ``train_time_s`` (metrics.json; R-CNN's sums its stages', less its proposals stage:
the paper's times, too, start from precomputed proposals). What is timed is the model, not the data loading.
The load average before and after is printed: compare only quiet runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cvlab.engine.builders import checkpoint_datamodule
from cvlab.engine.checkpoints import restore_for_inference
from cvlab.ops.proposals import compute_proposals


def more_proposals(proposals: torch.Tensor, count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``proposals`` topped up to ``count`` boxes (or cut to them): the extra ones random boxes of 8 px and up inside
    the image, seeded, to time the network as if selective search had returned ``count`` (the paper's ~2000)."""
    if count <= len(proposals):
        return proposals[:count]
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    corners = torch.rand(count - len(proposals), 2, generator=generator) * torch.tensor([width - 8, height - 8])
    sides = 8 + torch.rand(count - len(proposals), 2, generator=generator) * torch.tensor([width, height]) / 2
    extra = torch.cat([corners, torch.minimum(corners + sides, torch.tensor([width, height]))], dim=1)
    return torch.cat([proposals, extra])


def time_run(run: Path, images: int, proposal_count: int | None = None) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    # R-CNN's detector is its last stage's (test/weights/best.ckpt); the others' their run's.
    task = restore_for_inference(Path(metrics.get("best_ckpt", run / "weights" / "best.ckpt")), "--run")
    network = task.inference_model.eval()
    datamodule = checkpoint_datamodule(task, None, 0)
    settings = getattr(network, "proposal_settings", None)
    proposal_s, network_s, counts = [], [], []
    with torch.inference_mode():
        warm_up, _ = datamodule.test_set[0]  # the first call's one-off costs (OpenCV's and torch's set-up) not timed
        network(warm_up[None], proposals=None if settings is None else [compute_proposals(warm_up, settings)])
        for index in range(min(images, len(datamodule.test_set))):
            image, _ = datamodule.test_set[index]
            proposals = None
            if settings is not None:
                started = time.perf_counter()
                proposals = [compute_proposals(image, settings)]
                proposal_s.append(time.perf_counter() - started)
                if proposal_count:
                    proposals = [more_proposals(proposals[0], proposal_count, tuple(image.shape[-2:]), index)]
                counts.append(len(proposals[0]))
            started = time.perf_counter()
            network(image[None], proposals=proposals)  # None: Faster R-CNN's RPN proposes
            network_s.append(time.perf_counter() - started)
    return {"run": str(run), "model": task.hparams.model.get("name"), "images": len(network_s),
            "proposal_s": float(np.mean(proposal_s)) if proposal_s else 0.0,
            "proposals_per_image": float(np.mean(counts)) if counts else None,
            "network_s": float(np.mean(network_s)),
            "train_s": metrics.get("train_time_s", 0.0) - metrics.get("time/proposals_s", 0.0),
            "map_50": metrics.get("test/map_50"), "map": metrics.get("test/map")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a finished run directory (repeat); the first one is the ratios' reference")
    parser.add_argument("--images", type=int, default=50, help="test images timed (default: 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--proposals", type=int, metavar="N",
                        help="time R-CNN's and Fast R-CNN's network on N proposals an image (selective search's, "
                             "topped up with random boxes): how the per-region cost grows (default: as found)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    results = {}
    for item in args.run:
        name, _, path = item.partition("=")
        results[name] = time_run(Path(path), args.images, args.proposals)
    load_after = os.getloadavg()[0]

    reference = results[args.run[0].partition("=")[0]]
    print(f"{args.threads} threads, batch 1, load average {load_before:.2f} before / {load_after:.2f} after")
    print("| model | test mAP@0.5 | mAP | proposals / image | proposals s | network s | total s | "
          "network speed-up | training s | training speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        count = f"{r['proposals_per_image']:.0f}" if r["proposals_per_image"] is not None else "RPN"
        train = f"{r['train_s']:.0f}" if r["train_s"] else "–"
        train_ratio = (f"{reference['train_s'] / r['train_s']:.1f}×" if r["train_s"] and reference["train_s"]
                       else "–")
        print(f"| {name} | {r['map_50']:.3f} | {r['map']:.3f} | {count} | {r['proposal_s']:.3f} | "
              f"{r['network_s']:.3f} | {r['proposal_s'] + r['network_s']:.3f} | "
              f"{reference['network_s'] / r['network_s']:.1f}× | {train} | {train_ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "load": [load_before, load_after],
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
