"""`cvlab tune`: the sweep grammar read into exact Optuna distributions, the pruning callback against a median
pruner, bad input in one line, and a tiny search through the real CLI: its study, leaderboard and best.yaml (which
trains the best trial again), continued after a kill with its numbering and old trials kept."""
from __future__ import annotations

import csv
import json
import re
import shlex
import sys
from types import SimpleNamespace

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import FAST
from cvlab.callbacks.pruning import OptunaPruning
from cvlab.engine.tune import STUDY_NAME, experiment_config, main_metric, parse_space, tune_overrides
from cvlab.utils.config import compose
from cvlab.utils.errors import UserError

SPACE = ["optimizer.lr=tag(log,interval(1e-4,1e-1))", "optimizer.weight_decay=interval(0,0.1)",
         "optimizer=choice(adamw,sgd)", "data.batch_size=interval(8,32)", "norm=bn,gn", "seed=range(1,4)",
         "++trainer.max_steps=tag(int,interval(10,20))"]


def test_the_sweep_grammar_becomes_exact_optuna_distributions(train_cfg):
    space = parse_space(SPACE, train_cfg())
    assert {d.name: d.distribution for d in space.dimensions} == {
        "optimizer.lr": FloatDistribution(1e-4, 0.1, log=True),
        "optimizer.weight_decay": FloatDistribution(0.0, 0.1),
        "optimizer": CategoricalDistribution(("adamw", "sgd")),
        "data.batch_size": IntDistribution(8, 32),  # an integer setting: integers
        "norm": CategoricalDistribution(("bn", "gn")),
        "seed": CategoricalDistribution((1, 2, 3)),
        "trainer.max_steps": IntDistribution(10, 20),
    }
    params = {"optimizer.lr": 0.00123, "optimizer.weight_decay": 0.05, "optimizer": "sgd", "data.batch_size": 12,
              "norm": "gn", "seed": 3, "trainer.max_steps": 15}
    assert space.overrides(params) == ["optimizer.lr=0.00123", "optimizer.weight_decay=0.05", "optimizer=sgd",
                                       "data.batch_size=12", "norm=gn", "seed=3", "++trainer.max_steps=15"]
    # What is checked before a search starts: both ends of each interval, every choice.
    assert space.bounds() == ["optimizer.lr=0.0001,0.1", "optimizer.weight_decay=0.0,0.1", "optimizer=adamw,sgd",
                              "data.batch_size=8,32", "norm=bn,gn", "seed=1,2,3", "++trainer.max_steps=10,20"]
    by_name = {d.name: d for d in space.dimensions}
    assert by_name["data.batch_size"].grid() == list(range(8, 33))
    assert by_name["seed"].grid() == [1, 2, 3]
    with pytest.raises(UserError, match="tune.sampler=grid takes listed values"):
        space.grid()


def test_an_interval_is_float_unless_the_setting_holds_an_integer():
    space = parse_space(["data.batch_size=interval(8,32)"])  # no config: nothing says it is an integer
    assert space.dimensions[0].distribution == FloatDistribution(8.0, 32.0)


