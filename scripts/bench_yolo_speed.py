"""Inference speed of the YOLO detectors on the CPU: images per second at batch 1 and 8, at the papers' input sizes
or at the sizes given (``--sizes 416 640``: every model at each).

YOLOv1 and Fast YOLO (Redmon et al., CVPR 2016) at 448 px, YOLOv2 (Redmon & Farhadi, CVPR 2017), YOLOv3
(Redmon & Farhadi, 2018) and YOLOv4 / YOLOv4-tiny (Bochkovskiy et al., 2020) at 416 px, YOLOv5 n / s (Ultralytics
v6.0), YOLOv6 n / s (Li et al., v3.0, 2023) and YOLOv7 / YOLOv7-tiny (Wang et al., CVPR 2023) at 640 px, each at full
width, with the class count of its reference configuration (20 for the VOC-trained yolov1, yolov1_tiny and
yolov2_tiny; 80 for the COCO-trained others). A model that cannot take a size (YOLOv1: multiples of 64) is skipped
at it, with a line saying so.

What is timed is the network, ``model.forward_raw(images)`` under ``torch.inference_mode()`` in eval mode: decoding
and NMS depend on how many boxes pass the score threshold, which for untrained weights says nothing about a trained
model. ``--fused`` (the default) times the deployed network that `cvlab export`, `cvlab eval` and `cvlab predict` of a
detector run: :func:`cvlab.engine.export.fuse_for_export` folds every BatchNorm into its conv, and gives YOLOv6's and
YOLOv7's deploy forms (RepVGG / RepConv branches merged, YOLOv7's implicit layers folded); ``--no-fused`` times the
training form in eval mode.

Per model and batch size: one untimed warm-up, then timed passes until both ``--repeats`` passes and ``--min-time``
seconds are reached; images/s = batch / median pass time, and from the fastest pass ("best", the less disturbed
figure on a shared machine). Parameters and FLOPs (2 per multiply-add, ``torch.utils.flop_counter``) are counted on
the meta device, of the network as timed (fused or not). The load average before and after is recorded: on a shared
machine, compare numbers only from quiet runs.

Hand-written: a timing loop around the registered models.

    python scripts/bench_yolo_speed.py --threads 2 --batch-sizes 1 8 --json yolo_speed.json
    python scripts/bench_yolo_speed.py --models yolov3 yolov5n yolov7_tiny --sizes 416 640
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cvlab.engine.export import fuse_for_export
from cvlab.models import create_model
from cvlab.utils.errors import UserError

# name: (input size of its paper, classes of its reference cfg)
VARIANTS = {
    "yolov1": (448, 20),
    "yolov1_tiny": (448, 20),
    "yolov2": (416, 80),
    "yolov2_tiny": (416, 20),
    "yolov3": (416, 80),
    "yolov3_tiny": (416, 80),
    "yolov4": (416, 80),
    "yolov4_tiny": (416, 80),
    "yolov5n": (640, 80),
    "yolov5s": (640, 80),
    "yolov6n": (640, 80),
    "yolov6s": (640, 80),
    "yolov7": (640, 80),
    "yolov7_tiny": (640, 80),
}


def build(name: str, image_size: int, num_classes: int, fused: bool) -> torch.nn.Module:
    """The variant in eval mode, fused for deployment when ``fused``."""
    model = create_model(name, num_classes=num_classes, image_size=image_size).eval()
    if fused:
        fuse_for_export(model)
    return model


def count(name: str, image_size: int, num_classes: int, fused: bool) -> tuple[int, int]:
    """(parameters, FLOPs of one image) without allocating weights."""
    with torch.device("meta"):
        model = build(name, image_size, num_classes, fused)
        with FlopCounterMode(display=False) as counter:
            model.forward_raw(torch.empty(1, 3, image_size, image_size))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def images_per_second(forward, batch: int, image_size: int | tuple[int, int], repeats: int, min_time: float) -> dict:
    """Timed passes of ``forward(images)`` on a random batch (square ``image_size`` or ``(height, width)``)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.rand(batch, 3, height, width)
    times: list[float] = []
    with torch.inference_mode():
        forward(images)  # warm-up: first-call allocations and kernel selection
        while len(times) < repeats or sum(times) < min_time:
            started = time.perf_counter()
            forward(images)
            times.append(time.perf_counter() - started)
    median, best = statistics.median(times), min(times)
    return {"images_per_s": batch / median, "images_per_s_best": batch / best, "median_pass_s": median,
            "best_pass_s": best, "passes": len(times)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"variants to time (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="PX",
                        help="input sizes, every model at each (default: each model's paper size)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="time the deployed network, BatchNorms folded and YOLOv6/v7 re-parameterised "
                             "(default: on; --no-fused: the training form in eval mode)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed passes (default: 3)")
    parser.add_argument("--min-time", type=float, default=2.0, help="and at least this many seconds (default: 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path trained ones avoid
    load_before = os.getloadavg()
    rows = []
    print(f"{'fused (deploy form)' if args.fused else 'unfused (training form, eval mode)'} networks")
    for name in args.models:
        paper_size, num_classes = VARIANTS[name]
        for image_size in args.sizes or [paper_size]:
            try:
                params, flops = count(name, image_size, num_classes, args.fused)
            except (ValueError, UserError) as error:
                print(f"{name:<12} {image_size:>5}  skipped: {error}", flush=True)
                continue
            torch.manual_seed(0)
            model = build(name, image_size, num_classes, args.fused)
            speeds = {batch: images_per_second(model.forward_raw, batch, image_size, args.repeats, args.min_time)
                      for batch in args.batch_sizes}
            rows.append({"model": name, "image_size": image_size, "num_classes": num_classes, "fused": args.fused,
                         "params": params, "gflops": flops / 1e9, "batch": speeds})
            del model
            cells = "  ".join(f"{speeds[b]['images_per_s']:>11.2f} {speeds[b]['images_per_s_best']:>6.2f}"
                              for b in args.batch_sizes)
            if len(rows) == 1:
                heads = "  ".join(f"{'img/s b=' + str(b):>11} {'best':>6}" for b in args.batch_sizes)
                print(f"{'model':<12} {'size':>5} {'classes':>7} {'params':>12} {'GFLOPs':>8}  {heads}")
            print(f"{name:<12} {image_size:>5} {num_classes:>7} {params:>12,} {flops / 1e9:>8.2f}  {cells}",
                  flush=True)
    load_after = os.getloadavg()
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                       "load_average_before": load_before, "load_average_after": load_after,
                       "cpu_count": os.cpu_count(), "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
