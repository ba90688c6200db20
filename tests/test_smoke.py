"""`cvlab smoke` as typed: its table and exit code on two models, and its refusals. (`make test` runs the whole zoo
through the command itself after pytest: spread over pytest-xdist's workers as one test per model it took twice as
long, 263 s against 130 s.)"""
from __future__ import annotations

import pytest


def test_the_smoke_command_prints_its_table_and_exits_0(cli_here):
    result = cli_here("smoke", "resnet18", "yolov3_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke: 2 models, 2 train + 2 val batches each" in result.stdout
    assert "resnet18: passed" in result.stdout and "yolov3_tiny: passed" in result.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["resnet18", "resnt18"], "unknown model 'resnt18'. Did you mean resnet18"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0."),
])
def test_the_smoke_command_refuses_bad_input_in_one_line_before_any_model_runs(cli_here, args, expected):
    result = cli_here("smoke", *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert "resnet18: passed" not in result.stdout
