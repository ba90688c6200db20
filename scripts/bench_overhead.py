"""What cvlab's training path costs over a hand-written PyTorch loop doing the same work.

Both legs train the same model on the same data from the same seed with the same optimizer:

* **cvlab**: the ``train`` config composed in-process and run through ``cvlab.engine.run_train`` (the path
  ``cvlab train`` takes), with a small callback that records the loss of every optimizer step and the weights the
  fit starts from. The leg the issue's ratio is taken on ("cvlab lean") turns off what a benchmark does not need:
  every callback (checkpoints, results.csv, RNG state, lr monitor, progress bar), the logger, the progress bar and
  checkpointing. What the task itself does per batch stays and counts as cvlab's overhead: ``self.log`` calls, the
  training accuracy, and validation accuracy, macro-F1 and confusion matrix. A second leg ("cvlab defaults") keeps
  ``callbacks=default`` and ``logger=tensorboard``, as ``cvlab train`` runs (its progress bar draws into a discarded
  stdout, which is not a terminal, so rich prints no live frames).
* **plain**: ``pl.seed_everything`` then the same datamodule and ``build_model`` call in the same order as
  ``run_train`` (so the initial weights come out identical, which is checked), a fresh ``torch.utils.data.DataLoader``
  over the datamodule's own train dataset and epoch-seeded sampler (same batch size, same ``drop_last``,
  ``set_epoch(epoch)`` each epoch), the optimizer built from the same config group, ``nn.CrossEntropyLoss`` and
  ``zero_grad / backward / step``. Lightning validates before training (``num_sanity_val_steps`` batches) and after
  every epoch, so the plain loop does the same passes (``model.eval()``, ``torch.inference_mode()``, loss and
  accuracy) to keep the compared work equal.

Timing: wall-clock (``time.perf_counter``) and process CPU time (``time.process_time``, less disturbed by other work
on a shared machine) over the fit: for cvlab from Lightning's ``setup`` hook to its ``teardown`` hook, i.e. all of
``trainer.fit`` (cvlab's own ``train_time_s`` brackets the same call), for the plain loop from the weight snapshot and
optimizer creation to the last validation pass. Imports, composing the config, loading the data and building the
model are outside both, as is what ``run_train`` does after the fit (validating the best checkpoint, plots). The
scheduler is fixed to ``none`` (constant learning rate) so the plain loop needs none; the optimizer is any config
group (default ``momentum``: SGD, lr 0.1, momentum 0.9, weight decay 5e-4). After one untimed warm-up of each leg,
every repeat runs the three legs in a rotated order, and the medians are compared.

Hand-written: no library compares a Lightning run with its hand-written equivalent.

    python scripts/bench_overhead.py --model resnet18 --data digits --epochs 2 --steps 10 --repeats 6 --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from cvlab.engine import build_datamodule, run_train, to_plain
from cvlab.tasks.base import build_model
from cvlab.utils.config import compose
from cvlab.utils.console import console

COMPARED_STEPS = 20  # the issue: the first 20 step losses must agree ...
LOSS_TOLERANCE = 1e-5  # ... to this absolute difference
RATIO_LIMIT = 1.10  # cvlab's fit may take at most 10% longer than the plain loop

# Everything that is not the training itself: no callbacks, no logger, no progress bar, no checkpoint files.
# ("++" sets a trainer key whether or not the trainer group already has it.)
LEAN_OVERRIDES = ["~callbacks", "logger=none", "++trainer.enable_progress_bar=false",
                  "++trainer.enable_checkpointing=false"]
DEFAULT_OVERRIDES = ["callbacks=default", "logger=tensorboard"]
LEGS = ("cvlab lean", "plain", "cvlab defaults")


@dataclass
class LegRun:
    """One timed run of a leg: its wall and CPU time, the loss of every optimizer step and the starting weights."""

    leg: str
    wall_s: float
    cpu_s: float
    losses: list[float]
    initial_state: dict[str, torch.Tensor] = field(repr=False)
    threads: int


class Stopwatch:
    """Wall-clock and process CPU time since ``start()``; CPU time is less disturbed by other work on the machine."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every parameter and buffer; inf when the two do not hold the same tensors."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def max_loss_difference(a: list[float], b: list[float], steps: int = COMPARED_STEPS) -> float:
    """Largest absolute difference over the first ``steps`` losses; inf when either run has fewer."""
    if min(len(a), len(b)) < steps:
        return float("inf")
    return max(abs(x - y) for x, y in zip(a[:steps], b[:steps]))