@pytest.mark.parametrize(("line", "expected"), [
    ("optimizer=interval(0,1)", "optimizer is a config group; search its options with optimizer=choice(a,b)"),
    ("optimizer.lr=tag(log,interval(0,0.1))", "low"),
    ("optimizer.lr=tag(logg,interval(1e-4,0.1))", "an interval's tags are log and int; got logg"),
    ("data.batch_size=interval(8.5,32)", "data.batch_size is an integer setting; give whole-number bounds"),
    ("optimizer.betas=choice([0.9,0.99],[0.8,0.9])", "single values"),
    ("model=glob(nothing*)", "matches no model option"),
])
def test_a_bad_search_is_refused_in_one_line(train_cfg, line, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        parse_space([line], train_cfg())


def test_the_search_is_checked_at_both_ends_before_anything_runs():
    with pytest.raises(UserError, match="optimizer.lr must be a number > 0, got 0"):
        tune_overrides(["optimizer.lr=interval(0,0.1)"])
    with pytest.raises(UserError, match="optimizer.lr is both searched"):
        tune_overrides(["optimizer.lr=interval(1e-3,0.1)", "optimizer.lr=0.01"])
    with pytest.raises(UserError, match="tune.sampler=grid takes listed values"):
        tune_overrides(["optimizer.lr=interval(1e-3,0.1)", "tune.sampler=grid"])
    with pytest.raises(UserError, match="tune.pruner is one of median, none; got 'mean'"):
        tune_overrides(["optimizer.lr=interval(1e-3,0.1)", "tune.pruner=mean"])
    lines = tune_overrides(["optimizer.lr=tag(log,interval(1e-3,0.1))", "optimizer=adamw,adam", "trainer=debug",
                            "optimizer.amsgrad=choice(true,false)"])
    # The search travels to Hydra as one list; a constructor argument the yaml lacks is force-added.
    assert lines == ["trainer=debug", "tune.space=['optimizer.lr=tag(log,interval(1e-3,0.1))',"
                     "'optimizer=adamw,adam','++optimizer.amsgrad=choice(true,false)']"]


def test_the_cmaes_sampler_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cmaes", None)  # import cmaes raises ImportError
    with pytest.raises(UserError, match="tune.sampler=cmaes needs the cmaes package: pip install cmaes"):
        tune_overrides(["optimizer.lr=interval(1e-3,0.1)", "tune.sampler=cmaes"])


def test_the_best_config_lists_groups_in_defaults_and_settings_as_values():
    spec = experiment_config(["optimizer=sgd", "optimizer.lr=0.0123", "~callbacks.progress_bar",
                              "++trainer.max_steps=5", "data.batch_size=16"])
    assert spec == {"defaults": ["train", {"override optimizer": "sgd"}, "_self_"],
                    "optimizer": {"lr": 0.0123}, "callbacks": {"progress_bar": None},
                    "trainer": {"max_steps": 5}, "data": {"batch_size": 16}}


def test_the_objective_is_the_metric_the_best_checkpoint_is_chosen_by():
    def metric(*overrides):
        return main_metric(compose("tune", [*overrides, "paths.output_dir=unused"]))

    assert metric() == ("val/acc", "max")
    assert metric("task=detection", "model=yolov3_tiny", "data=shapes_det") == ("val/fitness", "max")
    assert metric("callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min") == (
        "val/loss", "min")


def _epoch_end(value: float, epoch: int = 1, sanity: bool = False):
    return SimpleNamespace(sanity_checking=sanity, current_epoch=epoch,
                           callback_metrics={"val/acc": torch.tensor(value)})


@pytest.mark.parametrize(("direction", "value", "pruned"), [
    ("maximize", 0.5, True), ("maximize", 0.95, False), ("minimize", 0.5, False), ("minimize", 0.95, True)])
def test_the_pruning_callback_stops_a_trial_behind_the_median(direction, value, pruned):
    study = optuna.create_study(direction=direction, pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for scores in ([0.7, 0.8], [0.8, 0.9]):  # two finished trials: medians 0.75 at epoch 0, 0.85 at epoch 1
        earlier = study.ask()
        for epoch, score in enumerate(scores):
            earlier.report(score, epoch)
        study.tell(earlier, scores[-1])
    trial = study.ask()
    callback = OptunaPruning(trial, "val/acc")
    callback.on_validation_end(_epoch_end(0.1, epoch=0, sanity=True), None)  # the sanity check is not an epoch
    if pruned:
        with pytest.raises(optuna.TrialPruned):
            callback.on_validation_end(_epoch_end(value), None)
    else:
        callback.on_validation_end(_epoch_end(value), None)
    assert study.trials[-1].intermediate_values == {1: pytest.approx(value)}


def test_a_pruned_fit_stops_at_the_end_of_the_epoch_it_was_judged_on(tmp_path):
    import pytorch_lightning as pl

    class Constant(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/acc", 0.5)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    earlier = study.ask()
    for epoch in range(3):
        earlier.report(0.9, epoch)
    study.tell(earlier, 0.9)
    trial = study.ask()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=[OptunaPruning(trial, "val/acc")])
    with pytest.raises(optuna.TrialPruned):  # Lightning tears the fit down and re-raises it
        trainer.fit(Constant(), data, data)
    assert trainer.current_epoch == 0 and trainer.global_step == 2
    assert study.trials[-1].intermediate_values == {0: 0.5}


def test_the_pruning_callback_needs_its_metric():
    trial = optuna.create_study().ask()
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, callback_metrics={"val/loss": 1.0})
    with pytest.raises(UserError, match="the pruner needs val/acc after every validation epoch; the task logged "
                                        "val/loss"):
        OptunaPruning(trial, "val/acc").on_validation_end(trainer, None)


@pytest.mark.parametrize(("args", "expected"), [
    (["optimizer=interval(0,1)"], "interval(...) ranges over numbers, and optimizer is a config group"),
    (["optimizer.lr=interval(1e-3,0.1)", "tune.trials=0"], "tune.trials must be an integer >= 1, got 0."),
    (["optimizer.lr=interval(1e-3,0.1)", "tune.sampler=bayes"],
     "tune.sampler is one of tpe, random, grid, cmaes; got 'bayes'."),
])
def test_bad_input_is_one_line_exit_2(cli_here, tmp_path, args, expected):
    result = cli_here("tune", *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def _study(tune_dir):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tune_dir / 'study.db'}")


@pytest.mark.slow  # a whole CLI run or several (make test-slow); the fast tests cover its parts
def test_a_tune_through_the_cli_writes_its_study_and_best_config_and_continues_after_a_kill(cli, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    space = ["optimizer.lr=tag(log,interval(1e-3,1e-1))", "optimizer=choice(adamw,sgd)"]
    result = cli("tune", *space, *FAST, "tune.trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    (tune_dir,) = (tmp_path / "runs" / "classification" / "tunes").iterdir()
    for name in ("study.db", "leaderboard.csv", "best.yaml", "importance.png", "tune.json"):
        assert (tune_dir / name).is_file(), name
    study = _study(tune_dir)
    assert [(t.number, t.state) for t in study.trials] == [(n, TrialState.COMPLETE) for n in range(3)]
    for trial in study.trials:  # each trial trained its own parameters, in its own run directory
        trial_cfg = OmegaConf.load(tune_dir / str(trial.number) / ".hydra" / "config.yaml")
        assert trial_cfg.optimizer.lr == trial.params["optimizer.lr"]
        assert trial_cfg.optimizer._target_ == {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}[
            trial.params["optimizer"]]
        metrics = json.loads((tune_dir / str(trial.number) / "metrics.json").read_text())
        assert metrics["val/acc"] == pytest.approx(trial.value)
    with (tune_dir / "leaderboard.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["trial"]) for row in rows][0] == study.best_trial.number and rows[0]["rank"] == "1"
    assert float(rows[0]["val/acc"]) == pytest.approx(study.best_value)
    assert "3 trials: 3 completed, 0 pruned, 0 failed" in result.stdout

    # A kill mid-trial leaves it running in the study; the continued search marks it failed, runs its parameters
    # again, numbers on and keeps the finished trials.
    distributions = {"optimizer.lr": FloatDistribution(1e-3, 1e-1, log=True),
                     "optimizer": CategoricalDistribution(("adamw", "sgd"))}
    killed = study.ask(distributions)
    before = {t.number: (t.params, t.value) for t in study.trials if t.state == TrialState.COMPLETE}
    result = cli("tune", f"tune.dir={tune_dir}", "tune.trials=5")
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tune_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert {t.number: (t.params, t.value) for t in study.trials[:3]} == before
    assert study.trials[4].params == killed.params and study.trials[4].user_attrs["rerun_of"] == killed.number
    assert "6 trials: 5 completed, 0 pruned, 0 failed, 1 interrupted (run again)" in result.stdout
    for other in (["optimizer.lr=interval(1e-3,1e-2)"], ["trainer.max_epochs=3"]):  # a continued search is the same
        with pytest.raises(UserError, match=re.escape(f"tune.dir={tune_dir} continues its own search, {space[0]}")):
            tune_overrides([f"tune.dir={tune_dir}", *other])

    # best.yaml trains the best trial again with the command it prints.
    best = study.best_trial
    command = next(line for line in (tune_dir / "best.yaml").read_text().splitlines() if "Train it again" in line)
    args = shlex.split(command.partition(": ")[2].replace("[key=value ...]", ""))
    assert args[:2] == ["cvlab", "train"]
    result = cli(*args[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "classification" / "resnet18").iterdir()
    again = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    trial_cfg = OmegaConf.load(tune_dir / str(best.number) / ".hydra" / "config.yaml")
    assert again.optimizer == trial_cfg.optimizer and again.optimizer.lr == best.params["optimizer.lr"]
    assert again.trainer == trial_cfg.trainer and again.data == trial_cfg.data and again.model == trial_cfg.model
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/acc"] == pytest.approx(best.value, abs=1e-6)


def test_the_cmaes_sampler_proposes_the_continuous_parameters_jointly():
    from cvlab.engine.tune import make_sampler

    space = parse_space(["optimizer.lr=tag(log,interval(1e-4,1e-1))", "optimizer.weight_decay=interval(0.0,0.1)"])
    sampler = make_sampler(OmegaConf.create({"sampler": "cmaes"}), space, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: sum((value - 0.01) ** 2 for value in space.suggest(trial).values()), n_trials=8)
    assert isinstance(sampler, optuna.samplers.CmaEsSampler)
    # CMA-ES samples both as one Gaussian (relative sampling), not each on its own as random search would
    assert set(sampler.infer_relative_search_space(study, study.trials[-1])) == set(space.names)
    assert all(1e-4 <= t.params["optimizer.lr"] <= 0.1 and 0 <= t.params["optimizer.weight_decay"] <= 0.1
               for t in study.trials)
