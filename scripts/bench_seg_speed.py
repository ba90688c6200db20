"""Inference speed of the segmentors on the CPU: images per second at batch 1 in eval mode, at 256×512 (a Cityscapes
frame at a quarter of its side), 19 classes, each at its paper's full size.

- bisenet: BiSeNet V1 on ResNet-18 (Yu et al., ECCV 2018), MMSegmentation's layout;
- unet: the paper's 64→1024 UNet (Ronneberger et al., MICCAI 2015), same padding (valid costs 1.4× here);
- danet: DANet on a dilated ResNet-50 at output stride 8 (Fu et al., CVPR 2019), MMSegmentation's R50-D8 layout.

What is timed is ``model(images)``: the logits at the input size. Parameters and FLOPs (2 per multiply-add) come
from :func:`cvlab.engine.profiling.describe_model`; the timing loop is bench_yolo_speed's. The load average
before and after is recorded: compare only quiet runs.

    python scripts/bench_seg_speed.py --threads 2 --json seg_speed.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench_yolo_speed import cpu_name, images_per_second
from cvlab.engine.profiling import describe_model
from cvlab.models import create_model

VARIANTS = {
    "bisenet": {"backbone": "resnet18"},
    "unet": {"padding": "same", "width": 1.0},
    "danet": {"backbone": "resnet50"},
}
SIZE = (256, 512)
NUM_CLASSES = 19


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed passes (default: 3)")
    parser.add_argument("--min-time", type=float, default=3.0, help="and at least this many seconds (default: 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path trained ones avoid
    load_before = os.getloadavg()
    rows = []
    print(f"{'model':<8} {'params':>12} {'GFLOPs':>8} {'img/s':>7} {'best':>6}")
    for name, kwargs in VARIANTS.items():
        torch.manual_seed(0)
        model = create_model(name, num_classes=NUM_CLASSES, in_chans=3, image_size=SIZE[0], **kwargs).eval()
        params, flops, _ = describe_model(model, 3, SIZE)
        speed = images_per_second(model, 1, SIZE, args.repeats, args.min_time)
        rows.append({"model": name, "kwargs": kwargs, "params": params, "gflops": flops / 1e9, **speed})
        print(f"{name:<8} {params:>12,} {flops / 1e9:>8.2f} {speed['images_per_s']:>7.2f} "
              f"{speed['images_per_s_best']:>6.2f}", flush=True)
        del model
    load_after = os.getloadavg()
    base = next(r["images_per_s"] for r in rows if r["model"] == "bisenet")
    print("bisenet is " + ", ".join(f"{base / r['images_per_s']:.1f}x {r['model']}" for r in rows
                                    if r["model"] != "bisenet"))
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), batch 1, {SIZE[0]}x{SIZE[1]}, torch {torch.__version__}; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "cpu": cpu_name(), "threads": args.threads, "size": SIZE,
                       "load_average_before": load_before, "load_average_after": load_after}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
