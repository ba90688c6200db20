"""Training-step speed of every cvlab classification model against its torchvision reference.

For each model the script builds, in the same process and without pretrained weights, the cvlab model and its
reference with the same number of classes (1000) and the paper's standard stem at the benchmark size, then times one
training step: ``cross_entropy(model(x), y).backward()`` on one random batch (forward and backward; gradients are
cleared before each step, outside the timer). Both models run in training mode, so BatchNorm uses batch statistics
and ``nn.MultiheadAttention`` (torchvision's ViT) takes its ordinary path, not its inference fast path.

References:

* the torchvision model of the same architecture: ResNet / ResNeXt, MobileNetV2 / V3, and ``vit_b_16`` for
  ``vit_base``;
* ``vit_tiny`` / ``vit_small``: torchvision's ``VisionTransformer`` class at DeiT's widths (192 / 384, 3 / 6 heads;
  torchvision ships only the base and larger configurations, with the same class);
* ``mobilenetv1``, ``darknet19``, ``darknet53``: none (torchvision has no such model and timm is not a cvlab
  dependency); they are timed alone, to show their cost.

Each pair's parameter counts are compared too: equal counts show that the same architecture is timed.

Measurement: ``torch.set_num_threads(--threads)``; ``--warmup`` untimed steps of each model; then ``--repeats``
rounds that time one step of each model, interleaved and alternating which goes first (A B, B A, A B, ...), so slow
drifts of the machine (other processes, frequency) hit both alike. The medians are compared: ratio = cvlab /
reference in wall-clock time, and the issue asks for at most 1.05 per model. The ratio of process CPU times is shown
beside it: on a shared machine it is less disturbed by other processes (run with ``--threads 1`` for the cleanest
CPU times; with more threads it also counts threads spinning while they wait), and so is the median of the
per-round ratios (each round's two steps run back to back).

``--size`` defaults to 64 px: on a two-core CPU a 224 px step of the largest models takes several seconds, and all
16 pairs with warm-up and repeats take 15-20 minutes on a quiet machine (64 px: under 2 minutes), much longer on a
busy one. Every model keeps the paper's standard stem at 64 px
(cvlab's small-image stem is turned off), so the layers are those of the 224 px network on a smaller map; where it
matters, the ratio at 224 px is worth a second run on a few models (``--size 224 --models resnet18 resnet50 ...``).
ViTs use 16×16 patches at any size (4×4 tokens at 64 px), and the size must be a multiple of 16.

Hand-written: no library benchmarks one model implementation against another.

    python scripts/bench_models.py --size 64 --batch 8 --repeats 10 --threads 2 --json bench_models.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.nn import functional as F

from cvlab.models import create_model, list_models
from cvlab.utils.console import console

RATIO_LIMIT = 1.05  # the issue: a cvlab model may take at most 5% longer than its reference
NUM_CLASSES = 1000
PATCH_SIZE = 16  # ViT-*/16, the paper's patch size


@dataclass(frozen=True)
class Reference:
    """A reference architecture: its label in the table and a builder taking the input size."""

    label: str
    build: Callable[[int], nn.Module]


def _torchvision(name: str) -> Reference:
    return Reference(name, lambda size: torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES))


def _torchvision_vit(hidden_dim: int, num_heads: int) -> Reference:
    """torchvision's ViT class at a width it ships no entry point for (12 layers, MLP 4× wide, 16 px patches)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return Reference(
        f"VisionTransformer({hidden_dim}, {num_heads}h)",
        lambda size: VisionTransformer(image_size=size, patch_size=PATCH_SIZE, num_layers=12, num_heads=num_heads,
                                       hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=NUM_CLASSES),
    )


REFERENCES: dict[str, Reference] = {
    **{name: _torchvision(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                               "resnext50_32x4d", "resnext101_32x8d")},
    "mobilenetv2": _torchvision("mobilenet_v2"),
    "mobilenetv3_small": _torchvision("mobilenet_v3_small"),
    "mobilenetv3_large": _torchvision("mobilenet_v3_large"),
    "vit_tiny": _torchvision_vit(192, 3),
    "vit_small": _torchvision_vit(384, 6),
    "vit_base": Reference("vit_b_16", lambda size: torchvision.models.vit_b_16(
        weights=None, image_size=size, num_classes=NUM_CLASSES)),
}


