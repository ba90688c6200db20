"""`cvlab export ckpt=PATH [format=onnx|torchscript] [out=PATH] [images=4]`: export a checkpoint's network, check it
on real images against the checkpoint (the largest absolute difference of every output, printed), and write the graph
with its sidecar json (:mod:`cvlab.engine.export` says what the graph and the sidecar hold). Bad input is one line
and exit 2; a check that fails is one line and exit 1; either way nothing is written."""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from cvlab.engine import ExportCheckFailed, export_checkpoint, quiet_lightning
from cvlab.utils.console import console, print_error

CHECK_FAILED_EXIT_CODE = 1


def run_export(cfg: DictConfig):
    from rich.table import Table

    quiet_lightning()
    ckpt = Path(str(cfg.ckpt)).expanduser()
    try:
        result = export_checkpoint(ckpt, str(cfg.format), None if cfg.out is None else str(cfg.out), cfg.images)
    except ExportCheckFailed as error:
        print_error(str(error))
        sys.exit(CHECK_FAILED_EXIT_CODE)
    table = Table(title=f"{result.format} export checked against {ckpt.name} ({result.runtime})",
                  title_justify="left")
    for column in ("batch", "output", "shape", "max abs diff", "tolerance", ""):
        table.add_column(column, justify="left" if column in ("output", "shape") else "right")
    for row in result.rows:
        table.add_row(str(row.batch), row.output, "x".join(map(str, row.shape)), f"{row.max_abs_diff:.2e}",
                      f"{row.tolerance:g}", "ok" if row.ok else "FAIL")
    console.print(table)
    if result.fused:
        console.print(f"fused before export: {', '.join(name or '(the network)' for name in result.fused)}",
                      highlight=False)
    console.print(f"[bold]wrote[/] {result.path}\n[bold]sidecar[/] {result.sidecar}", highlight=False)
    return result
