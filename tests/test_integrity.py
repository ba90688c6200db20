"""Never lose or corrupt results: unique run directories, atomic checkpoints, resumes that keep their history,
best.ckpt always the best, and a stop on a non-finite loss (issue 10)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CVLAB, FAST
from cvlab.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint, remove_stale_temporaries, write_atomically
from cvlab.callbacks.finite import NON_FINITE_EXIT_CODE, NonFiniteError, StopOnNonFiniteLoss
from cvlab.engine import build_trainer, run_train, write_json
from cvlab.utils.config import compose
from cvlab.utils.errors import UserError
from cvlab.utils.rundirs import claim_dir


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def non_finite(state_dict: dict) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in state_dict.values() if t.is_floating_point())


def checkpoint_state(ckpt: dict, monitor: str | None) -> dict:
    """The saved state of the ModelCheckpoint callback that monitors ``monitor``."""
    (state,) = [s for key, s in ckpt["callbacks"].items() if "Checkpoint" in key and s["monitor"] == monitor]
    return state


def cli_env(root: Path) -> dict:
    return {**os.environ, "CVLAB_RUNS": str(root / "runs"), "COLUMNS": "200"}


# ------------------------------------------------------------------------------------------ unique run directories
def test_claim_dir_gives_every_caller_its_own_directory(tmp_path):
    wanted = tmp_path / "runs" / "20250101-120000"
    with_threads: list[Path] = []
    threads = [threading.Thread(target=lambda: with_threads.append(claim_dir(wanted))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in with_threads) == sorted(
        ["20250101-120000"] + [f"20250101-120000-{n}" for n in range(1, 8)])
    assert all(p.is_dir() for p in with_threads)


def hydra_node(tmp_path: Path, overrides=(), resume=None):
    """The part of a composed config ClaimRunDir reads."""
    return OmegaConf.create({"resume": resume, "hydra": {
        "run": {"dir": str(tmp_path / "runs" / "20250101-120000")}, "output_subdir": ".hydra",
        "sweep": {"dir": str(tmp_path / "it's a sweep, 1"), "subdir": "0"}, "overrides": {"hydra": list(overrides)}}})


def test_claim_run_dir_claims_hydra_run_dir_unless_given_or_resumed(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cvlab.callbacks.rundir import ClaimRunDir

    first, second = hydra_node(tmp_path), hydra_node(tmp_path)
    ClaimRunDir().on_run_start(first)
    ClaimRunDir().on_run_start(second)
    assert [Path(c.hydra.run.dir).name for c in (first, second)] == ["20250101-120000", "20250101-120000-1"]
    given = hydra_node(tmp_path, overrides=[f"hydra.run.dir={tmp_path / 'mine'}"])
    ClaimRunDir().on_run_start(given)
    assert given.hydra.run.dir == str(tmp_path / "runs" / "20250101-120000") and not (tmp_path / "mine").exists()
    run = Path(first.hydra.run.dir)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_epochs=2\n")
    missing = hydra_node(tmp_path, resume=str(run / "weights" / "last.ckpt"))
    ClaimRunDir().on_run_start(missing)  # no such checkpoint: a new directory (the run then says it is missing)
    assert Path(missing.hydra.run.dir).name == "20250101-120000-2"
    (run / "weights").mkdir()
    (run / "weights" / "last.ckpt").touch()
    resumed = hydra_node(tmp_path, resume=str(run / "weights" / "last.ckpt"))
    ClaimRunDir().on_run_start(resumed)
    assert resumed.hydra.run.dir == str(run)
    assert (run / ".hydra" / "before-resume" / "overrides.yaml").read_text() == "- trainer.max_epochs=2\n"
    # A sweep's jobs are composed again from its overrides: the claimed directory travels as one.
    sweeps = [hydra_node(tmp_path), hydra_node(tmp_path)]
    for sweep in sweeps:
        ClaimRunDir().on_multirun_start(sweep)
    assert [Path(s.hydra.sweep.dir).name for s in sweeps] == ["it's a sweep, 1", "it's a sweep, 1-1"]
    (override,) = OverridesParser.create().parse_overrides(list(sweeps[1].hydra.overrides.hydra))
    assert (override.key_or_group, override.value()) == ("hydra.sweep.dir", sweeps[1].hydra.sweep.dir)


@pytest.mark.slow  # whole CLI runs in subprocesses (make test-slow); kept out of make test's 10 minutes
def test_two_train_runs_started_together_never_share_a_directory(tmp_path):
    # Every second-stamped name of the next two minutes is already taken (as by runs started in those seconds),
    # and the two runs start at once: each must claim a directory of its own and put everything in it.
    models = tmp_path / "runs" / "classification" / "resnet18"
    start = datetime.now()
    taken = {(start + timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S") for s in range(-2, 120)}
    for name in taken:
        (models / name).mkdir(parents=True)
        (models / name / "other-run").touch()
    runs = [subprocess.Popen([*CVLAB, "train", *FAST, f"seed={seed}"], cwd=tmp_path, env=cli_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-2000:]
    assert all(sorted(p.name for p in (models / name).iterdir()) == ["other-run"] for name in taken)
    new = sorted(p for p in models.iterdir() if p.name not in taken)
    assert len(new) == 2 and all(p.name.rpartition("-")[0] in taken for p in new)
    printed = [Path(re.search(r"run directory \(start\): (\S+)", " ".join(out.split()))[1]) for out, _ in outputs]
    assert sorted(printed) == new
    for run_dir, seed in zip(printed, (1, 2)):
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed == seed
        assert load(run_dir / "weights" / "best.ckpt")["hyper_parameters"]["data"]["seed"] == seed
        assert load(run_dir / "weights" / "last.ckpt")["hyper_parameters"]["data"]["seed"] == seed
        assert json.loads((run_dir / "metrics.json").read_text())["best_ckpt"] == str(run_dir / "weights" / "best.ckpt")
        assert [int(r["epoch"]) for r in read_csv(run_dir / "results.csv")] == [0]


# ------------------------------------------------------------------------------------------ atomic checkpoints
# For each moment, a forked child saves a small checkpoint, then a big one, with the checkpoint writer cvlab's
# trainer uses, while a watchdog thread kills the child (SIGKILL) the moment the target file is seen in a state that
# is neither complete checkpoint ("target"), or a temporary file anywhere reaches half the big one's size
# ("temporary"). Prints each child's exit status.
KILL_DURING_SAVE = r"""
import importlib, io, os, signal, sys, threading, torch
module, _, name = sys.argv[1].rpartition(".")
writer = getattr(importlib.import_module(module), name)()
system_tmp, runs = sys.argv[2], sys.argv[3:]
small, big = {"w": torch.zeros(1000)}, {"w": torch.ones(4_000_000)}
sizes = []
for checkpoint in (small, big):
    buffer = io.BytesIO(); torch.save(checkpoint, buffer); sizes.append(len(buffer.getvalue()))

