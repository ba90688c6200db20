"""Does every classification model learn the default data at its defaults? One ``cvlab train model=NAME`` per model.

Each model is trained exactly as a new user types it (``cvlab train model=NAME``, plus ``logger=none`` and any
``--set`` overrides), in its own process and run directory, one after another. The script reads each run's
``metrics.json`` (test metrics of the best-on-val checkpoint, val beside them), prints a table (model, wall time,
test and val accuracy, epochs, the run's warnings) and writes every row, the command and the machine load to JSON.
A run whose test accuracy is below ``--min-acc`` must have printed a warning that names the fix; the table flags
those that did not.

    python scripts/bench_zoo.py                                  # every registered classification model
    python scripts/bench_zoo.py --models mobilenetv3_small vit_tiny --set optimizer.lr=1e-3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Lines of a run's output that are warnings: Python's (``UserWarning: ...``) and logging's (``[WARNING]``).
_WARNING = re.compile(r"warning", re.IGNORECASE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="models to train (default: every registered classification model)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every run, e.g. optimizer.lr=1e-3")
    parser.add_argument("--min-acc", type=float, default=0.90,
                        help="test accuracy a model must reach, or warn (default 0.90)")
    parser.add_argument("--runs", default="runs/bench_zoo", help="where the runs and their logs go")
    parser.add_argument("--json", default=None, help="results file (default: <runs>/zoo.json)")
    return parser.parse_args(argv)


def classification_models() -> list[str]:
    from cvlab.models import list_models

    return list_models(task="classification")


def train(model: str, extra: list[str], root: Path) -> dict:
    """One ``cvlab train model=<model>`` in its own directory; its metrics, wall time and warning lines."""
    out = root / model
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cvlab.cli", "train", f"model={model}", "logger=none", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = result.stdout + result.stderr
    (out / "train.log").write_text(log)
    row = {"model": model, "wall_s": round(wall, 1), "returncode": result.returncode,
           "warnings": [line.strip() for line in log.splitlines() if _WARNING.search(line)]}
    metrics_files = sorted(out.glob("runs/*/*/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if result.returncode == 0 and metrics_files:
        metrics = json.loads(metrics_files[-1].read_text())
        row.update({key: metrics.get(key) for key in ("test/acc", "val/acc", "epochs", "train_time_s", "params")})
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    from rich.table import Table

    from cvlab.utils.console import console

    models = args.models or classification_models()
    root = Path(args.runs)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for model in models:
        row = train(model, args.set, root)
        rows.append(row)
        console.print(f"{model}: test {row.get('test/acc', float('nan')):.3f} in {row['wall_s']:.0f} s "
                      f"(exit {row['returncode']})", highlight=False)
    load_after = os.getloadavg()

    title = "cvlab train model=NAME" + "".join(f" {o}" for o in args.set) + " on the default data"
    table = Table(title=title, title_justify="left")
    for column in ("model", "wall s", "test acc", "val acc", "epochs", "warning"):
        table.add_column(column, justify="left" if column in ("model", "warning") else "right")
    for row in rows:
        test = row.get("test/acc")
        silent = test is None or (test < args.min_acc and not row["warnings"])
        table.add_row(row["model"], f"{row['wall_s']:.0f}", "failed" if test is None else f"{test:.3f}",
                      "" if row.get("val/acc") is None else f"{row['val/acc']:.3f}", str(row.get("epochs", "")),
                      ("SILENT FAILURE " if silent else "") + (row["warnings"][0][:80] if row["warnings"] else ""))
    console.print(table)
    elapsed = time.perf_counter() - started
    console.print(f"{elapsed / 60:.1f} min; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
                  f"({os.cpu_count()} CPUs)", highlight=False)

    path = Path(args.json or root / "zoo.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args), "rows": rows, "minutes": round(elapsed / 60, 2),
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
    }, indent=2))
    console.print(f"results: {path}", highlight=False)


if __name__ == "__main__":
    main()