def train_overrides(model: str, data: str, optimizer: str, epochs: int, steps: int | None,
                    val_steps: int | None, extra: Sequence[str] = ()) -> list[str]:
    """The overrides both legs share: model, data, optimizer, constant lr, epochs and batch limits (0 or None: all)."""
    limits = [f"trainer.limit_train_batches={steps}"] if steps else []
    limits += [f"trainer.limit_val_batches={val_steps}"] if val_steps else []
    return [f"model={model}", f"data={data}", f"optimizer={optimizer}", "scheduler=none",
            f"trainer.max_epochs={epochs}", *limits, *extra]


class StepLossRecorder(pl.Callback):
    """Keeps the training loss of every optimizer step, the weights (and thread count) the fit starts with, and the
    time from Lightning's first fit hook (``setup``) to its last (``teardown``): all of ``trainer.fit`` but its
    argument checks."""

    def __init__(self):
        self.losses: list[float] = []
        self.initial_state: dict[str, torch.Tensor] = {}
        self.threads = 0
        self.stopwatch = Stopwatch()
        self.fit_time = (0.0, 0.0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.stopwatch.start()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # run_train scores the best checkpoint on val and test afterwards: not part of the fit
            self.fit_time = self.stopwatch.read()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_state = snapshot(pl_module.model)
        self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def run_cvlab(overrides: list[str], leg: str = "cvlab lean") -> LegRun:
    """Composes the train config with ``overrides`` (plus a temporary output directory) and runs ``run_train``."""
    recorder = StepLossRecorder()
    with tempfile.TemporaryDirectory(prefix="cvlab-bench-") as out_dir:
        cfg = compose("train", [*overrides, f"paths.output_dir={out_dir}"])
        run_train(cfg, extra_callbacks=[recorder])
    return LegRun(leg, *recorder.fit_time, recorder.losses, recorder.initial_state, recorder.threads)


def _device(cfg) -> torch.device:
    """The device Lightning's ``accelerator`` setting picks."""
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def batch_limit(limit: int | float | None, loader: DataLoader) -> int:
    """Batches per pass under a Lightning ``limit_*_batches`` value (a count, a fraction, or None for all)."""
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return len(loader)
    return min(int(limit * len(loader)) if isinstance(limit, float) else int(limit), len(loader))


def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, batches: int,
             device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over the first ``batches`` batches, as Lightning's validation loop sees them."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in itertools.islice(loader, batches):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += float(criterion(logits, labels)) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def run_plain(overrides: list[str]) -> LegRun:
    """The hand-written loop: the same seed, weights, batches, optimizer and validation passes as ``run_cvlab``."""
    cfg = compose("train", [*overrides, f"paths.output_dir={tempfile.gettempdir()}"])  # nothing is written there
    if (to_plain(cfg.scheduler) or {}).get("scheduler"):
        raise ValueError("the plain loop keeps a constant learning rate; compose with scheduler=none")
    # run_train's order: seed, datamodule, model; nothing between draws from the global RNG.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    info = datamodule.info
    model = build_model(to_plain(cfg.model), to_plain(cfg.norm), to_plain(cfg.activation), to_plain(cfg.attention),
                        to_plain(cfg.init), num_classes=info.num_classes, in_chans=info.in_chans,
                        image_size=info.image_size)
    # cvlab's loaders give the datasets, sampler, batch size and drop_last; the loop iterates loaders of its own.
    cvlab_loader, cvlab_val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    sampler = cvlab_loader.sampler
    device = _device(cfg)
    trainer_cfg = cfg.trainer

    stopwatch = Stopwatch()
    stopwatch.start()
    initial_state = snapshot(model)
    model.to(device)
    optimizer_cfg = to_plain(cfg.optimizer)
    optimizer_class = getattr(torch.optim, optimizer_cfg.pop("_target_").rsplit(".", 1)[1])
    optimizer_cfg.pop("_partial_", None)
    optimizer = optimizer_class(model.parameters(), **optimizer_cfg)
    criterion = nn.CrossEntropyLoss()
    pin = device.type == "cuda"
    # Seeded generators, as the datamodule's loaders have: starting an epoch then never draws from the global RNG
    # (which augmentations use).
    train_loader = DataLoader(cvlab_loader.dataset, batch_size=cvlab_loader.batch_size, sampler=sampler,
                              drop_last=cvlab_loader.drop_last, pin_memory=pin, generator=cvlab_loader.generator)
    val_loader = DataLoader(cvlab_val_loader.dataset, batch_size=cvlab_val_loader.batch_size, pin_memory=pin,
                            generator=torch.Generator().manual_seed(cfg.seed))
    train_batches = batch_limit(trainer_cfg.limit_train_batches, train_loader)
    val_batches = batch_limit(trainer_cfg.limit_val_batches, val_loader)
    sanity = trainer_cfg.num_sanity_val_steps
    losses = []
    validate(model, val_loader, criterion, val_batches if sanity == -1 else min(sanity, val_batches), device)
    for epoch in range(trainer_cfg.max_epochs):
        sampler.set_epoch(epoch)
        model.train()
        # islice stops without drawing a batch past the limit, as Lightning does: an extra batch would advance the
        # global RNG through its augmentations and shift every later epoch.
        for images, labels in itertools.islice(train_loader, train_batches):
            images, labels = images.to(device, non_blocking=pin), labels.to(device, non_blocking=pin)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        validate(model, val_loader, criterion, val_batches, device)
    return LegRun("plain", *stopwatch.read(), losses, initial_state, torch.get_num_threads())


def run_leg(leg: str, overrides: list[str]) -> LegRun:
    if leg == "plain":
        return run_plain(overrides)
    with open(os.devnull, "w") as discard, contextlib.redirect_stdout(discard):
        return run_cvlab([*overrides, *(LEAN_OVERRIDES if leg == "cvlab lean" else DEFAULT_OVERRIDES)], leg)


def benchmark(overrides: list[str], repeats: int, warmup_overrides: list[str] | None = None) -> dict[str, list[LegRun]]:
    """Runs every leg ``repeats`` times after one untimed warm-up of each; each repeat rotates the order of the legs,
    so over a multiple of three repeats every leg runs equally often first, second and third."""
    if warmup_overrides is not None:
        for leg in LEGS:
            run_leg(leg, warmup_overrides)
    runs: dict[str, list[LegRun]] = {leg: [] for leg in LEGS}
    for repeat in range(repeats):
        shift = repeat % len(LEGS)
        for leg in LEGS[shift:] + LEGS[:shift]:
            runs[leg].append(run_leg(leg, overrides))
    return runs


def summarise(runs: dict[str, list[LegRun]], steps: int = COMPARED_STEPS) -> dict:
    """Medians, ratios to the plain loop, and how every run's losses and initial weights agree with the first plain
    run's."""
    reference = runs["plain"][0]
    plain_wall = statistics.median(r.wall_s for r in runs["plain"])
    plain_cpu = statistics.median(r.cpu_s for r in runs["plain"])
    legs = {}
    for leg, leg_runs in runs.items():
        wall, cpu = statistics.median(r.wall_s for r in leg_runs), statistics.median(r.cpu_s for r in leg_runs)
        legs[leg] = {
            "median_s": wall,
            "walls_s": [round(r.wall_s, 4) for r in leg_runs],
            "ratio_to_plain": wall / plain_wall,
            "median_cpu_s": cpu,
            "cpus_s": [round(r.cpu_s, 4) for r in leg_runs],
            "cpu_ratio_to_plain": cpu / plain_cpu,
            "steps": len(leg_runs[0].losses),
            "threads": leg_runs[0].threads,
            "max_loss_diff": max(max_loss_difference(r.losses, reference.losses, steps) for r in leg_runs),
            "max_loss_diff_all_steps": max(max_loss_difference(r.losses, reference.losses, len(reference.losses))
                                           for r in leg_runs),
            "max_initial_weight_diff": max(max_weight_difference(r.initial_state, reference.initial_state)
                                           for r in leg_runs),
        }
    return {"compared_steps": steps, "loss_tolerance": LOSS_TOLERANCE, "ratio_limit": RATIO_LIMIT,
            "first_losses": reference.losses[:steps], "legs": legs}


def print_summary(summary: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("leg", "wall s", "range", "×plain", "cpu s", "×plain", "Δloss", "Δw0"):
        table.add_column(column, justify="left" if column == "leg" else "right", no_wrap=column == "leg")
    for leg, row in summary["legs"].items():
        table.add_row(leg, f"{row['median_s']:.2f}", f"{min(row['walls_s']):.1f}-{max(row['walls_s']):.1f}",
                      f"{row['ratio_to_plain']:.3f}", f"{row['median_cpu_s']:.2f}", f"{row['cpu_ratio_to_plain']:.3f}",
                      f"{row['max_loss_diff']:.0e}", f"{row['max_initial_weight_diff']:.0e}")
    console.print(table)
    for ok, text in checks(summary):
        console.print(f"{'[green]pass' if ok else '[red]FAIL'}[/] {text}", highlight=False)


def checks(summary: dict) -> list[tuple[bool, str]]:
    """The issue's three conditions, each with its one-line description."""
    legs = summary["legs"]
    weight_diff = max(row["max_initial_weight_diff"] for row in legs.values())
    loss_diff = max(row["max_loss_diff"] for row in legs.values())
    ratio = legs["cvlab lean"]["ratio_to_plain"]
    return [
        (weight_diff == 0, f"initial weights identical in every run (max |Δw0| = {weight_diff:.1e})"),
        (loss_diff <= LOSS_TOLERANCE, f"first {summary['compared_steps']} losses of every run agree with the plain "
                                      f"loop's: max |Δloss| = {loss_diff:.1e} (limit {LOSS_TOLERANCE:g})"),
        (ratio <= RATIO_LIMIT, f"cvlab lean / plain wall time = {ratio:.3f} (limit {RATIO_LIMIT})"),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="model config (conf/model/<name>.yaml)")
    parser.add_argument("--data", default="digits", help="data config (conf/data/<name>.yaml)")
    parser.add_argument("--optimizer", default="momentum", help="optimizer config; the scheduler is always none")
    parser.add_argument("--epochs", type=int, default=2, help="trainer.max_epochs")
    parser.add_argument("--steps", type=int, default=10, help="training batches per epoch, 0 for all")
    parser.add_argument("--val-steps", type=int, default=0, help="validation batches per pass, 0 for all")
    parser.add_argument("--repeats", type=int, default=6, help="timed runs of each leg; medians are compared")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads; use 1 on a busy machine, where two threads wait on each other")
    parser.add_argument("--compare-steps", type=int, default=COMPARED_STEPS, help="leading step losses compared")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each leg")
    parser.add_argument("--json", metavar="PATH", help="also write the summary here")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both legs, e.g. data.batch_size=32")
    args = parser.parse_args(argv)
    if min(args.epochs, args.repeats, args.threads, args.compare_steps) < 1:
        parser.error("--epochs, --repeats, --threads and --compare-steps must be at least 1")
    if args.steps and args.steps * args.epochs < args.compare_steps:
        parser.error(f"--steps x --epochs = {args.steps * args.epochs} steps, fewer than --compare-steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning")  # "few workers" advice and the like
    overrides = train_overrides(args.model, args.data, args.optimizer, args.epochs, args.steps, args.val_steps,
                                args.overrides)
    warmup = None if args.no_warmup else train_overrides(args.model, args.data, args.optimizer, 1, 2, 2,
                                                         args.overrides)
    load_before = os.getloadavg()
    console.quiet = True  # run_train's config tree and metric tables
    try:
        runs = benchmark(overrides, args.repeats, warmup)
    finally:
        console.quiet = False
    summary = summarise(runs, args.compare_steps)
    summary.update(args=vars(args), overrides=overrides, torch=torch.__version__, lightning=pl.__version__,
                   load_average_before=load_before, load_average_after=os.getloadavg(), cpu_count=os.cpu_count())
    steps = summary["legs"]["plain"]["steps"]
    print_summary(summary, f"{args.model} on {args.data}: {steps} steps in {args.epochs} epoch(s), {args.repeats} "
                           f"repeat(s), {args.threads} thread(s); load average {load_before[0]:.2f} -> "
                           f"{summary['load_average_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return 0 if all(ok for ok, _ in checks(summary)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
