"""scripts/bench_overhead.py: cvlab's training path and the hand-written loop start from the same weights and take
the same optimizer steps (the timing itself is the script's business, not a test's)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def runs(bench):
    # Two epochs of two batches of 8: crosses an epoch boundary (sampler.set_epoch) and, with augmentation on,
    # checks that both legs draw the same random crops from the global RNG.
    overrides = bench.train_overrides("resnet18", "digits", "momentum", epochs=2, steps=2, val_steps=1,
                                      extra=["data.batch_size=8", "data.augment=true"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared two-core machine wait on each other for seconds
    try:
        yield {leg: bench.run_leg(leg, overrides) for leg in bench.LEGS}
    finally:
        torch.set_num_threads(threads)


def test_every_leg_starts_from_the_same_weights(bench, runs):
    plain = runs["plain"]
    assert len(plain.initial_state) == len(runs["cvlab lean"].initial_state) > 0
    for leg in ("cvlab lean", "cvlab defaults"):
        assert bench.max_weight_difference(runs[leg].initial_state, plain.initial_state) == 0.0


def test_every_leg_takes_the_same_steps(bench, runs):
    plain = runs["plain"]
    assert len(plain.losses) == 4
    assert len(set(plain.losses)) == 4  # four different batches, four different losses
    for leg in ("cvlab lean", "cvlab defaults"):
        assert len(runs[leg].losses) == 4
        assert bench.max_loss_difference(runs[leg].losses, plain.losses, steps=4) <= 1e-5


def test_summary_checks_pass_for_identical_runs(bench, runs):
    summary = bench.summarise({leg: [run] for leg, run in runs.items()}, steps=4)
    assert summary["legs"]["plain"]["ratio_to_plain"] == 1.0
    assert summary["legs"]["cvlab lean"]["max_loss_diff"] <= 1e-5
    oks = [ok for ok, _ in bench.checks(summary)]
    assert oks[:2] == [True, True]  # weights and losses; the third (timing) depends on the machine


def test_differences_of_unequal_runs(bench):
    assert bench.max_loss_difference([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], steps=3) == 0.5
    assert bench.max_loss_difference([1.0], [1.0, 2.0], steps=2) == float("inf")  # too few steps to compare
    a = {"w": torch.zeros(3), "b": torch.zeros(1)}
    assert bench.max_weight_difference(a, {"w": torch.tensor([0.0, 0.25, 0.0]), "b": torch.zeros(1)}) == 0.25
    assert bench.max_weight_difference(a, {"w": torch.zeros(3)}) == float("inf")


def test_batch_limit_follows_lightning(bench):
    loader = DataLoader(TensorDataset(torch.zeros(10)), batch_size=2)  # 5 batches
    assert [bench.batch_limit(limit, loader) for limit in (None, 1.0, 0.4, 3, 9)] == [5, 5, 2, 3, 5]


def test_too_few_steps_to_compare_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "5", "--epochs", "2"])  # 10 steps < the 20 compared
    assert bench.parse_args(["--steps", "10", "--epochs", "2"]).compare_steps == 20
