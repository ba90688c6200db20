"""The command line as a user types it: help speed, one-line errors with exit code 2, nothing left behind."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch


def test_help_is_fast_and_lists_every_command():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cvlab.cli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for command in ("train", "eval", "sweep", "list", "info", "smoke", "distill", "predict", "anchors", "tune",
                    "export", "study", "generate"):
        assert command in result.stdout
    assert elapsed < 1.0, f"cvlab --help took {elapsed:.2f}s"


def test_help_does_not_import_torch():
    code = "import sys, cvlab.cli; assert 'torch' not in sys.modules and 'hydra' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


BAD_INPUT = [
    (["train", "model=resnt50"], "unknown model option 'resnt50'. Did you mean resnet50"),
    (["train", "optimizer.lrr=0.1"], "unknown key 'optimizer.lrr': torch.optim.AdamW takes no argument 'lrr'. "
                                     "Did you mean optimizer.lr"),
    (["train", "trainer.max_epochs=abc"], "trainer.max_epochs expects an integer or null, got 'abc'"),
    (["train", "optimizer.lr=fast"], "optimizer.lr expects a number, got 'fast'"),
    (["sweep", "optimizer=sgd,adm"], "unknown optimizer option 'adm'. Did you mean adam"),
    (["train", "norm=batchnorm"], "unknown norm option 'batchnorm'"),
    (["train", "modle=resnet50"], "unknown key 'modle'. Did you mean model"),
    (["eval", "ckpt=missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    (["eval"], "eval needs a checkpoint"),
    (["train", "resume=missing.ckpt", "trainer=debug"], "resume checkpoint 'missing.ckpt' does not exist"),
    (["list", "modle"], "unknown group 'modle'. Did you mean model"),
    (["info", "model=resnet5"], "Did you mean resnet50"),
    (["train", "task=detection", "model=resnet18"],
     "model 'resnet18' is a classification model; task=detection takes one of fast_rcnn, faster_rcnn, rcnn"),
    (["train", "model=yolov3_tiny", "loss=ce"], "loss=ce is a classification loss; task=detection cannot use it"),
    (["eval", "ckpt=README.md", "split=train"], "split is one of val, test, got 'train'"),
    # Values are range-checked before anything is built (each printed a traceback before).
    (["train", "optimizer.lr=-1"], "optimizer.lr must be a number > 0, got -1."),
    (["train", "data.batch_size=0"], "data.batch_size must be an integer in [1, 65536], got 0."),
    (["train", "data.val_fraction=1.5"], "data.val_fraction=1.5 and data.test_fraction=0.15: each must be above 0"),
    (["info", "data.image_size=0"], "data.image_size must be an integer in [1, 4096], got 0."),
    (["train", "data.in_chans=3"], "data.in_chans=3 but digits images have 1 channel; leave data.in_chans=1."),
    (["predict", "ckpt=x.ckpt", "source=.", "top_k=0"], "top_k must be an integer >= 1, got 0."),
    pytest.param(["predict", "ckpt=x.ckpt", "source=.", "device=cuda"],
                 "device=cuda but torch sees no CUDA GPU on this machine; use device=cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["train", "paths.runs=/proc/cvlab-runs"], "paths.runs=/proc/cvlab-runs is not writable"),
    (["train", "paths.runs=x.ckpt/runs"], "paths.runs=x.ckpt/runs cannot be a folder"),
    # Settings that were silently ignored, and a Trainer argument misspelt.
    (["info", "model=resnet18", "data.num_classes=1000"],
     "digits: data.num_classes=1000 but the data has 10 classes"),
    (["train", "data.root=/tmp"], "data.root does not apply to data=digits (it is embedded"),
    (["train", "trainer.max_stepz=2"], "takes no argument 'max_stepz'. Did you mean trainer.max_steps"),
]
# A few of them again through a new interpreter, as a user types them: the one line must survive what only a real
# process adds (its start-up, Hydra's own argv handling, the exit code the interpreter returns).
REAL_COMMAND = {"model=resnt50", "eval", "trainer.max_epochs=abc", "data.in_chans=3"}


def _assert_one_line_refusal(result, tmp_path, expected):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("error: ")
    assert expected in error_lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_no_run_dir(cli_here, tmp_path, args, expected):
    (tmp_path / "x.ckpt").write_bytes(b"")  # a checkpoint path that exists, for predict's value checks
    _assert_one_line_refusal(cli_here(*args), tmp_path, expected)


@pytest.mark.parametrize(("args", "expected"), [case for case in BAD_INPUT  # plain cases (a pytest.param has marks)
                                                if not hasattr(case, "marks") and case[0][-1] in REAL_COMMAND])
def test_bad_input_through_a_new_interpreter_is_one_line_exit_2_no_run_dir(cli, tmp_path, args, expected):
    _assert_one_line_refusal(cli(*args), tmp_path, expected)


def test_data_errors_leave_no_run_directory(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("train", "data=imagefolder", f"data.root={empty}", "trainer=debug")
    assert result.returncode == 2
    assert f"no images found under {empty}" in result.stderr
    assert not list((tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else True


@pytest.mark.slow  # whole CLI runs in subprocesses (make test-slow); kept out of make test's 10 minutes
def test_the_task_and_data_a_model_fills_in_are_announced(cli):
    result = cli("train", "model=yolov3_tiny", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    note = "model=yolov3_tiny: task=detection data=shapes_det (give task=/data= to choose otherwise)"
    assert note in result.stdout.replace("\n", "")
    assert "task=detection" not in cli("train", "model=resnet50", "--cfg", "job").stdout


def test_list_describes_every_option(cli):
    result = cli("list", "optimizer")
    assert result.returncode == 0
    for option in ("sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw"):
        assert f" {option} " in result.stdout
    assert "Nesterov" in result.stdout and "decoupled weight decay" in result.stdout


def test_list_prints_descriptions_as_written(cli):
    result = cli("list", "data")  # coco.yaml's description holds "[/test2017]", which rich would read as markup
    assert result.returncode == 0, result.stderr
    assert "train2017/val2017[/test2017]" in result.stdout.replace("\n", "")


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_cfg_job_passes_through_to_hydra(cli):
    result = cli("train", "model=resnet34", "optimizer=nesterov", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: resnet34" in result.stdout and "nesterov: true" in result.stdout
