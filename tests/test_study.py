"""`cvlab study`: the statistics against hand computations, the plan (axes, settings, cells, the fixed split seed),
bad input as one line, the seeding that keeps the split and varies initialisation and order, and the real CLI end to
end with tiny budgets: 2 settings x 2 seeds, its table and csv, a rerun that skips every cell."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from conftest import CVLAB, FAST
from cvlab.engine.study import (
    CellFailed,
    StudyPlan,
    ci_half_width,
    cli_cell_runner,
    competition_ranks,
    mean_std,
    plan_study,
    report_metrics,
    study_directory,
    summarise,
    welch_p,
)
from cvlab.utils.errors import UserError


def node(seeds=2, baseline=None, confidence=0.95):
    return OmegaConf.create({"seeds": seeds, "baseline": baseline, "confidence": confidence, "resume": True,
                             "dir": None})


def plan(overrides=("norm=bn,gn", "data.batch_size=2,32", "trainer=debug"), seeds=2, baseline=None,
         seed=42, split_seed=42) -> StudyPlan:
    return plan_study("train", list(overrides), node(seeds, baseline), seed=seed, split_seed=split_seed,
                      monitor="val/acc", mode="max")


# ------------------------------------------------------------------------------------------------- statistics
def test_mean_and_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and std == pytest.approx(math.sqrt(2.5), abs=1e-15)  # ddof=1: 10 / 4
    assert math.isnan(mean_std([0.9])[1]) and math.isnan(mean_std([])[0])


def test_ci_half_width_uses_the_t_quantile_of_n_minus_1_degrees():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    # t_{0.975, 4} = 2.7764451051977934 (tables: 2.776); s / sqrt(n) = sqrt(2.5) / sqrt(5) = sqrt(0.5)
    assert ci_half_width(values) == pytest.approx(2.7764451051977934 * math.sqrt(0.5), abs=1e-12)
    assert ci_half_width(values) == pytest.approx(1.9632431614775572, abs=1e-12)
    assert ci_half_width(values, 0.90) == pytest.approx(2.1318467863266495 * math.sqrt(0.5), abs=1e-12)
    assert ci_half_width(values, 0.90) < ci_half_width(values)  # the confidence is used
    assert math.isnan(ci_half_width([1.0]))


def test_welch_p_matches_a_hand_computation_and_scipy():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.85, 0.90, 0.95]
    # by hand: means 0.92 and 0.875, sample variances 0.0004 and 0.0125 / 3
    se2_a, se2_b = 0.0004 / 3, (0.0125 / 3) / 4
    t = (0.92 - 0.875) / math.sqrt(se2_a + se2_b)
    df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / 2 + se2_b ** 2 / 3)  # Welch-Satterthwaite
    assert (t, df) == (pytest.approx(1.3127849234810522, abs=1e-12), pytest.approx(3.725591854581798, abs=1e-12))
    hand = 2 * stats.t.sf(t, df)
    assert welch_p(a, b) == pytest.approx(hand, abs=1e-12)
    assert welch_p(a, b) == pytest.approx(0.2642759376432077, abs=1e-12)
    student = stats.ttest_ind(a, b, equal_var=True).pvalue  # the pooled test differs: equal_var=False is used
    assert abs(student - welch_p(a, b)) > 1e-3
    assert welch_p(b, a) == pytest.approx(welch_p(a, b), abs=1e-15)  # two-sided


def test_welch_p_is_nan_without_two_values_a_side_or_any_variance():
    assert math.isnan(welch_p([0.9], [0.8, 0.85]))
    assert math.isnan(welch_p([0.9, 0.9], [0.9, 0.9]))


def test_competition_ranks_share_ties_and_skip_nan():
    assert competition_ranks([0.9, 0.95, 0.9, math.nan], higher_is_better=True) == [2, 1, 2, None]
    assert competition_ranks([0.9, 0.95, 0.9, 0.7], higher_is_better=False) == [2, 4, 2, 1]


# ------------------------------------------------------------------------------------------------- the plan
def test_settings_are_the_product_of_the_axes_and_cells_hold_the_split_seed():
    study = plan(seed=7, split_seed=42)
    assert [axis.key for axis in study.axes] == ["norm", "data.batch_size"]
    assert [s.label for s in study.settings] == ["bn/2", "bn/32", "gn/2", "gn/32"]
    assert study.seeds == (7, 8)
    cells = study.cells
    assert len(cells) == 8
    assert [cell.name for cell in cells[:2]] == ["norm-bn_batch_size-2-seed7", "norm-bn_batch_size-2-seed8"]
    assert cells[1].overrides == ("trainer=debug", "norm=bn", "data.batch_size=2", "seed=8", "data.seed=42")
    assert {cell.overrides[-1] for cell in cells} == {"data.seed=42"}  # one split for every cell
    assert study.baseline == 0 and study.test_monitor == "test/acc"


def test_seed_and_data_seed_given_once_are_the_first_seed_and_the_split():
    study = plan(("norm=bn,gn", "seed=3", "data.seed=11"), seed=3, split_seed=11)
    assert study.base == ()  # the study writes them into every cell itself
    assert [cell.overrides for cell in study.cells[:2]] == [("norm=bn", "seed=3", "data.seed=11"),
                                                           ("norm=bn", "seed=4", "data.seed=11")]


def test_range_and_glob_sweeps_are_axes():
    study = plan(("data.batch_size=range(2,5)", "attention=glob(s*)"))
    assert study.axes[0].values == ("2", "3", "4")
    assert study.axes[1].values == ("se", "self_attention", "sk")  # the attention options matching s*


def test_baseline_is_named_by_its_values():
    study = plan(baseline="gn/32")
    assert study.baseline == 3
    assert plan(("optimizer.lr=0.1,0.01",), baseline=0.01).baseline == 1  # a number as Hydra reads it


@pytest.mark.parametrize(("overrides", "seeds", "baseline", "expected"), [
    (("norm=bn",), 2, None, "give at least one override with comma-separated values, e.g. cvlab study norm=bn,gn"),
    (("norm=bn,gn",), 0, None, "seeds=0: a study needs at least 2 seeds per setting"),
    (("norm=bn,gn",), 1, None, "seeds=1: a study needs at least 2 seeds per setting"),
    (("norm=bn,gn",), 2, "sn", "study.baseline=sn is not one of the settings (norm): bn, gn."),
    (("norm=bn,gn", "data.batch_size=2,32"), 2, "gn", "study.baseline=gn is not one of the settings "
                                                     "(norm/data.batch_size): bn/2, bn/32, gn/2, gn/32."),
    (("norm=bn,gn", "seed=1,2"), 2, None, "seed=1,2: a study repeats every setting over its seeds"),
    (("norm=bn,gn", "data.seed=1,2"), 2, None, "data.seed=1,2: a study repeats every setting over its seeds"),
    (("norm=bn,gn,bn",), 2, None, "norm=bn,gn,bn lists bn more than once."),
    (("optimizer.lr=interval(0.1,1)",), 2, None, "interval(...) is a search space, for cvlab tune."),
])
def test_what_cannot_be_a_study_is_one_line(overrides, seeds, baseline, expected):
    with pytest.raises(UserError) as error:
        plan(overrides, seeds=seeds, baseline=baseline)
    assert expected in str(error.value) and "\n" not in str(error.value)


VALUES = {"bn": [0.90, 0.92, 0.94], "gn": [0.80, 0.85, 0.90], "sn": [0.70, 0.75]}  # sn's third seed diverged


def three_settings() -> tuple[StudyPlan, dict]:
    """A study of norm=bn,gn,sn x 3 seeds against gn, with the cells' metrics (VALUES on val, 0.1 less on test)."""
    study = plan(("norm=bn,gn,sn",), seeds=3, baseline="gn")
    results = {}
    for cell in study.cells:
        seeds = VALUES[cell.setting.label]
        position = cell.seed - 42
        results[cell.name] = ({"val/acc": seeds[position], "test/acc": seeds[position] - 0.1, "test/f1": 0.5,
                               "val/loss": 1.0, "teacher/test/acc": 1.0} if position < len(seeds)
                              else {"status": "non-finite"})
    return study, results


