"""Checkpoints never execute anything, and the configs stored in them are data (issue 10, Security).

Each hostile file is built here from a genuine checkpoint: a bare malicious pickle, a checkpoint with one extra
object that would run when unpickled, stored loss and data configs that name ``builtins.open``, an unregistered
task (``this.X``: importing ``this`` prints the Zen of Python), and a truncated and a garbage file. Every command
that takes a checkpoint (``eval ckpt=``, ``predict ckpt=``, ``distill teacher.ckpt=``, ``train resume=``) answers
each of them with one line and exit code 2. Nothing runs, and no run directory is left behind. Genuine checkpoints
of every task still restore and evaluate to their training run's figures.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import CVLAB, FAST
from cvlab.tasks.base import task_names

# A tiny classifier trained with SGD (no optimizer state): a checkpoint of ~1 MB.
SMALL = ["model=mobilenetv1", "model.width_mult=0.25", "optimizer=sgd"]
TINY_DISTILL = ["trainer=debug", "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
                "data.batch_size=8", "optimizer=sgd", "distill.latency_runs=3", "student=mobilenetv3_small"]
ZEN = "Beautiful is better than ugly"
UNTOUCHED = "untouched"


# Tiny networks gain nothing from a second thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WritesFile:
    """Unpickling it calls ``open(path, "w")``: the file is created, or emptied."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """One genuine checkpoint per task, trained for two steps: {task: (best.ckpt, the run's final metrics)}."""
    from cvlab.engine import run_train
    from cvlab.models import create_model
    from cvlab.tasks.distillation import AttachTeacher, DistillationSettings
    from cvlab.utils.config import compose

    root = tmp_path_factory.mktemp("genuine")
    detection = ["task=detection", "model=yolov3_tiny", "model.width=0.125", "model.anchors=auto", "data=shapes_det",
                 "data.image_size=64", "data.train_size=8", "data.val_size=4", "data.test_size=4", "optimizer=sgd"]
    teacher = create_model("mobilenetv1", width_mult=0.25, num_classes=10, in_chans=1, image_size=8)
    runs = {"classification": (SMALL, ()), "detection": (detection, ()),
            "distillation": ([*SMALL, "task.name=distillation"], [AttachTeacher(teacher, DistillationSettings())])}
    made = {}
    for task, (overrides, callbacks) in runs.items():
        out = root / task
        metrics, _ = run_train(compose("train", [*FAST, *overrides, f"paths.output_dir={out}"]),
                               extra_callbacks=callbacks)
        made[task] = (out / "weights" / "best.ckpt", metrics)
    return made


def _edited(source, path, **changes):
    """``source``'s checkpoint saved at ``path`` with ``changes`` (``hyper_parameters`` entries merged)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    hparams = changes.pop("hyper_parameters", {})
    checkpoint.update(changes, hyper_parameters={**checkpoint["hyper_parameters"], **hparams})
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def traps(tmp_path):
    """(created, kept): a file that unpickling a hostile pickle would create, and one whose content a hostile
    config would empty. Each test checks both are as they were."""
    created, kept = tmp_path / "created-by-unpickling", tmp_path / "kept"
    kept.write_text(UNTOUCHED)
    return created, kept


HOSTILE = {  # name: (what the one line says, how the file is made)
    "bare pickle": ("is not a cvlab checkpoint: it is not the zip archive",
                    lambda src, path, created, kept: path.write_bytes(pickle.dumps(WritesFile(created)))),
    "extra object": ("is not a cvlab checkpoint: its pickle names io.open",
                     lambda src, path, created, kept: _edited(src, path, extra=WritesFile(created))),
    "loss open _args_": ("its loss config names builtins.open", lambda src, path, created, kept: _edited(
        src, path, hyper_parameters={"loss": {"_target_": "builtins.open", "_args_": [str(kept), "w"]}})),
    "loss open kwargs": ("its loss config names builtins.open", lambda src, path, created, kept: _edited(
        src, path, hyper_parameters={"loss": {"_target_": "builtins.open", "file": str(kept), "mode": "w"}})),
    "data open": ("its data config names builtins.open", lambda src, path, created, kept: _edited(
        src, path, hyper_parameters={"data": {"_target_": "builtins.open", "file": str(kept), "mode": "w"}})),
    "task this.X": ("it names the task 'this.X', which is no registered task",
                    lambda src, path, created, kept: _edited(src, path, cvlab_task="this.X")),
    "truncated": ("is not a cvlab checkpoint: it is not the zip archive",
                  lambda src, path, created, kept: path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])),
    "garbage": ("is not a cvlab checkpoint: it is not the zip archive",
                lambda src, path, created, kept: path.write_bytes(random.Random(0).randbytes(4096))),
}


def _commands(path, tmp_path):
    image = tmp_path / "images" / "seven.png"
    if not image.exists():
        from PIL import Image

        image.parent.mkdir()
        Image.new("L", (8, 8), 255).save(image)
    return {
        "eval": ("checkpoint", ["eval", f"ckpt={path}", "trainer=debug"]),
        "predict": ("checkpoint", ["predict", f"ckpt={path}", f"source={image}"]),
        "distill": ("teacher.ckpt", ["distill", f"teacher.ckpt={path}", *TINY_DISTILL]),
        "train": ("resume checkpoint", ["train", f"resume={path}", *FAST, *SMALL]),
    }


def _folders(root) -> set:
    return {path for path in root.rglob("*") if path.is_dir()}


@pytest.mark.parametrize("command", ["eval", "predict", "distill", "train"])
@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_a_hostile_file_is_one_line_exit_2_runs_nothing_and_leaves_no_run_dir(genuine, traps, tmp_path, cli_here,
                                                                               hostile, command):
    created, kept = traps
    expected, make = HOSTILE[hostile]
    path = tmp_path / "files" / f"{hostile.replace(' ', '-')}.ckpt"
    path.parent.mkdir()
    make(genuine["classification"][0], path, created, kept)
    what, args = _commands(path, tmp_path)[command]
    folders = _folders(tmp_path)
    result = cli_here(*args)
    out, err = result.stdout, result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in out + err, err[-3000:]
    assert expected in lines[0] and f"{what} {str(path)!r}" in lines[0], lines[0]
    assert not created.exists() and kept.read_text() == UNTOUCHED  # nothing in the file ran
    assert "this" not in sys.modules and ZEN not in out + err  # nothing it names was imported
    assert _folders(tmp_path) == folders  # no run directory left behind


def test_an_unregistered_task_name_is_never_imported(genuine, tmp_path):
    """Through `python -m cvlab.cli` in a new interpreter, as a user types it: importing `this` would print the Zen."""
    path = _edited(genuine["classification"][0], tmp_path / "this.ckpt", cvlab_task="this.X")
    result = subprocess.run([*CVLAB, "eval", f"ckpt={path}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "CVLAB_RUNS": str(tmp_path / "runs")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: refusing checkpoint {str(path)!r}: it names the task 'this.X', which is no registered task "
        f"({', '.join(task_names())}); nothing was imported."]
    assert ZEN not in result.stdout + result.stderr and not (tmp_path / "eval").exists()


def test_a_legacy_task_name_maps_only_by_the_exact_name_of_a_registered_class(genuine, tmp_path):
    from cvlab.engine import restore_task
    from cvlab.utils.errors import UserError

    source = genuine["classification"][0]
    legacy = _edited(source, tmp_path / "legacy.ckpt", cvlab_task="cvlab.tasks.classification.ClassificationTask")
    assert type(restore_task(legacy)).__name__ == "ClassificationTask"
    for name in ("cvlab.tasks.classification.DataInfo", "cvlab.tasks.classification", "os.system", "classification "):
        with pytest.raises(UserError, match="which is no registered task"):
            restore_task(_edited(source, tmp_path / "other.ckpt", cvlab_task=name))


@pytest.mark.parametrize("task", ["classification", "detection", "distillation"])
def test_genuine_checkpoints_of_every_task_evaluate_to_their_training_figures(genuine, cli_here, task):
    ckpt, metrics = genuine[task]
    before = set(ckpt.parent.parent.glob("eval/*/eval.json"))
    result = cli_here("eval", f"ckpt={ckpt}", "trainer=debug")
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_json,) = set(ckpt.parent.parent.glob("eval/*/eval.json")) - before
    scores = json.loads(eval_json.read_text())
    test_keys = [key for key in metrics if key.startswith("test/")]
    assert test_keys and {key: scores[key] for key in test_keys} == pytest.approx(
        {key: metrics[key] for key in test_keys}, rel=1e-5, abs=1e-6)


def test_a_genuine_checkpoint_names_only_the_allowlisted_globals(genuine):
    from cvlab.utils.safety import CHECKPOINT_GLOBALS, pickle_globals

    def names_in(ckpt):
        with zipfile.ZipFile(ckpt) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return pickle_globals(archive.read(name))

    weights = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage"}
    for task, (best, _) in genuine.items():
        # best.ckpt: weights (float) and BatchNorm's counters (int64); last.ckpt adds the RNG states (uint8)
        best_names, last_names = names_in(best), names_in(best.with_name("last.ckpt"))
        assert weights <= best_names <= CHECKPOINT_GLOBALS, task
        assert weights | {"torch.ByteStorage"} <= last_names <= CHECKPOINT_GLOBALS, task


def test_weights_only_cannot_be_switched_off_from_the_environment(genuine, traps, tmp_path, monkeypatch):
    from cvlab.utils.safety import CheckpointError, read_checkpoint

    created, _ = traps
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = _edited(genuine["classification"][0], tmp_path / "extra.ckpt", extra=WritesFile(created))
    with pytest.raises(CheckpointError, match="its pickle names io.open"):
        read_checkpoint(path)
    assert not created.exists()


def test_globals_that_torch_allows_process_wide_are_still_refused(genuine, tmp_path):
    # torch.distributed allowlists every builtin exception (and DeviceMesh, DTensor...) for weights_only loads;
    # none of them is in a cvlab checkpoint.
    from cvlab.utils.safety import CheckpointError, read_checkpoint

    path = _edited(genuine["classification"][0], tmp_path / "exception.ckpt", extra=ConnectionError("x"))
    with pytest.raises(CheckpointError, match=r"its pickle names \S*OSError"):
        read_checkpoint(path)


def test_a_zip_that_torch_and_python_could_read_differently_is_refused(genuine, tmp_path):
    from cvlab.utils.safety import CheckpointError, read_checkpoint

    path = tmp_path / "two-pickles.ckpt"
    path.write_bytes(genuine["classification"][0].read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr(name, pickle.dumps(WritesFile(tmp_path / "created"), protocol=2))
    with pytest.raises(CheckpointError, match="not one that torch.save writes"):
        read_checkpoint(path)
    assert not (tmp_path / "created").exists()


@pytest.mark.parametrize(("changes", "expected"), [
    ({"_instantiator": "pytorch_lightning.cli.instantiate_module"}, "hold _instantiator, which a classification task"),
    ({"model": {"name": "yolov3_tiny"}}, "model 'yolov3_tiny' is a detection model"),
    ({"model": {"name": "evilnet"}}, "unknown model 'evilnet'"),
    ({"loss": {"name": "yolov3", "task": "detection", "_target_": "cvlab.losses.yolo.YoloV3Loss"}},
     "loss=yolov3 is a detection loss"),
    ({"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": "${oc.env:HOME}"}},
     "holds the interpolation '${oc.env:HOME}'"),
    ({"optimizer": "torch.optim.SGD"}, "is not a cvlab checkpoint: its optimizer config is a str, not a config"),
])
def test_hyper_parameters_that_are_not_the_tasks_are_refused(genuine, tmp_path, changes, expected):
    from cvlab.engine import restore_task
    from cvlab.utils.errors import UserError

    path = _edited(genuine["classification"][0], tmp_path / "edited.ckpt", hyper_parameters=changes)
    with pytest.raises(UserError) as error:
        restore_task(path)
    message = str(error.value)
    assert expected in message and (message.startswith(f"refusing checkpoint {str(path)!r}: ")
                                    or message.startswith(f"checkpoint {str(path)!r} is not a cvlab checkpoint: "))


@pytest.mark.parametrize(("config", "expected"), [
    ({"_target_": "builtins.open", "file": "x"}, "names builtins.open; a stored _target_ must name a class of cvlab"),
    ({"_target_": "this.X"}, "names this.X"),
    ({"_target_": "cvlab.tasks.base.Path"}, "a class of pathlib"),  # imported into cvlab, defined elsewhere
    ({"_target_": "cvlab.utils.config.os.system"}, "does not exist in this cvlab"),
    ({"_target_": "cvlab.engine.runs.write_json"}, "which is no class"),
    ({"_target_": "torch.nn.Module"}, "a class of torch.nn.modules.module"),  # torch.nn: its loss classes only
    ({"_target_": "torch.optim.SGD; import os"}, "has _target_ 'torch.optim.SGD; import os'"),
    ({"_target_": "torch.nn.CrossEntropyLoss", "weight": {"_target_": "builtins.open"}}, "loss.weight config names"),
    ({"_target_": "cvlab.data.classification.ClassificationDataModule", "_recursive_": False,
      "sampler": {"_target_": "builtins.exec"}}, "names builtins.exec"),  # checked whatever _recursive_ says
    ({"_target_": "torch.nn.CrossEntropyLoss", "_args_": ["x"]}, "has _args_, which cvlab never stores"),
    ({"_target_": "torch.nn.CrossEntropyLoss", "_set_": 1}, "has _set_, which cvlab never stores"),
    ({"_target_": "torch.optim.SGD", "_partial_": "yes"}, "sets _partial_='yes'"),
    ({"_target_": "torch.optim.SGD", "_partial_": 1}, "sets _partial_=1"),
    ({"_target_": "torch.nn.CrossEntropyLoss", "_convert_": "eval"}, "sets _convert_='eval'"),
    ({"label_smoothing": "${oc.env:HOME}"}, "holds the interpolation"),
    ({"weight": torch.ones(2)}, "holds a Tensor"),
])
def test_check_config_refuses_what_could_run(config, expected):
    from cvlab.utils.safety import RefusedCheckpoint, check_config

    with pytest.raises(RefusedCheckpoint) as error:
        check_config(config, "loss")
    assert expected in str(error.value)
    assert "this" not in sys.modules


def _targets(cfg):
    if isinstance(cfg, dict):
        yield from [cfg["_target_"]] if "_target_" in cfg else []
        for value in cfg.values():
            yield from _targets(value)


@pytest.mark.parametrize("group", ["optimizer", "scheduler", "loss", "sampler", "data"])
def test_every_shipped_option_passes_the_checks_of_a_restore(group):
    """What cvlab writes into checkpoints passes the checks that reading them applies, each _target_ resolved."""
    from cvlab.tasks.base import to_plain
    from cvlab.utils.config import compose, options
    from cvlab.utils.safety import check_config

    targets = []
    for option in options(group):
        cfg = to_plain(compose("train", [f"{group}={option}"])[group])
        check_config(cfg, group)
        targets += _targets(cfg)
    assert targets  # the group's options name classes, and every one of them was resolved


def test_the_distill_run_name_reads_a_checkpoint_safely(genuine, traps, tmp_path):
    from cvlab.run.distill import _checkpoint_model_name

    created, _ = traps
    extra = _edited(genuine["classification"][0], tmp_path / "extra.ckpt", extra=WritesFile(created))
    escaping = _edited(genuine["classification"][0], tmp_path / "escape.ckpt",
                       hyper_parameters={"model": {"name": "../../../tmp/x"}})
    assert _checkpoint_model_name(str(genuine["classification"][0])) == "mobilenetv1"
    assert _checkpoint_model_name(str(extra)) is None and not created.exists()
    assert _checkpoint_model_name(str(escaping)) is None  # the name becomes a folder: only registered models


def test_resuming_a_checkpoint_of_another_task_is_one_line(genuine, tmp_path):
    from cvlab.engine import run_train
    from cvlab.utils.config import compose
    from cvlab.utils.errors import UserError

    last = genuine["detection"][0].with_name("last.ckpt")  # best.ckpt keeps no resume state
    cfg = compose("train", [*FAST, *SMALL, f"resume={last}", f"paths.output_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="holds a 'detection' task; this run's task is classification"):
        run_train(cfg)
