"""`cvlab info model=NAME [data=...]`: exact parameter count, FLOPs (torch.utils.flop_counter) at the data's
input size, and a table of the model's top-level stages (parameters, output shape, FLOPs)."""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.engine import build_datamodule, build_task, describe_model
from cvlab.utils.console import console


def run_info(cfg: DictConfig) -> dict:
    from rich.table import Table

    datamodule = build_datamodule(cfg)
    info = datamodule.info
    # The task builds the model exactly as training would (each task passes its model the data sizes it takes).
    model = build_task(cfg, datamodule).model
    params, flops, rows = describe_model(model, info.in_chans, info.image_size)
    size = info.image_size
    table = Table(title=f"{cfg.model.name}: {params:,} parameters, {flops / 1e9:.3f} GFLOPs at "
                        f"{info.in_chans}x{size}x{size} ({info.num_classes} classes, data={cfg.data.name})",
                  title_justify="left")
    for column in ("stage", "params", "output", "GFLOPs"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage_params, shape, stage_flops in rows:
        table.add_row(name, f"{stage_params:,}", shape, f"{stage_flops / 1e9:.4f}")
    console.print(table)
    console.print("FLOPs count one multiply-add as 2 (torch.utils.flop_counter).", style="dim")
    return {"params": params, "flops": flops, "stages": rows}
