"""Loggers (issue 11): ``logger=mlflow`` keeps a sqlite tracking store under runs/ and is read back through
MlflowClient; ``logger=[csv,tensorboard,mlflow]`` runs all three at once; a missing mlflow is one line."""
from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from conftest import FAST

# Two epochs of a tiny classifier, with the loggers each test chooses.
LOGGED = [*(o for o in FAST if not o.startswith("logger=")), "model=mobilenetv1", "model.width_mult=0.25",
          "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run with ``logger=[csv,tensorboard,mlflow]`` and runs under ``<tmp>/runs``: (the tmp folder, run directory,
    metrics.json, val/acc per epoch from results.csv)."""
    from cvlab.engine import run_train
    from cvlab.utils.config import compose

    root = tmp_path_factory.mktemp("loggers")
    run = root / "runs" / "classification" / "mobilenetv1" / "20260101-000000"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(root)  # nothing may land in the working folder
        run_train(compose("train", [*LOGGED, "logger=[csv,tensorboard,mlflow]", f"paths.runs={root / 'runs'}",
                                    f"paths.output_dir={run}"]))
    with open(run / "results.csv", newline="") as file:
        val_acc = [float(row["val/acc"]) for row in csv.DictReader(file)]
    return root, run, json.loads((run / "metrics.json").read_text()), val_acc


def test_the_cli_check_accepts_a_list_of_loggers():
    from cvlab.utils.config import check

    assert check("train", ["logger=[csv,tensorboard,mlflow]"]).cfg.logger.keys() == {"csv", "tensorboard", "mlflow"}


def test_three_loggers_at_once_each_write_their_files(logged):
    cwd, run, _, val_acc = logged
    with open(run / "metrics.csv", newline="") as file:  # Lightning's CSVLogger
        rows = list(csv.DictReader(file))
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")][:2] == pytest.approx(val_acc)
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard
    assert (cwd / "runs" / "mlflow.db").is_file()  # MLflow's sqlite store, under runs/
    assert not (cwd / "mlruns").exists()  # not MLflow's default file store in the working folder


def test_mlflow_run_reads_back_through_mlflow_client(logged):
    from mlflow import MlflowClient

    cwd, run, metrics, val_acc = logged
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("classification")  # one experiment per task
    (found,) = client.search_runs([experiment.experiment_id])
    assert re.fullmatch(r"mobilenetv1/\d{8}-\d{6}", found.info.run_name) and found.info.status == "FINISHED"
    assert found.data.tags["run_dir"] == str(run)
    params = found.data.params  # the task's hyper-parameters, flattened
    assert params["model/name"] == "mobilenetv1" and params["model/width_mult"] == "0.25"
    assert params["optimizer/lr"] == "0.003" and params["data/name"] == "digits"
    history = sorted(client.get_metric_history(found.info.run_id, "val/acc"), key=lambda m: m.step)
    # one point per epoch, then the best checkpoint's score from the final evaluation
    assert [m.value for m in history] == pytest.approx([*val_acc, metrics["val/acc"]])
    for key in ("test/acc", "test/loss", "val/acc", "params", "epochs"):
        assert found.data.metrics[key] == metrics[key], key  # metrics.json's figures, exactly


def test_a_missing_mlflow_names_the_extra(train_cfg, monkeypatch):
    from cvlab.engine.builders import build_loggers
    from cvlab.utils.errors import UserError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what importlib sees when mlflow is not installed
    with pytest.raises(UserError) as refused:
        build_loggers(train_cfg("logger=[csv,mlflow]"))
    assert str(refused.value) == "logger=mlflow needs the mlflow package: pip install 'cvlab[mlflow]'"


def test_a_missing_mlflow_is_one_line_exit_2(tmp_path, monkeypatch, cli_here):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    result = cli_here("train", "logger=mlflow", *LOGGED)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: logger=mlflow needs the mlflow package: pip install 'cvlab[mlflow]'"]
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "runs" / "classification").exists()
