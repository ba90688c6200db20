"""Export parity and speed: for each model and format, the largest absolute difference between the exported graph and
its checkpoint, and images/s of the graph's runtime (onnxruntime on the CPU, or torch.jit) beside PyTorch eager at a
fixed batch.

Each model gets a one-step training run (cvlab's own `cvlab train` path: a real checkpoint of real data), whose
best.ckpt is exported with `cvlab export`'s code (:func:`cvlab.engine.export.export_checkpoint`). Its check runs the
graph on validation images as a batch and alone: "max abs diff" is the largest difference of every output but the
boxes there (must be <= 1e-4), "boxes px" that of a detector's decoded boxes (<= 1e-3 px). Then the graph and the
eager network, the same computation (for a detector: the network and its box decode, no NMS), each run ``--warmup``
untimed and ``--runs`` timed batches of ``--batch`` random images under ``torch.inference_mode()``; images/s =
batch / median batch time. Both use ``--threads`` CPU threads (torch.set_num_threads, onnxruntime's
intra_op_num_threads). Classifiers run on the embedded shape images at ``--image-size`` (3 channels), detectors on
the shape scenes at ``--det-size``. The load average before and after is printed: on a shared machine, compare only
quiet runs.

Hand-written: a timing loop around cvlab's export.

    python scripts/bench_export.py --batch 8 --image-size 224 --det-size 416 --threads 2 --runs 20 --json export.json
    python scripts/bench_export.py --quick      # tiny sizes, one timed batch: a correctness run, not a timing
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet18", "mobilenetv2", "vit_tiny", "yolov3_tiny")
FORMATS = ("onnx", "torchscript")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch (default 8)")
    parser.add_argument("--image-size", type=int, default=224, help="classifiers' input size (default 224)")
    parser.add_argument("--det-size", type=int, default=416, help="detectors' input size (default 416)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch and onnxruntime (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--runs", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help="a correctness run: 32 px classifiers, 64 px detectors, batch 2, 1 timed batch")
    parser.add_argument("--workdir", default=None, help="where the runs and exports go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this json file")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.det_size, args.batch, args.warmup, args.runs = 32, 64, 2, 0, 1
    return args


def train_overrides(model: str, args, out: Path) -> list[str]:
    from cvlab.utils import config

    one_step = ["trainer=debug", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1", "logger=none", "~callbacks.progress_bar",
                "trainer.enable_progress_bar=false", f"data.batch_size={args.batch}", f"model={model}",
                f"paths.output_dir={out}"]
    if config.read_option("model", model).get("task", "classification") == "detection":
        return [*one_step, "task=detection", "data=shapes_det", f"data.image_size={args.det_size}",
                f"data.train_size={args.batch}", f"data.val_size={args.batch}", f"data.test_size={args.batch}"]
    return [*one_step, "data=shapes", f"data.image_size={args.image_size}", f"data.train_size={args.batch}",
            f"data.val_size={args.batch}", f"data.test_size={args.batch}"]


def images_per_second(run, batch, warmup: int, runs: int) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            run(batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def bench_model(model: str, args, workdir: Path) -> list[dict]:
    import torch

    from cvlab.engine import restore_task, run_train
    from cvlab.engine.export import DecodedDetector, ExportedGraph, export_checkpoint, is_detector
    from cvlab.utils.config import compose

    out = workdir / model
    with contextlib.redirect_stdout(io.StringIO()):  # the training run's config tree and tables
        run_train(compose("train", train_overrides(model, args, out)))
    ckpt = out / "weights" / "best.ckpt"
    task = restore_task(ckpt)
    info = task.data_info
    network = task.model.eval()
    eager = DecodedDetector(network, info.image_size).eval() if is_detector(network) else network
    batch = torch.rand(args.batch, info.in_chans, info.image_size, info.image_size,
                       generator=torch.Generator().manual_seed(0))
    eager_speed = images_per_second(eager, batch, args.warmup, args.runs)
    rows = []
    for fmt in args.formats:
        result = export_checkpoint(ckpt, fmt)
        graph = ExportedGraph(result.path, fmt, threads=args.threads)
        rows.append({"model": model, "format": fmt, "input": f"{info.in_chans}x{info.image_size}",
                     "max_abs_diff": max(row.max_abs_diff for row in result.rows if row.output != "boxes"),
                     "max_abs_diff_boxes_px": max((row.max_abs_diff for row in result.rows
                                                   if row.output == "boxes"), default=None),
                     "ok": all(row.ok for row in result.rows), "runtime": graph.runtime,
                     "runtime_images_per_s": images_per_second(graph, batch, args.warmup, args.runs),
                     "eager_images_per_s": eager_speed})
    return rows


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for model in args.models:
            rows.extend(bench_model(model, args, workdir))
    header = (f"{'model':<12} {'format':<11} {'input':>7} {'max abs diff':>12} {'boxes px':>9} {'check':>5} "
              f"{'runtime img/s':>13} {'eager img/s':>11} {'ratio':>6}  runtime")
    print(header)
    for row in rows:
        ratio = row["runtime_images_per_s"] / row["eager_images_per_s"]
        boxes = "-" if row["max_abs_diff_boxes_px"] is None else f"{row['max_abs_diff_boxes_px']:.2e}"
        print(f"{row['model']:<12} {row['format']:<11} {row['input']:>7} {row['max_abs_diff']:>12.2e} {boxes:>9} "
              f"{'ok' if row['ok'] else 'FAIL':>5} {row['runtime_images_per_s']:>13.1f} "
              f"{row['eager_images_per_s']:>11.1f} {ratio:>6.2f}  {row['runtime']}")
    load_after = os.getloadavg()
    print(f"batch {args.batch}, {args.threads} thread(s), {args.warmup} warm-up + {args.runs} timed batches, torch "
          f"{torch.__version__}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
          + (" (--quick: not a timing)" if args.quick else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "command": sys.argv,
                                               "load_average": [load_before, load_after]}, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
