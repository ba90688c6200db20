"""`cvlab info model=NAME [data=...]`: exact parameter count, FLOPs (torch.utils.flop_counter) at the data's
input size, and a table of the model's top-level stages (parameters, output shape, FLOPs)."""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.utils.console import console


def shape_of(output) -> str:
    """``CxHxW`` of one image's output; a detector body's list of level maps lists each."""
    import torch

    if isinstance(output, torch.Tensor):
        return "x".join(map(str, output.shape[1:]))
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return ", ".join(shape_of(o) for o in output)
    return type(output).__name__


def describe_model(model, in_chans: int, image_size: int) -> tuple[int, int, list[tuple[str, int, str, int]]]:
    """Returns (params, flops, rows of (stage, params, output shape, flops)) for one image in eval mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    shapes: dict[str, str] = {}
    flops: dict[str, int] = {}

    # FLOPs of a stage = the counter's total after its forward minus before: exact whatever wraps the stage.
    def before(name):
        def hook(_module, _inputs):
            flops[name] = flops.get(name, 0) - counter.get_total_flops()
        return hook

    def after(name):
        def hook(_module, _inputs, output):
            flops[name] += counter.get_total_flops()
            shapes[name] = shape_of(output)
        return hook

    handles = []
    for name, child in model.named_children():
        handles += [child.register_forward_pre_hook(before(name)), child.register_forward_hook(after(name))]
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, image_size, image_size))
    for handle in handles:
        handle.remove()
    rows = [
        (name, sum(p.numel() for p in child.parameters()), shapes.get(name, "-"), int(flops.get(name, 0)))
        for name, child in model.named_children()
    ]
    return sum(p.numel() for p in model.parameters()), int(counter.get_total_flops()), rows


def run_info(cfg: DictConfig) -> dict:
    from rich.table import Table

    from cvlab.run.train import build_datamodule, build_task

    datamodule = build_datamodule(cfg)
    info = datamodule.info
    # The task builds the model exactly as training would (each task passes its model the data sizes it takes).
    model = build_task(cfg, info, getattr(datamodule, "train_set", None)).model
    params, flops, rows = describe_model(model, info["in_chans"], info["image_size"])
    size = info["image_size"]
    table = Table(title=f"{cfg.model.name}: {params:,} parameters, {flops / 1e9:.3f} GFLOPs at "
                        f"{info['in_chans']}x{size}x{size} ({info['num_classes']} classes, data={cfg.data.name})",
                  title_justify="left")
    for column in ("stage", "params", "output", "GFLOPs"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage_params, shape, stage_flops in rows:
        table.add_row(name, f"{stage_params:,}", shape, f"{stage_flops / 1e9:.4f}")
    console.print(table)
    console.print("FLOPs count one multiply-add as 2 (torch.utils.flop_counter).", style="dim")
    return {"params": params, "flops": flops, "stages": rows}