def test_summaries_hold_mean_p_value_rank_and_failed_cells():
    study, results = three_settings()
    values = VALUES
    metrics = report_metrics(study, list(results.values()))
    assert metrics == ["val/acc", "test/acc", "test/f1"]  # the main metric on val, then the test metrics
    bn, gn, sn = summarise(study, results, metrics)
    assert bn.mean("val/acc") == pytest.approx(0.92) and bn.std("val/acc") == pytest.approx(0.02)
    assert bn.p_values["val/acc"] == pytest.approx(welch_p(values["bn"], values["gn"]), abs=1e-15)
    assert bn.p_values["test/acc"] == pytest.approx(welch_p(values["bn"], values["gn"]), abs=1e-9)
    assert math.isnan(gn.p_values["val/acc"])  # the baseline
    assert (sn.n("val/acc"), sn.failed) == (2, 1)
    assert [s.rank for s in (bn, gn, sn)] == [1, 2, 3]


def test_the_report_writes_the_table_csv_cells_and_plot(tmp_path, capsys, monkeypatch):
    from cvlab.engine.study import write_study
    from cvlab.utils.console import console

    monkeypatch.setattr(console, "width", 200)  # one line per row

    study, results = three_settings()
    metrics = report_metrics(study, list(results.values()))
    write_study(study, tmp_path, summarise(study, results, metrics), metrics, results)
    rows = _csv(tmp_path / "study.csv")
    assert list(rows[0]) == ["norm", "setting", "n", "failed",
                             *(f"{m} {s}" for m in metrics for s in ("mean", "std", "ci95", "p")), "rank"]
    assert [(r["setting"], r["n"], r["failed"], r["rank"]) for r in rows] == [
        ("bn", "3", "0", "1"), ("gn", "3", "0", "2"), ("sn", "2", "1", "3")]
    assert float(rows[0]["val/acc ci95"]) == pytest.approx(stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3), abs=1e-12)
    assert rows[1]["val/acc p"] == ""  # gn is the baseline
    assert float(rows[2]["val/acc p"]) == pytest.approx(welch_p([0.70, 0.75], [0.80, 0.85, 0.90]), abs=1e-12)
    cells = _csv(tmp_path / "cells.csv")
    assert [(c["cell"], c["status"], c["val/acc"]) for c in cells[-3:]] == [
        ("norm-sn-seed42", "ok", "0.7"), ("norm-sn-seed43", "ok", "0.75"), ("norm-sn-seed44", "non-finite", "")]
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "study.json").read_text())
    assert (record["baseline"], record["key"]) == ("gn", study.key)
    out = capsys.readouterr().out
    sn_line = next(line for line in out.splitlines() if line.startswith("│ sn"))
    assert "2 (+1 failed)" in sn_line and "0.7250 ± 0.0354" in sn_line
    assert "baseline" in next(line for line in out.splitlines() if line.startswith("│ gn"))


