"""What a model costs: exact parameters, FLOPs (torch.utils.flop_counter, one multiply-add = 2) per top-level stage,
and CPU latency per image."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

LATENCY_WARMUP = 5
LATENCY_THREADS = 1  # per-image latency of one core: comparable across machines, little disturbed by other jobs


def shape_of(output) -> str:
    """``CxHxW`` of one image's output; a list of level maps (a backbone's or a neck's) lists each."""
    if isinstance(output, torch.Tensor):
        return "x".join(map(str, output.shape[1:]))
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return ", ".join(shape_of(o) for o in output)
    return type(output).__name__


def describe_model(model: nn.Module, in_chans: int,
                   image_size: int | tuple[int, int]) -> tuple[int, int, list[tuple[str, int, str, int]]]:
    """Returns (params, flops, rows of (stage, params, output shape, flops)) for one image in eval mode, of side
    ``image_size`` or of ``(height, width)``: ``model(image)``, or the model's ``profile_forward(image)`` where it has
    one (a GAN: one generated image and one discriminator score, a row each)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
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
    # The counter has no formula for the CPU's fused attention kernel (it would count a ViT's attention as 0);
    # the math backend runs the same attention as matmuls it counts.
    image = torch.zeros(1, in_chans, *((image_size, image_size) if isinstance(image_size, int) else image_size))
    # The counter's module tracker hooks the gradients of every module input that requires one; a parameter handed
    # on as an input (StyleGAN2's modulated weights) has none to hook under no_grad, so none may require it here.
    wanted = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        getattr(model, "profile_forward", model)(image)  # a model without a forward of its own (a GAN) names its work
    for handle in handles:
        handle.remove()
    for name, p in model.named_parameters():
        p.requires_grad_(wanted[name])
    rows = [
        (name, sum(p.numel() for p in child.parameters()), shapes.get(name, "-"), int(flops.get(name, 0)))
        for name, child in model.named_children()
    ]
    return sum(p.numel() for p in model.parameters()), int(counter.get_total_flops()), rows


def cpu_profile(model: nn.Module, in_chans: int, image_size: int, runs: int) -> dict:
    """Parameters, FLOPs (one image) and CPU latency per image: the median of ``runs`` timed batch-1 forward passes
    on LATENCY_THREADS threads, after LATENCY_WARMUP untimed ones."""
    model = copy.deepcopy(model).cpu()
    params, flops, _ = describe_model(model, in_chans, image_size)  # leaves the copy in eval mode
    image = torch.zeros(1, in_chans, image_size, image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.inference_mode():
            for _ in range(LATENCY_WARMUP):
                model(image)
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                model(image)
                timings.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {"params": params, "flops": flops, "cpu_latency_ms": statistics.median(timings) * 1e3}