def build_cvlab(name: str, size: int) -> nn.Module:
    """The cvlab model with the paper's stem at ``size`` px (never the small-image stem)."""
    if name.startswith("vit"):
        kwargs = dict(image_size=size, patch_size=PATCH_SIZE)
    else:
        kwargs = dict(image_size=size, stem="standard")
    return create_model(name, num_classes=NUM_CLASSES, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Wall and process CPU seconds of one forward + backward pass; gradients are cleared first, outside the timer.

    CPU time is less disturbed by other processes on a shared machine (it still counts the spinning of waiting
    threads, so it is cleanest with ``--threads 1``)."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    F.cross_entropy(model(images), labels).backward()
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Samples:
    """Wall and CPU seconds of every timed step of one model."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall_cpu: tuple[float, float]) -> None:
        self.wall.append(wall_cpu[0])
        self.cpu.append(wall_cpu[1])

    def medians_ms(self) -> tuple[float, float]:
        return statistics.median(self.wall) * 1e3, statistics.median(self.cpu) * 1e3

    def as_dict(self) -> dict:
        wall, cpu = self.medians_ms()
        return dict(median_ms=wall, median_cpu_ms=cpu, wall_ms=[round(t * 1e3, 3) for t in self.wall],
                    cpu_ms=[round(t * 1e3, 3) for t in self.cpu])


@dataclass
class Result:
    """One model's timings beside its reference's (``reference`` None: no reference architecture)."""

    model: str
    params: int
    cvlab: Samples
    reference: str | None = None
    reference_params: int | None = None
    reference_samples: Samples | None = None

    def ratios(self) -> tuple[float, float, float] | None:
        """cvlab / reference: (wall medians, CPU medians, median of the per-round wall ratios).

        The last pairs the two steps of each round, which ran back to back: a burst of other work on the machine
        then slows both alike, so it is steadier on a busy machine than the ratio of medians (the issue's figure).
        """
        if self.reference_samples is None:
            return None
        (wall, cpu), (ref_wall, ref_cpu) = self.cvlab.medians_ms(), self.reference_samples.medians_ms()
        paired = statistics.median(a / b for a, b in zip(self.cvlab.wall, self.reference_samples.wall))
        return wall / ref_wall, cpu / ref_cpu, paired

    def within_limit(self) -> bool | None:
        ratios = self.ratios()
        return None if ratios is None else ratios[0] <= RATIO_LIMIT

    def as_dict(self) -> dict:
        ratios = self.ratios()
        return dict(model=self.model, params=self.params, cvlab=self.cvlab.as_dict(), reference=self.reference,
                    reference_params=self.reference_params,
                    reference_timing=self.reference_samples and self.reference_samples.as_dict(),
                    ratio=ratios and ratios[0], cpu_ratio=ratios and ratios[1], paired_ratio=ratios and ratios[2],
                    within_limit=self.within_limit())


def benchmark_model(name: str, size: int, batch: int, warmup: int, repeats: int, seed: int = 0) -> Result:
    """Builds the cvlab model and its reference (if any) and times them interleaved; see the module docstring."""
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    models = {"cvlab": build_cvlab(name, size).train()}
    samples = {"cvlab": Samples()}
    reference = REFERENCES.get(name)
    if reference is not None:
        models["reference"] = reference.build(size).train()
        samples["reference"] = Samples()
    order = list(models)
    for _ in range(warmup):
        for leg in order:
            time_step(models[leg], images, labels)
    for _ in range(repeats):
        for leg in order:
            samples[leg].add(time_step(models[leg], images, labels))
        order.reverse()  # A B, B A, ...: neither model is always the one that runs first
    if reference is None:
        return Result(name, count_params(models["cvlab"]), samples["cvlab"])
    return Result(name, count_params(models["cvlab"]), samples["cvlab"], reference.label,
                  count_params(models["reference"]), samples["reference"])


def print_table(results: list[Result], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    columns = ("model", "torchvision reference", "params", "cvlab ms", "ref ms", "ratio", "cpu ratio",
               "paired ratio", f"≤ {RATIO_LIMIT}")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:2] else "right", no_wrap=True)
    for r in results:
        wall, _ = r.cvlab.medians_ms()
        params = f"{r.params:,}"
        if r.reference_params is not None and r.reference_params != r.params:
            params += f" [red](ref {r.reference_params:,})"
        ratios = r.ratios()
        if ratios is None:
            table.add_row(r.model, "no reference", params, f"{wall:.1f}", "-", "-", "-", "-", "-")
            continue
        ref_wall, _ = r.reference_samples.medians_ms()
        verdict = "[green]yes" if r.within_limit() else "[red]NO"
        table.add_row(r.model, r.reference, params, f"{wall:.1f}", f"{ref_wall:.1f}", f"{ratios[0]:.3f}",
                      f"{ratios[1]:.3f}", f"{ratios[2]:.3f}", verdict)
    # Piped output gets rich's default 80 columns, too narrow for the table: widen it unless COLUMNS says otherwise.
    wide = console if console.is_terminal or "COLUMNS" in os.environ else Console(width=140)
    wide.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="cvlab model names (default: every registered classification model)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--size", type=int, default=64,
                        help="input size in px, a multiple of 16; 64 keeps a two-core CPU run short (see the notes "
                             "at the top of this file), 224 is the papers' size")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each model; medians are compared")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write every sample and the summary here")
    args = parser.parse_args(argv)
    if min(args.batch, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --threads must be at least 1, --warmup at least 0")
    if args.size < PATCH_SIZE or args.size % PATCH_SIZE:
        parser.error(f"--size must be a multiple of {PATCH_SIZE} (the ViT patch size)")
    known = list_models("classification")
    unknown = sorted(set(args.models or ()) - set(known))
    if unknown:
        parser.error(f"not classification models: {', '.join(unknown)} (choose from {', '.join(known)})")
    args.models = args.models or known
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for name in args.models:
        console.print(f"timing {name} ...", style="dim")
        results.append(benchmark_model(name, args.size, args.batch, args.warmup, args.repeats))
    load_after = os.getloadavg()
    print_table(results, f"forward + backward, batch {args.batch} at {args.size} px, {NUM_CLASSES} classes, "
                         f"median of {args.repeats} (after {args.warmup} warm-up), {args.threads} thread(s); "
                         f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    over = [r.model for r in results if r.within_limit() is False]
    if over:
        console.print(f"[red]over the {RATIO_LIMIT} limit:[/] {', '.join(over)}")
    if args.json:
        summary = dict(args=vars(args), ratio_limit=RATIO_LIMIT, torch=torch.__version__,
                       torchvision=torchvision.__version__, cpu_count=os.cpu_count(),
                       load_average_before=load_before, load_average_after=load_after,
                       results=[r.as_dict() for r in results])
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