def test_a_rerun_finds_the_study_of_the_same_settings(tmp_path):
    study = plan(("norm=bn,gn", "trainer=debug"))
    first, continued = study_directory(tmp_path, study)
    assert not continued
    (first / "study.json").write_text(json.dumps({"key": study.key}))
    assert study_directory(tmp_path, study) == (first, True)
    assert study_directory(tmp_path, plan(("norm=bn,gn", "trainer=debug"), seeds=5)) == (first, True)  # more seeds
    other, continued = study_directory(tmp_path, plan(("norm=bn,sn", "trainer=debug")))
    assert other != first and not continued
    fresh, continued = study_directory(tmp_path, study, resume=False)
    assert fresh not in (first, other) and not continued
    assert study_directory(tmp_path, plan(("norm=bn,sn",)), given=str(first)) == (first, True)
    with pytest.raises(UserError, match="holds no study.json"):
        study_directory(tmp_path, study, given=str(tmp_path / "elsewhere"))


@pytest.mark.parametrize(("code", "outcome"), [(3, "non-finite"), (2, UserError), (1, CellFailed)])
def test_a_cell_that_fails_is_counted_refused_or_stops_the_study(tmp_path, monkeypatch, code, outcome):
    cell = plan(("norm=bn,gn",)).cells[0]
    commands = []

    def fake_run(command, stdout, stderr):
        commands.append(command)
        if code == 2:  # a refused run removes its run directory (it holds no weights yet)
            shutil.rmtree(tmp_path / "cell")
        return subprocess.CompletedProcess(command, code, stdout=b"some output\nerror: data.root does not exist\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    run = cli_cell_runner("distill", "val/acc")
    (tmp_path / "cell").mkdir()
    if isinstance(outcome, str):
        assert run(cell, tmp_path / "cell") == {"status": outcome}
    else:
        with pytest.raises(outcome, match="exited with .*: data.root does not exist"):
            run(cell, tmp_path / "cell")
    assert (tmp_path / "cell" / "cell.log").read_text().endswith("error: data.root does not exist\n")
    assert commands[0][1:] == ["-m", "cvlab.cli", "distill", *cell.overrides,
                               f"hydra.run.dir='{tmp_path / 'cell'}'"]


# ------------------------------------------------------------------------------------------------- seeding
def _cell_parts(train_cfg, seed: int, split_seed: int):
    import pytorch_lightning as pl

    from cvlab.engine import build_datamodule, build_task

    cfg = train_cfg(f"seed={seed}", f"data.seed={split_seed}")
    pl.seed_everything(seed, verbose=False)  # as run_train does before it builds
    datamodule = build_datamodule(cfg)
    task = build_task(cfg, datamodule)
    first_batch = next(iter(datamodule.train_dataloader()))[1]
    splits = {}
    for name in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{name}_set")
        splits[name] = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return splits, first_batch, task


def test_the_seed_varies_init_and_order_while_data_seed_holds_the_split(train_cfg):
    splits_a, batch_a, task_a = _cell_parts(train_cfg, 42, 42)
    splits_b, batch_b, task_b = _cell_parts(train_cfg, 43, 42)
    for name in ("train", "val", "test"):
        assert torch.equal(splits_a[name], splits_b[name]), name  # the same images in the same split
    assert not torch.equal(batch_a, batch_b)  # another training order
    weights_a, weights_b = (next(iter(t.model.parameters())) for t in (task_a, task_b))
    assert not torch.equal(weights_a, weights_b)  # another initialisation
    assert task_a.hparams.data["seed"] == task_b.hparams.data["seed"] == 42  # checkpoints re-cut this split
    splits_c, _, task_c = _cell_parts(train_cfg, 42, 7)
    assert not torch.equal(splits_a["test"], splits_c["test"])  # data.seed does cut the split
    assert torch.equal(weights_a, next(iter(task_c.model.parameters())))  # and leaves the init to the seed


# ------------------------------------------------------------------------------------------------- end to end
STUDY = ["study", "norm=bn,gn", "seeds=2", "optimizer=sgd", *FAST]  # sgd: no optimizer state in last.ckpt


def _cvlab(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CVLAB_RUNS": str(cwd / "runs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CVLAB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """`cvlab study norm=bn,gn seeds=2` with tiny budgets; returns (cwd, study directory, result)."""
    cwd = tmp_path_factory.mktemp("study")
    result = _cvlab(cwd, *STUDY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (directory,) = (cwd / "runs" / "classification" / "studies").iterdir()
    return cwd, directory, result


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_cli_study_runs_every_cell_and_reports_mean_std_p_and_rank(studied):
    _, directory, result = studied
    cells = ["norm-bn-seed42", "norm-bn-seed43", "norm-gn-seed42", "norm-gn-seed43"]
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == cells
    metrics = {cell: json.loads((directory / cell / "metrics.json").read_text()) for cell in cells}
    for cell in cells:
        overrides = OmegaConf.load(directory / cell / ".hydra" / "overrides.yaml")
        assert list(overrides)[-3:] == [f"norm={cell.split('-')[1]}", f"seed={cell[-2:]}", "data.seed=42"]
        assert (directory / cell / "weights" / "best.ckpt").is_file() and (directory / cell / "cell.log").is_file()
        assert not (directory / cell / "weights" / "last.ckpt").exists()  # a finished cell is never resumed
    rows = {row["setting"]: row for row in _csv(directory / "study.csv")}
    assert list(rows) == ["bn", "gn"]
    for norm in ("bn", "gn"):
        val = [metrics[f"norm-{norm}-seed{s}"]["val/acc"] for s in (42, 43)]
        test = [metrics[f"norm-{norm}-seed{s}"]["test/acc"] for s in (42, 43)]
        row = rows[norm]
        assert (row["norm"], row["n"], row["failed"]) == (norm, "2", "0")
        assert float(row["val/acc mean"]) == pytest.approx(np.mean(val), abs=1e-12)
        assert float(row["val/acc std"]) == pytest.approx(np.std(val, ddof=1), abs=1e-12)
        assert float(row["test/acc mean"]) == pytest.approx(np.mean(test), abs=1e-12)
        assert float(row["val/acc ci95"]) == pytest.approx(12.706204736174694 * np.std(val, ddof=1) / math.sqrt(2),
                                                           abs=1e-9)
        assert "test/f1 mean" in row and "val/loss mean" not in row
    assert rows["bn"]["val/acc p"] == ""  # the baseline
    gn_p = welch_p([metrics[f"norm-gn-seed{s}"]["val/acc"] for s in (42, 43)],
                   [metrics[f"norm-bn-seed{s}"]["val/acc"] for s in (42, 43)])
    assert (rows["gn"]["val/acc p"] == "") if math.isnan(gn_p) else float(rows["gn"]["val/acc p"]) == pytest.approx(
        gn_p, abs=1e-12)
    means = [float(rows[n]["val/acc mean"]) for n in ("bn", "gn")]
    assert [int(rows[n]["rank"]) for n in ("bn", "gn")] == competition_ranks(means, higher_is_better=True)
    cells_csv = _csv(directory / "cells.csv")
    assert [(row["cell"], row["seed"], float(row["val/acc"])) for row in cells_csv] == [
        (cell, cell[-2:], metrics[cell]["val/acc"]) for cell in cells]
    assert (directory / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout[result.stdout.index("study: 2 settings x 2 seeds"):]
    header = next(line for line in table.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]][:3] == ["norm", "n", "val/acc"]
    assert [cell.strip() for cell in header.split("┃")[1:-1]][-3:] == ["p val/acc", "p test/acc", "rank"]
    bn_line = next(line for line in table.splitlines() if line.startswith("│ bn"))
    assert f"{means[0]:.4f} ± {float(rows['bn']['val/acc std']):.4f}" in bn_line and "baseline" in bn_line


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_every_cell_has_the_same_split_and_the_seeds_differ_in_their_weights(studied):
    from cvlab.engine import checkpoint_datamodule
    from cvlab.tasks.base import load_task

    _, directory, _ = studied
    tasks = {cell: load_task(str(directory / cell / "weights" / "best.ckpt"))
             for cell in ("norm-bn-seed42", "norm-bn-seed43")}
    test_sets = []
    for task in tasks.values():
        test_set = checkpoint_datamodule(task, None, 0).test_set
        test_sets.append(torch.stack([test_set[i][0] for i in range(len(test_set))]))
    assert torch.equal(*test_sets)
    assert [task.hparams.data["seed"] for task in tasks.values()] == [42, 42]
    first, second = (next(iter(task.model.parameters())) for task in tasks.values())
    assert not torch.equal(first, second)


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_running_the_same_study_again_skips_every_cell(studied):
    cwd, directory, _ = studied
    logs = {log: log.stat().st_mtime_ns for log in directory.glob("*/cell.log")}
    before = _csv(directory / "study.csv")
    started = time.perf_counter()
    result = _cvlab(cwd, *STUDY)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished earlier (") == 4
    assert f"run directory (continued): {directory}" in result.stdout
    assert {log: log.stat().st_mtime_ns for log in logs} == logs  # no cell ran again
    assert _csv(directory / "study.csv") == before
    assert elapsed < 60  # no training: the CLI's start and the checks


@pytest.mark.parametrize(("args", "expected"), [
    (("norm=bn,gn", "study.baseline=sn"), "study.baseline=sn is not one of the settings (norm): bn, gn."),
    (("norm=bn",), "give at least one override with comma-separated values, e.g. cvlab study norm=bn,gn"),
    (("norm=bn,gm",), "unknown norm option 'gm'"),
    (("norm=bn,gn", "study.seed=3"), "unknown key 'study.seed'"),
    (("norm=bn,gn", "seeds=two"), "study.seeds expects an integer"),
    (("norm=bn,gn", "hydra.run.dir=here"), "hydra.run.dir: a study gives each cell its own directory"),
    (("norm=bn,gn", "resume=last.ckpt"), "resume: a study resumes itself: run the same command again"),
])
def test_bad_study_input_is_refused_before_anything_is_written(tmp_path, monkeypatch, args, expected):
    from cvlab.run.study import run_study_command

    monkeypatch.setenv("CVLAB_RUNS", str(tmp_path / "runs"))
    with pytest.raises(UserError) as error:
        run_study_command("train", [*args, *FAST])
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_bad_study_input_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = _cvlab(tmp_path, "study", "norm=bn,gn", "seeds=0", *FAST)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "seeds=0: a study needs at least 2 seeds per setting" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_study_of_distill_settings_runs_cvlab_distill_per_cell(tmp_path):
    result = _cvlab(tmp_path, "study", "distill.temperature=1,4", "seeds=2", "teacher=resnet18",
                    "student=mobilenetv2", "distill.baseline=false", "distill.latency_runs=2", "optimizer=sgd", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (directory,) = (tmp_path / "runs" / "distillation" / "studies").iterdir()
    rows = {row["setting"]: row for row in _csv(directory / "study.csv")}
    assert list(rows) == ["1", "4"] and rows["1"]["distill.temperature"] == "1"
    for cell in ("temperature-1-seed42", "temperature-4-seed43"):
        assert (directory / cell / "distill.json").is_file()
        assert (directory / cell / "student_kd" / "weights" / "best.ckpt").is_file()
        assert not list(directory.glob(f"{cell}/**/last.ckpt"))
        assert [row["stage"] for row in json.loads((directory / cell / "distill.json").read_text())["rows"]] == [
            "teacher", "student_kd"]