def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1

def watch(moment, target, folders):
    while True:
        if moment == "target" and size(target) not in sizes:
            os.kill(os.getpid(), signal.SIGKILL)
        for folder in folders:
            for entry in os.listdir(folder):
                path = os.path.join(folder, entry)
                if moment == "temporary" and path != target and size(path) > sizes[1] // 2:
                    os.kill(os.getpid(), signal.SIGKILL)

for run in runs:
    moment, weights = run.split("=", 1)
    target = os.path.join(weights, "last.ckpt")
    child = os.fork()
    if child == 0:
        writer.save_checkpoint(small, target)
        threading.Thread(target=watch, args=(moment, target, [weights, system_tmp]), daemon=True).start()
        writer.save_checkpoint(big, target)
        os._exit(0)
    print(moment, os.waitpid(child, 0)[1], flush=True)
"""
MOMENTS = ("target", "temporary")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, train_cfg):
    # The system temporary folder lies on another filesystem than the run: staging a checkpoint there and moving
    # it over (Lightning's writer) becomes a copy, which a kill truncates.
    system_tmp = Path("/dev/shm") / f"cvlab-test-{os.getpid()}-{time.time_ns()}"
    if not system_tmp.parent.is_dir() or system_tmp.parent.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a temporary folder on another filesystem than the run directory")
    writer = type(build_trainer(train_cfg(out=tmp_path / "run")).strategy.checkpoint_io)
    folders = {moment: tmp_path / moment / "weights" for moment in MOMENTS}
    for folder in [system_tmp, *folders.values()]:
        folder.mkdir(parents=True)
    try:
        result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, f"{writer.__module__}.{writer.__qualname__}",
                                 str(system_tmp), *(f"{moment}={folders[moment]}" for moment in MOMENTS)],
                                env={**os.environ, "TMPDIR": str(system_tmp)}, capture_output=True, text=True,
                                timeout=120)
        staged = [p for p in system_tmp.iterdir() if p.is_file()]  # (torch may put a cache folder there)
    finally:
        shutil.rmtree(system_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    killed = {moment: int(status) == 9 for moment, status in map(str.split, result.stdout.splitlines())}
    assert killed["temporary"]  # halfway through writing the big checkpoint
    assert not staged  # nothing was staged outside the run directory
    for moment, weights in folders.items():
        target = weights / "last.ckpt"
        saved = load(target)["w"]  # loadable: the small checkpoint or the big one, whole
        assert saved.shape == ((1000,) if killed[moment] else (4_000_000,)), moment
        leftovers = [p for p in weights.iterdir() if p != target]
        assert remove_stale_temporaries(weights) == leftovers  # what the next run in this directory removes
        assert list(weights.iterdir()) == [target]


def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temporary(tmp_path):
    target = tmp_path / "weights" / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, target)

    def half_then_disk_full(file):
        file.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, half_then_disk_full)
    assert torch.equal(load(target)["w"], torch.zeros(3))
    assert list(target.parent.iterdir()) == [target]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ resume
# Constant lr (the plan does not depend on max_epochs, so 2 + 2 epochs equal 4). Without warm-up this run's val/acc
# is best in epoch 0 (0.344, then 0.219, 0.219, 0.125): a resumed run that forgot it would report a later epoch.
RESUME = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "scheduler=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 4-epoch run without interruption: (run dir, metrics.json, results.csv rows)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(compose("train", [*FAST, *RESUME, "trainer.max_epochs=4", f"paths.output_dir={out}"]))
    return out, json.loads((out / "metrics.json").read_text()), read_csv(out / "results.csv")


def assert_same_run(run_dir: Path, uninterrupted) -> None:
    """``run_dir`` has the uninterrupted run's four epochs, its best epoch and score, and its final metrics."""
    full_dir, full_metrics, full_rows = uninterrupted
    rows = read_csv(run_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["val/acc"]) for r in rows] == pytest.approx([float(r["val/acc"]) for r in full_rows], abs=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert metrics[key] == pytest.approx(full_metrics[key], abs=1e-5), key
    assert metrics["best_ckpt"] == str(run_dir / "weights" / "best.ckpt")
    best, full_best = load(run_dir / "weights" / "best.ckpt"), load(full_dir / "weights" / "best.ckpt")
    assert best["epoch"] == full_best["epoch"] < 2  # the best epoch is one from before the interruption
    state = checkpoint_state(load(run_dir / "weights" / "last.ckpt"), "val/acc")
    assert state["dirpath"] == str(run_dir / "weights")
    assert state["best_model_path"] == str(run_dir / "weights" / "best.ckpt")
    assert float(state["best_model_score"]) == pytest.approx(max(float(r["val/acc"]) for r in full_rows), abs=1e-6)


def test_the_uninterrupted_best_checkpoint_is_the_best_epoch(uninterrupted):
    full_dir, full_metrics, rows = uninterrupted
    scores = [float(r["val/acc"]) for r in rows]
    best = load(full_dir / "weights" / "best.ckpt")
    assert best["epoch"] == scores.index(max(scores))
    assert full_metrics["val/acc"] == pytest.approx(max(scores), abs=1e-6)


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_cli_resume_continues_in_the_original_run_directory(tmp_path):
    # Compared with an uninterrupted run of the CLI too: a run inside pytest's process and one in a fresh process
    # differ in float rounding (measured: one of the 32 val images flips by epoch 3), resumed or not.
    full_env = cli_env(tmp_path / "full")
    full = subprocess.run([*CVLAB, "train", *FAST, *RESUME, "trainer.max_epochs=4"], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    (full_dir,) = (tmp_path / "full" / "runs" / "classification" / "resnet18").iterdir()
    uninterrupted = full_dir, json.loads((full_dir / "metrics.json").read_text()), read_csv(full_dir / "results.csv")
    env = cli_env(tmp_path)
    first = subprocess.run([*CVLAB, "train", *FAST, *RESUME, "trainer.max_epochs=2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs" / "classification" / "resnet18").iterdir()
    stale = run_dir / "weights" / ".last.ckpt.12345-0badf00d.tmp"  # left by a save killed mid-write
    stale.write_bytes(b"\0" * 1000)
    resumed = subprocess.run([*CVLAB, "train", *FAST, *RESUME, "trainer.max_epochs=4",
                              f"resume={run_dir / 'weights' / 'last.ckpt'}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert list((tmp_path / "runs" / "classification" / "resnet18").iterdir()) == [run_dir]
    stdout = " ".join(resumed.stdout.split())
    assert f"run directory (start): {run_dir}" in stdout
    assert "continuing in its run directory" in stdout
    assert_same_run(run_dir, uninterrupted)
    assert not stale.exists()
    # .hydra/ now records the resumed invocation; the one before is kept beside it.
    assert "trainer.max_epochs=4" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_epochs=2" in (run_dir / ".hydra" / "before-resume" / "overrides.yaml").read_text()


def test_resume_after_the_run_directory_moved_keeps_the_best(tmp_path, uninterrupted):
    started, moved = tmp_path / "started", tmp_path / "moved"
    run_train(compose("train", [*FAST, *RESUME, "trainer.max_epochs=2", f"paths.output_dir={started}"]))
    started.rename(moved)  # the checkpoint still names the directory it was written in
    run_train(compose("train", [*FAST, *RESUME, "trainer.max_epochs=4", f"paths.output_dir={moved}",
                                f"resume={moved / 'weights' / 'last.ckpt'}"]))
    assert_same_run(moved, uninterrupted)


# ------------------------------------------------------------------------------------------ best.ckpt
def test_save_top_k_other_than_one_is_refused(train_cfg, tmp_path):
    with pytest.raises(UserError, match=r"save_top_k=2 is not supported: weights/best.ckpt is one file, the single "
                                        r"best epoch by val/acc"):
        run_train(train_cfg("callbacks.model_checkpoint.save_top_k=2", out=tmp_path / "run"))
    assert not list(tmp_path.rglob("*.ckpt"))


class Toy(pl.LightningModule):
    """A linear model on 8 points; ``scores[epoch]`` is logged as val/score, ``poison`` = (epoch, step) whose
    weights turn NaN before validation / whose loss term loss_box is inf."""

    def __init__(self, scores=(0.5,), nan_weights_at_epoch: int | None = None, inf_box_at_step: int | None = None):
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.scores = scores
        self.nan_weights_at_epoch = nan_weights_at_epoch
        self.inf_box_at_step = inf_box_at_step
        self.weights_at_bad_step = None

    def training_step(self, batch, batch_idx):
        (x,) = batch
        box = self.net(x).pow(2).mean()
        cls = self.net(x).abs().mean()
        if self.global_step == self.inf_box_at_step:
            box = box * float("inf")
            self.weights_at_bad_step = self.net.weight.detach().clone()
        self.log("train/loss", box + cls, on_step=True, on_epoch=True, batch_size=len(x))
        self.log("train/loss_box", box, on_step=False, on_epoch=True, batch_size=len(x))
        self.log("train/loss_cls", cls, on_step=False, on_epoch=True, batch_size=len(x))
        return box + cls

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_start(self):
        if self.current_epoch == self.nan_weights_at_epoch and not self.trainer.sanity_checking:
            self.net.weight.data.fill_(float("nan"))

    def on_validation_epoch_end(self):
        self.log("val/score", float(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))), batch_size=2)

    val_dataloader = train_dataloader


def fit_toy(module: Toy, weights: Path, epochs: int) -> pl.Trainer:
    best = RunCheckpoint(dirpath=weights, filename="best", monitor="val/score", mode="max",
                         auto_insert_metric_name=False, enable_version_counter=False)
    last = RunCheckpoint(dirpath=weights, filename="last", auto_insert_metric_name=False, enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[best, last, StopOnNonFiniteLoss()],
                         plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         default_root_dir=weights.parent)
    trainer.fit(module)
    return trainer


def test_a_non_finite_score_never_becomes_best(tmp_path):
    fit_toy(Toy(scores=(float("nan"),)), tmp_path / "weights", epochs=1)
    assert not (tmp_path / "weights" / "best.ckpt").exists()
    assert (tmp_path / "weights" / "last.ckpt").exists()
    fit_toy(Toy(scores=(0.5, float("nan"), float("inf"), 0.7, 0.6)), tmp_path / "again", epochs=5)
    assert load(tmp_path / "again" / "best.ckpt")["epoch"] == 3


def test_non_finite_weights_stop_the_run_and_keep_the_finite_checkpoints(tmp_path):
    with pytest.raises(NonFiniteError, match=r"training stopped: 2 weights are not finite after step 8 \(epoch 1\); "
                                             r"lr 0\.1\. best\.ckpt was not written"):
        fit_toy(Toy(scores=(0.5, 0.9), nan_weights_at_epoch=1), tmp_path / "weights", epochs=2)
    for name in ("best.ckpt", "last.ckpt"):
        saved = load(tmp_path / "weights" / name)
        assert saved["epoch"] == 0 and non_finite(saved["state_dict"]) == 0, name


def test_a_non_finite_loss_term_stops_training_before_its_update(tmp_path):
    module = Toy(scores=(0.5, 0.6), inf_box_at_step=5)
    with pytest.raises(NonFiniteError) as stopped:
        fit_toy(module, tmp_path / "weights", epochs=2)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("training stopped: the loss is inf at step 5 (epoch 1, batch 1); not finite: "
                              "loss_box=inf; lr 0.1.")
    assert "loss_cls" not in message
    assert torch.equal(module.net.weight, module.weights_at_bad_step)  # no update was made from the bad loss
    assert load(tmp_path / "weights" / "last.ckpt")["epoch"] == 0


@pytest.mark.slow  # whole CLI runs in subprocesses (make test-slow); kept out of make test's 10 minutes
def test_cli_train_with_a_diverging_lr_stops_with_exit_code_3(cli, tmp_path):
    result = cli("train", *FAST, "optimizer.lr=1e6", "trainer.max_epochs=2")
    assert result.returncode == NON_FINITE_EXIT_CODE == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("error: training stopped: the loss is nan at step 2 (epoch 1, batch 0); lr ")
    (run_dir,) = (tmp_path / "runs" / "classification" / "resnet18").iterdir()
    assert not (run_dir / "metrics.json").exists()
    for name in ("best.ckpt", "last.ckpt"):
        saved = load(run_dir / "weights" / name)
        assert saved["epoch"] == 0 and non_finite(saved["state_dict"]) == 0, name


# ------------------------------------------------------------------------------------------ strict json
def test_metrics_json_is_strict_json(tmp_path):
    import numpy as np

    write_json(tmp_path / "metrics.json", {"val/loss": float("nan"), "test/loss": torch.tensor(float("inf")),
                                           "val/acc": np.float32(0.5), "epochs": np.int64(3),
                                           "per_class": [1.0, -np.inf]})

    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")

    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse) == {
        "val/loss": None, "test/loss": None, "val/acc": 0.5, "epochs": 3, "per_class": [1.0, None]}
