"""Does distillation help a small student that has few labels? Teacher / student alone / student with KD on
scikit-learn's digits, a temperature sweep, several seeds.

Each seed runs ``cvlab.run.distill.run_distill`` (the path ``cvlab distill`` takes) once with the first temperature,
training the teacher and the baseline student; the other temperatures reuse that teacher (``teacher.ckpt``, the
teacher's best checkpoint) and skip the baseline, whose numbers do not depend on T. Everything else is cvlab's
default distillation (alpha 0.9, AdamW, warm-up cosine) on the CPU.

Data (``--kind``):

* ``offline`` (default): every stage, the teacher included, sees the same ``--fraction`` of the training
  images (stratified by class, drawn with the seed), with their labels. Nobody has more labels or images than the
  student alone, so a gain comes from the teacher's soft targets alone.
* ``semi_supervised``: every stage sees all training images but only ``--fraction`` of their labels; the teacher and
  the baseline train on the labeled images, the distilled student learns from the teacher's soft targets on the rest
  too (the notes' "fewer labels" use of distillation).

Validation and test are digits' held-out splits, untouched by the budget: every stage's best checkpoint is chosen
on val and reported on test. The script prints one row per temperature (test accuracy, mean and standard deviation
over the seeds) and writes every run's numbers (val and test), the command and the machine load to JSON.
Hand-written: no library runs this study.

    python scripts/bench_distill.py --fraction 0.15 --seeds 0 1 2 --temperatures 1 2 4 8 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SPLITS = ("val", "test")  # the best checkpoint is chosen on val and reported on test


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18", help="teacher model (default: resnet18)")
    parser.add_argument("--student", default="mobilenetv2", help="student model (default: mobilenetv2)")
    parser.add_argument("--kind", default="offline", choices=("offline", "semi_supervised"),
                        help="offline: everyone sees --fraction of the images; semi_supervised: all images, "
                             "--fraction of the labels")
    parser.add_argument("--fraction", type=float, default=0.15, help="share of the training set (or of its labels)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a second thread mostly waits)")
    parser.add_argument("--runs", default="runs/bench_distill", help="where the distillation runs go")
    parser.add_argument("--json", default=None, help="results file (default: <runs>/<kind>.json)")
    return parser.parse_args(argv)


def overrides(args, seed: int, temperature: float, out: Path, teacher_ckpt: Path | None) -> list[str]:
    data = ([f"distill.train_fraction={args.fraction}"] if args.kind == "offline"
            else [f"distill.labeled_fraction={args.fraction}"])
    return [
        f"model@teacher={args.teacher}", f"model@student={args.student}", f"distill.kind={args.kind}", *data,
        f"distill.temperature={temperature}", f"distill.alpha={args.alpha}", f"seed={seed}",
        "trainer=cpu", f"trainer.max_epochs={args.epochs}", f"data.batch_size={args.batch_size}",
        "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "distill.latency_runs=20",
        # best.ckpt (weights only) is all a study needs: the teacher's is reused across temperatures
        "~callbacks.last_checkpoint", "+callbacks.model_checkpoint.save_weights_only=true",
        f"paths.output_dir={out}",
        *([f"teacher.ckpt={teacher_ckpt}", "distill.baseline=false"] if teacher_ckpt else []),
    ]


def run_seed(args, seed: int) -> dict:
    """The teacher, the baseline and one distilled student per temperature, for one seed."""
    import contextlib
    import io

    from cvlab.run.distill import run_distill
    from cvlab.utils.config import compose

    def accuracy(row: dict) -> dict:
        return {split: row[f"{split}/acc"] for split in SPLITS}

    root = Path(args.runs) / args.kind / f"seed{seed}"
    results = {"students_kd": {}}
    teacher_ckpt = None
    for temperature in args.temperatures:
        out = root / f"T{temperature:g}"
        cfg = compose("distill", overrides(args, seed, temperature, out, teacher_ckpt))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the per-stage tables; the summary is printed below
            metrics, _ = run_distill(cfg)
        report = json.loads((out / "distill.json").read_text())
        rows = {row["stage"]: row for row in report["rows"]}
        if teacher_ckpt is None:
            teacher_ckpt = out / "teacher" / "weights" / "best.ckpt"
            results.update(teacher=accuracy(rows["teacher"]), student=accuracy(rows["student"]))
        results["students_kd"][temperature] = accuracy(rows["student_kd"])
        print(f"seed {seed} T={temperature:g} (test acc): teacher {results['teacher']['test']:.4f}  "
              f"student {results['student']['test']:.4f}  student+KD {metrics['test/acc']:.4f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def summarise(args, per_seed: dict[int, dict]) -> list[dict]:
    def mean_std(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    student = [r["student"]["test"] for r in per_seed.values()]
    teacher = [r["teacher"]["test"] for r in per_seed.values()]
    rows = []
    for temperature in args.temperatures:
        kd = [r["students_kd"][temperature]["test"] for r in per_seed.values()]
        gains = [k - s for k, s in zip(kd, student)]
        rows.append({"temperature": temperature, "teacher": mean_std(teacher), "student": mean_std(student),
                     "student_kd": mean_std(kd), "gain_points": mean_std([100 * g for g in gains]),
                     "seeds_with_gain": sum(g > 0 for g in gains)})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from rich.table import Table

    from cvlab.engine import quiet_lightning
    from cvlab.utils.console import console

    torch.set_num_threads(args.threads)
    quiet_lightning()
    load_before = os.getloadavg()
    started = time.perf_counter()
    per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    rows = summarise(args, per_seed)
    load_after = os.getloadavg()

    what = (f"{args.fraction:.0%} of the training images" if args.kind == "offline"
            else f"all training images, {args.fraction:.0%} of the labels")
    table = Table(title=f"digits, {what}: {args.teacher} -> {args.student}, alpha={args.alpha:g}, "
                        f"{args.epochs} epochs, seeds {args.seeds}: test accuracy %, mean ± std",
                  title_justify="left")
    for column in ("T", "teacher", "student alone", "student with KD", "gain (points)", "seeds with gain"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['temperature']:g}", *(f"{100 * row[k][0]:.2f} ± {100 * row[k][1]:.2f}"
                                                   for k in ("teacher", "student", "student_kd")),
                      f"{row['gain_points'][0]:+.2f} ± {row['gain_points'][1]:.2f}",
                      f"{row['seeds_with_gain']}/{len(args.seeds)}")
    console.print(table)
    elapsed = time.perf_counter() - started
    console.print(f"{elapsed / 60:.1f} min; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
                  f"({os.cpu_count()} CPUs)", highlight=False)

    path = Path(args.json or Path(args.runs) / f"{args.kind}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args), "summary": rows,
        "per_seed": {str(seed): result for seed, result in per_seed.items()},
        "minutes": round(elapsed / 60, 2), "loadavg_before": load_before, "loadavg_after": load_after,
        "cpus": os.cpu_count(),
    }, indent=2, default=float))
    console.print(f"results: {path}", highlight=False)


if __name__ == "__main__":
    main()
