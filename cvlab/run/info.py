"""`cvlab info model=NAME [data=...]`: exact parameter count, FLOPs (torch.utils.flop_counter) at the data's
input size, and a table of the model's top-level stages (parameters, output shape, FLOPs)."""
from __future__ import annotations

from omegaconf import DictConfig

from cvlab.run.common import to_plain
from cvlab.utils.console import console


def describe_model(model, in_chans: int, image_size: int) -> tuple[int, int, list[tuple[str, int, str, int]]]:
    """Returns (params, flops, rows of (stage, params, output shape, flops)) for one image in eval mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    shapes: dict[str, str] = {}

    def remember(name):
        def hook(_module, _inputs, output):
            shapes[name] = "x".join(map(str, output.shape[1:])) if isinstance(output, torch.Tensor) else type(output).__name__
        return hook

    handles = [child.register_forward_hook(remember(name)) for name, child in model.named_children()]
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, image_size, image_size))
    for handle in handles:
        handle.remove()
    per_module = counter.get_flop_counts()
    root = type(model).__name__

    def flops_of(prefix: str) -> int:
        return int(sum(per_module.get(prefix, {}).values()))

    rows = [
        (name, sum(p.numel() for p in child.parameters()), shapes.get(name, "-"), flops_of(f"{root}.{name}"))
        for name, child in model.named_children()
    ]
    return sum(p.numel() for p in model.parameters()), int(counter.get_total_flops()), rows


def run_info(cfg: DictConfig) -> dict:
    from rich.table import Table

    from cvlab.run.train import build_datamodule
    from cvlab.tasks.base import build_model

    info = build_datamodule(cfg).info
    model = build_model(to_plain(cfg.model), to_plain(cfg.norm), to_plain(cfg.activation), to_plain(cfg.attention),
                        to_plain(cfg.init), num_classes=info["num_classes"], in_chans=info["in_chans"],
                        img_size=info["image_size"])
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
