"""The engine's stage runner: stage order and folders, one row each in the table and stages.json, and a rerun that
skips finished stages (their functions are not called) but runs again what changed, was killed, or depends on a
stage that ran again."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from cvlab.engine import Column, Stage, run_stages
from cvlab.utils.errors import UserError


class Pipeline:
    """Three stages, a -> b -> c: b needs a's output, c needs b's; every call and restore is counted."""

    def __init__(self, data: str = "digits"):
        self.calls: list[str] = []
        self.restores = Counter()
        self.contexts = {}
        self.data = data

    def stage(self, name: str, needs=(), config=None):
        def run(context):
            self.calls.append(name)
            self.contexts[name] = context
            (context.out_dir / "weights.txt").write_text(name)
            inputs = [context.output(need) for need in needs]
            value = 1 + sum(inputs)
            return {"value": value, "score": value / 10, "inputs": inputs}, value

        def restore(context):
            self.restores[name] += 1
            return json.loads((context.out_dir / "stage.json").read_text())["metrics"]["value"]

        return Stage(name, run, needs=needs, config=config, label=f"stage {name}", restore=restore)

    def stages(self):
        config = OmegaConf.create({"data": {"name": self.data}, "paths": {"output_dir": "${hydra:runtime.output_dir}"},
                                   "weights": "${paths.output_dir}/weights.txt"})
        return [self.stage("a", config=config), self.stage("b", ("a",)), self.stage("c", ("b",))]


COLUMNS = [Column("value", "value"), Column("score", "score", "{:.2f}"), Column("missing", "absent")]


def test_stages_run_in_order_each_in_its_folder_with_one_row(tmp_path, capsys):
    pipeline = Pipeline()
    results = run_stages(pipeline.stages(), tmp_path, COLUMNS, title="toy pipeline")
    assert pipeline.calls == ["a", "b", "c"]
    assert list(results) == ["a", "b", "c"]
    # outputs flow forward: a=1, b=1+1, c=1+2
    assert [results[name].output for name in results] == [1, 2, 3]
    assert [results[name].metrics["inputs"] for name in results] == [[], [1], [2]]
    for name in "abc":
        assert (tmp_path / name / "weights.txt").read_text() == name
        assert pipeline.contexts[name].out_dir == tmp_path / name
        record = json.loads((tmp_path / name / "stage.json").read_text())
        assert record["metrics"] == results[name].metrics
    # the stage's config points its files at its own folder
    assert pipeline.contexts["a"].config.weights == str(tmp_path / "a" / "weights.txt")
    assert pipeline.contexts["b"].config is None
    summary = json.loads((tmp_path / "stages.json").read_text())
    assert summary["title"] == "toy pipeline"
    assert [(row["stage"], row["dir"], row["value"], row["skipped"]) for row in summary["stages"]] == [
        ("a", "a", 1, False), ("b", "b", 2, False), ("c", "c", 3, False)]
    out = capsys.readouterr().out
    assert "1/3 a" in out and "3/3 c" in out and "toy pipeline" in out
    table_rows = [line for line in out.splitlines() if "stage " in line]
    assert [line.split("│")[1:5] for line in table_rows] == [
        [" stage a ", "     1 ", "  0.10 ", "      - "],
        [" stage b ", "     2 ", "  0.20 ", "      - "],
        [" stage c ", "     3 ", "  0.30 ", "      - "]]


def test_a_rerun_skips_finished_stages_and_rereads_their_rows(tmp_path, capsys):
    first = run_stages(Pipeline().stages(), tmp_path, COLUMNS)
    again = Pipeline()
    results = run_stages(again.stages(), tmp_path, COLUMNS)
    assert again.calls == [] and not again.restores  # nothing ran, nothing needed restoring
    assert {name: r.metrics for name, r in results.items()} == {name: r.metrics for name, r in first.items()}
    assert all(r.skipped and r.output is None for r in results.values())
    summary = json.loads((tmp_path / "stages.json").read_text())
    assert [row["skipped"] for row in summary["stages"]] == [True, True, True]
    assert capsys.readouterr().out.count("finished earlier (") == 3


def test_a_killed_stage_runs_again_from_a_clean_folder_with_restored_inputs(tmp_path):
    run_stages(Pipeline().stages(), tmp_path)
    (tmp_path / "c" / "stage.json").unlink()  # killed before c finished
    (tmp_path / "c" / "half-written.tmp").write_text("")
    resumed = Pipeline()
    results = run_stages(resumed.stages(), tmp_path)
    assert resumed.calls == ["c"]
    assert resumed.restores == Counter({"b": 1})  # c needs b's output, rebuilt once; a's is not needed
    assert results["c"].output == 3 and not results["c"].skipped and results["b"].skipped
    assert not (tmp_path / "c" / "half-written.tmp").exists()
    assert (tmp_path / "c" / "stage.json").is_file()


def test_a_changed_config_reruns_its_stage_and_every_stage_that_needs_it(tmp_path, capsys):
    run_stages(Pipeline().stages(), tmp_path)
    capsys.readouterr()
    changed = Pipeline(data="shapes")
    run_stages(changed.stages(), tmp_path)
    assert changed.calls == ["a", "b", "c"]
    out = capsys.readouterr().out
    assert out.index("finished earlier, but its config changed: running it again") < out.index("2/3 b")
    assert out.count("finished earlier, but a stage it needs ran again: running it again") == 2  # b and c


def test_changed_params_rerun_a_stage_but_not_the_stages_before_it(tmp_path):
    def stages(temperature, calls):
        def run(name):
            return lambda context: calls.append(name) or {"t": temperature}
        return [Stage("teacher", run("teacher")), Stage("student", run("student"), params={"t": temperature})]

    run_stages(stages(4.0, []), tmp_path)
    calls = []
    results = run_stages(stages(8.0, calls), tmp_path)
    assert calls == ["student"] and results["teacher"].skipped and results["student"].metrics == {"t": 8.0}


def test_a_skipped_stage_without_checkpoint_or_restore_is_one_clear_error(tmp_path):
    def stages():
        return [Stage("fit", lambda context: {}), Stage("use", lambda context: {}, needs=("fit",))]

    run_stages(stages(), tmp_path)
    (tmp_path / "use" / "stage.json").unlink()
    with pytest.raises(UserError, match=r"the fit stage's checkpoint '.*fit/weights/best.ckpt' does not exist"):
        run_stages(stages(), tmp_path)


@pytest.mark.parametrize(("stages", "message"), [
    ([Stage("a", dict), Stage("a", dict)], "stage 'a' appears twice"),
    ([Stage("b", dict, needs=("a",)), Stage("a", dict)], r"stage 'b' needs \['a'\], which do not run before it"),
    ([Stage("../a", dict)], "must be letters, digits"),
])
def test_malformed_pipelines_are_refused_before_any_stage_runs(tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        run_stages(stages, tmp_path)
    assert not any(tmp_path.iterdir())
