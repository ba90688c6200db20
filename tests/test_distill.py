"""Knowledge distillation: the loss against a hand computation, the frozen teacher, each kind's use of labels, the
FitNets regressor, the teacher checks, and `cvlab distill` / `cvlab sweep` end to end with tiny budgets, including a
killed run resumed in its run directory."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvlab.data.base import DataInfo
from cvlab.losses.distillation import UNLABELED, distillation_loss, soft_target_loss
from cvlab.models import create_model
from cvlab.tasks.classification import ClassificationTask
from cvlab.tasks.distillation import (
    AttachTeacher,
    DistillationSettings,
    DistillationTask,
    augmented_views,
    check_hint_layers,
    check_teacher,
    hint_map,
)
from cvlab.utils.errors import UserError

DIGITS_INFO = {"num_classes": 10, "in_chans": 1, "image_size": 8, "class_names": [str(d) for d in range(10)]}
TINY = ["trainer=debug", "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
        "data.batch_size=8", "optimizer=sgd", "distill.latency_runs=3"]  # sgd: no optimizer state to save


# Tiny networks gain nothing from a second thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


STUDENT_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER_LOGITS = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_loss_is_alpha_t2_kl_teacher_to_student_plus_ce():
    T, alpha, labels = 4.0, 0.9, [1, 2]
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(_softmax(t, T), _softmax(s, T)))
             for s, t in zip(STUDENT_LOGITS, TEACHER_LOGITS)) / 2
    ce = sum(-math.log(_softmax(s, 1)[y]) for s, y in zip(STUDENT_LOGITS, labels)) / 2
    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    terms = distillation_loss(student, teacher, torch.tensor(labels), T, alpha)
    assert terms.soft.item() == pytest.approx(T**2 * kl, rel=1e-6)
    assert terms.soft.item() == pytest.approx(2.568247, rel=1e-6)
    assert terms.hard.item() == pytest.approx(ce, rel=1e-6)
    assert terms.hard.item() == pytest.approx(0.265126, rel=1e-5)
    assert terms.total.item() == pytest.approx(alpha * T**2 * kl + (1 - alpha) * ce, rel=1e-6)
    # KL(teacher || student), not the reverse direction
    reverse = soft_target_loss(teacher, student, T)
    assert abs(reverse.item() - terms.soft.item()) > 1e-3


def test_unlabeled_rows_take_no_part_in_the_hard_loss():
    student = torch.tensor(STUDENT_LOGITS * 2)
    teacher = torch.tensor(TEACHER_LOGITS * 2)
    labels = torch.tensor([1, UNLABELED, UNLABELED, 0])
    terms = distillation_loss(student, teacher, labels, 2.0, 0.5)
    assert terms.hard.item() == pytest.approx(F.cross_entropy(student[[0, 3]], labels[[0, 3]]).item(), rel=1e-6)
    soft = soft_target_loss(student, teacher, 2.0).item()
    assert terms.total.item() == pytest.approx(0.5 * soft + 0.5 * terms.hard.item())
    none = distillation_loss(student, teacher, torch.full((4,), UNLABELED), 2.0, 0.5)
    assert none.hard.item() == 0 and none.total.item() == pytest.approx(0.5 * none.soft.item())


def make_task(kind: str, teacher: str = "resnet18", student: str = "mobilenetv3_small") -> DistillationTask:
    torch.manual_seed(0)
    task = DistillationTask(model={"name": student}, data_info=DIGITS_INFO,
                            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    teacher_model = create_model(teacher, num_classes=10, in_chans=1, image_size=8)
    task.attach_teacher(teacher_model, DistillationSettings(kind=kind))
    return task


def _step(task, images, labels):
    with warnings.catch_warnings():  # self.log outside a Trainer only warns
        warnings.simplefilter("ignore")
        return task.training_step((images, labels), 0)


def test_semi_supervised_applies_ce_to_exactly_the_labeled_images():
    task = make_task("semi_supervised")
    seen = []
    task.criterion.register_forward_hook(lambda _module, inputs, _out: seen.append(inputs[1].clone()))
    images = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([3, UNLABELED, 7, UNLABELED, UNLABELED, 1])
    _step(task, images, labels)
    assert [t.tolist() for t in seen] == [[3, 7, 1]]


def test_self_supervised_uses_no_labels_and_matches_the_teacher_on_views():
    task = make_task("self_supervised")
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss = _step(task, images, labels)
    torch.manual_seed(1)
    scrambled = _step(task, images, torch.tensor([9, 9, 5, 0]))
    assert loss.item() == scrambled.item()
    torch.manual_seed(1)
    views = augmented_views(images)
    assert not torch.equal(views, images)
    with torch.no_grad():
        expected = soft_target_loss(task(views), task.teacher(views), 4.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_kind_regresses_the_student_middle_layer_onto_the_teachers():
    task = make_task("feature", teacher="resnet50", student="mobilenetv2")
    # auto = the middle of the five feature_info stages: resnet50 layer2 (512 ch, 4x4 at 8 px), mobilenetv2
    # features.6 (32 ch, 4x4)
    assert task.hint_regressor.weight.shape == (512, 32, 1, 1)
    assert task.settings.hint_layers == {"teacher": "layer2", "student": "features.6"}
    loss = _step(task, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    loss.backward()
    assert task.hint_regressor.weight.grad.abs().sum() > 0
    # a checkpoint of the student restores the regressor without a teacher
    restored = DistillationTask(**{k: task.hparams[k] for k in ("model", "optimizer", "data_info")})
    restored.on_load_checkpoint({"state_dict": task.state_dict()})
    restored.load_state_dict(task.state_dict())
    assert restored.teacher is None and restored.eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_a_vit_teacher_hints_through_its_tokens_laid_out_as_a_map():
    task = make_task("feature", teacher="vit_tiny", student="resnet18")
    # vit_tiny's 14 stages (patch_embed, blocks.0-11, norm): the middle is blocks.6, 192 channels; resnet18 layer2
    assert task.settings.hint_layers == {"teacher": "blocks.6", "student": "layer2"}
    assert task.hint_regressor.weight.shape == (192, 128, 1, 1)
    tokens = torch.randn(2, 1 + 2 * 2, 192)  # class token, then the 2x2 grid of 4x4 patches of an 8x8 digit
    grid = hint_map(task.teacher, "blocks.6", tokens, (8, 8))
    assert grid.shape == (2, 192, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2]) and torch.equal(grid[:, :, 1, 0], tokens[:, 3])
    assert hint_map(task.model, "layer2", grid, (8, 8)) is grid  # a CNN stage is already a map
    loss = _step(task, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and task.hint_regressor.weight.grad.abs().sum() > 0


def test_named_hint_layers_are_checked_before_training():
    info = DataInfo.from_dict(DIGITS_INFO)
    groups = {"norm": {"name": "default"}, "activation": {"name": "default"}, "attention": {"name": "none"}}
    check_hint_layers({"name": "resnet18"}, {"name": "mobilenetv2"}, groups, info,
                      {"teacher": "layer3.0.conv1", "student": "auto"})
    with pytest.raises(UserError, match="the student has no layer 'features.99'.*Its stages: features.1, features.3"):
        check_hint_layers({"name": "resnet18"}, {"name": "mobilenetv2"}, groups, info,
                          {"teacher": "auto", "student": "features.99"})
    with pytest.raises(UserError, match="the teacher layer 'fc' does not output a Tensor"):
        check_hint_layers({"name": "resnet18"}, {"name": "mobilenetv2"}, groups, info,
                          {"teacher": "fc", "student": "auto"})


def test_teacher_stays_frozen_in_eval_mode_outside_the_checkpoint():
    import pytorch_lightning as pl

    from cvlab.data.classification import ClassificationDataModule

    torch.manual_seed(0)
    task = DistillationTask(model={"name": "mobilenetv3_small"}, data_info=DIGITS_INFO,
                            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    teacher = create_model("resnet18", num_classes=10, in_chans=1, image_size=8).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = task.model.features[0][0].weight.clone()
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            modes.append(pl_module.teacher.training)

    data = ClassificationDataModule(source="digits", image_size=8, in_chans=1, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[AttachTeacher(teacher, DistillationSettings()), Spy()])
    trainer.fit(task, datamodule=data)
    assert modes == [False] * 4
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(task.model.features[0][0].weight, student_before)
    assert not any(k.startswith(("teacher", "_teacher")) for k in task.state_dict())


def test_baseline_and_distilled_student_start_from_the_same_weights(tmp_path):
    import pytorch_lightning as pl

    from cvlab.engine import build_datamodule, build_task
    from cvlab.run.distill import model_node, stage_config
    from cvlab.utils.config import compose

    cfg = compose("distill", [*TINY, f"paths.output_dir={tmp_path}"])
    students = {}
    for stage in ("student", "student_kd"):
        stage_cfg = stage_config(cfg, stage, model_node(cfg.student))
        assert "distill" not in stage_cfg and stage_cfg.model.name == "mobilenetv2"
        pl.seed_everything(stage_cfg.seed, verbose=False)
        students[stage] = build_task(stage_cfg, build_datamodule(stage_cfg))
    # the distilled student's task is the registered "distillation" task, the baseline's the run's own
    assert type(students["student"]) is ClassificationTask and type(students["student_kd"]) is DistillationTask
    baseline, distilled = (students[s].model.state_dict() for s in ("student", "student_kd"))
    assert all(torch.equal(baseline[k], distilled[k]) for k in baseline)


def test_teacher_must_be_a_classifier_of_the_same_classes_and_size():
    from cvlab.tasks.base import BaseTask

    info = DataInfo.from_dict(DIGITS_INFO)
    teacher = make_task("offline")
    assert check_teacher(teacher, info, "digits", "t.ckpt") is teacher
    other = DataInfo.from_dict({**DIGITS_INFO, "image_size": 16})
    with pytest.raises(UserError, match="trained on 10 classes at 1x8x8 but data 'big' has 10 classes at 1x16x16"):
        check_teacher(teacher, other, "big", "t.ckpt")
    renamed = DataInfo.from_dict({**DIGITS_INFO, "class_names": list("abcdefghij")})
    with pytest.raises(UserError, match="must agree on classes"):
        check_teacher(teacher, renamed, "letters", "t.ckpt")
    not_a_classifier = BaseTask(model={"name": "yolov3_tiny"}, optimizer={}, data_info=DIGITS_INFO)
    with pytest.raises(UserError, match="teacher.ckpt 't.ckpt' holds a BaseTask; a teacher must be a classifier"):
        check_teacher(not_a_classifier, info, "digits", "t.ckpt")


def test_semi_supervised_stages_share_the_labeled_images_and_the_held_out_splits(tmp_path):
    from cvlab.engine import build_datamodule
    from cvlab.run.distill import stage_config
    from cvlab.utils.config import compose

    cfg = compose("distill", [*TINY, "distill.kind=semi_supervised", "distill.labeled_fraction=0.2",
                              f"paths.output_dir={tmp_path}"])
    views = {stage: build_datamodule(stage_config(cfg, stage, {"name": "resnet18"}))
             for stage in ("teacher", "student", "student_kd")}
    teacher, kd = views["teacher"], views["student_kd"]
    # the teacher and the baseline train on the labeled fifth; the distilled student also sees the rest, unlabeled
    assert len(teacher.train_set) == len(views["student"].train_set) == 251
    labels = np.asarray(kd.train_labels)
    assert len(kd.train_set) == 1257 and (labels != UNLABELED).sum() == 251
    labeled = {kd.train_set[i][0].numpy().tobytes() for i in np.flatnonzero(labels != UNLABELED)}
    assert labeled == {teacher.train_set[i][0].numpy().tobytes() for i in range(len(teacher.train_set))}
    for split in ("val_set", "test_set"):  # every stage is chosen and scored on the same held-out images
        assert [image.numpy().tobytes() for image, _ in getattr(kd, split)] == [
            image.numpy().tobytes() for image, _ in getattr(teacher, split)]


def _cvlab(cwd, *args, timeout=300):
    env = {**os.environ, "CVLAB_RUNS": str(cwd / "runs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cvlab.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


DISTILL = ["distill", "teacher=resnet50", "student=mobilenetv2", *TINY]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """`cvlab distill teacher=resnet50 student=mobilenetv2` as typed, tiny budgets; returns (cwd, run dir, result)."""
    cwd = tmp_path_factory.mktemp("distill")
    result = _cvlab(cwd, *DISTILL)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "runs" / "distillation" / "resnet50-to-mobilenetv2").iterdir()
    return cwd, run, result


def _rows(run) -> dict:
    return {row["stage"]: row for row in json.loads((run / "distill.json").read_text())["rows"]}


def test_cli_distill_writes_three_stages_and_one_table(distilled):
    from cvlab.tasks.base import load_task

    _, run, result = distilled
    for stage in ("teacher", "student", "student_kd"):
        for name in ("weights/best.ckpt", "weights/last.ckpt", "results.csv", "metrics.json", "stage.json"):
            assert (run / stage / name).is_file(), f"{stage}/{name}"
    report = json.loads((run / "distill.json").read_text())
    rows = _rows(run)
    assert list(rows) == ["teacher", "student", "student_kd"]
    assert [rows[s]["model"] for s in rows] == ["resnet50", "mobilenetv2", "mobilenetv2"]
    assert [rows[s]["params"] for s in rows] == [23_519_690, 2_236_106, 2_236_106]  # 10 classes, 1x8x8 digits
    assert rows["teacher"]["flops"] > rows["student"]["flops"] > 0
    assert all(rows[s]["cpu_latency_ms"] > 0 for s in rows)
    for stage, row in rows.items():  # the best-on-val checkpoint, scored on val and on test
        stage_metrics = json.loads((run / stage / "metrics.json").read_text())
        assert (row["val/acc"], row["test/acc"]) == (stage_metrics["val/acc"], stage_metrics["test/acc"])
    assert (report["kind"], report["temperature"], report["alpha"]) == ("offline", 4.0, 0.9)
    assert report["kd_gain"] == pytest.approx(rows["student_kd"]["test/acc"] - rows["student"]["test/acc"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["val/acc"], metrics["test/acc"]) == (rows["student_kd"]["val/acc"], rows["student_kd"]["test/acc"])
    assert metrics["teacher/test/acc"] == rows["teacher"]["test/acc"]
    assert metrics["student/val/acc"] == rows["student"]["val/acc"]
    summary = json.loads((run / "stages.json").read_text())
    assert [(row["stage"], row["skipped"]) for row in summary["stages"]] == [
        ("teacher", False), ("student", False), ("student_kd", False)]
    table = result.stdout[result.stdout.index("knowledge distillation (offline, T=4, alpha=0.9)"):]
    header = next(line for line in table.splitlines() if "model" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "", "model", "test acc", "val acc", "params", "MFLOPs", "CPU ms/image"]
    kd_line = next(line for line in table.splitlines() if "student with KD" in line)
    assert f"{rows['student_kd']['test/acc']:.4f}" in kd_line and "2,236,106" in kd_line
    assert "KD gain over the student alone" in result.stdout
    kd = torch.load(run / "student_kd" / "weights" / "best.ckpt", map_location="cpu", weights_only=False)
    assert kd["distillation"]["temperature"] == 4.0 and kd["cvlab_task"] == "distillation"
    assert not any(k.startswith(("teacher", "_teacher")) for k in kd["state_dict"])
    student = load_task(str(run / "student_kd" / "weights" / "best.ckpt"))  # a classifier on its own
    assert type(student).__name__ == "DistillationTask" and student.teacher is None
    assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_rerun_in_the_run_directory_skips_the_finished_stages(distilled, tmp_path):
    _, run, _ = distilled
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    (killed / "student_kd" / "stage.json").unlink()  # killed while the distilled student trained
    weights = {stage: (killed / stage / "weights" / "best.ckpt").stat().st_mtime_ns for stage in ("teacher", "student")}
    result = _cvlab(tmp_path, *DISTILL, f"hydra.run.dir={killed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished earlier (") == 2  # teacher and student: not trained again
    assert {stage: (killed / stage / "weights" / "best.ckpt").stat().st_mtime_ns for stage in weights} == weights
    assert [row["skipped"] for row in json.loads((killed / "stages.json").read_text())["stages"]] == [
        True, True, False]
    # the distilled student learnt again from the teacher restored from teacher/weights/best.ckpt: same seed, same
    # teacher, so the same figures as the uninterrupted run
    before, after = _rows(run), _rows(killed)
    for key in ("val/acc", "test/acc", "val/f1", "test/f1", "params", "flops", "cpu_latency_ms"):
        assert after["student_kd"][key] == before["student_kd"][key], key
    assert after["teacher"] == before["teacher"] and after["student"] == before["student"]
    kd_metrics = json.loads((killed / "student_kd" / "metrics.json").read_text())
    assert kd_metrics["val/loss"] == json.loads((run / "student_kd" / "metrics.json").read_text())["val/loss"]



def test_a_finished_run_in_its_directory_trains_nothing_and_reports_the_same(distilled, tmp_path, capsys,
                                                                            monkeypatch):
    from cvlab.run import distill
    from cvlab.utils.config import compose

    _, run, _ = distilled
    finished = tmp_path / "finished"
    shutil.copytree(run, finished)
    monkeypatch.setattr(distill, "run_train", lambda *args, **kwargs: pytest.fail("a finished stage trained again"))
    cfg = compose("distill", ["model@teacher=resnet50", "model@student=mobilenetv2", *TINY,
                              f"paths.output_dir={finished}"])
    metrics, tasks = distill.run_distill(cfg)
    assert capsys.readouterr().out.count("finished earlier (") == 3
    assert tasks["teacher"] is None  # no stage that ran needed it: not even restored
    assert _rows(finished) == _rows(run)
    assert metrics == json.loads((run / "metrics.json").read_text())


@pytest.mark.slow  # moved out of make test for its 10-minute budget; make test-slow runs it
def test_sweep_reuses_a_teacher_checkpoint_and_ranks_temperatures(distilled):
    cwd, run, _ = distilled
    teacher = run / "teacher" / "weights" / "best.ckpt"
    teacher_metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    result = _cvlab(cwd, "sweep", f"teacher.ckpt={teacher}", "student=mobilenetv3_small", "distill.baseline=false",
                    "distill.temperature=1,8", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    (board,) = (cwd / "runs" / "distillation" / "sweeps").glob("*/leaderboard.csv")
    lines = board.read_text().splitlines()
    assert lines[0].startswith("rank,job,overrides,val/acc")
    assert sorted(line.split(",")[2] for line in lines[1:]) == ["distill.temperature=1", "distill.temperature=8"]
    for job in ("0", "1"):
        report = json.loads((board.parent / job / "distill.json").read_text())
        assert [row["stage"] for row in report["rows"]] == ["teacher", "student_kd"]
        assert report["teacher_ckpt"] == str(teacher) and report["kd_gain"] is None
        for split in ("val", "test"):  # the same teacher, scored again on this run's splits
            assert report["rows"][0][f"{split}/acc"] == pytest.approx(teacher_metrics[f"{split}/acc"])
        assert not (board.parent / job / "teacher" / "weights").exists()  # loaded, not trained
    assert "leaderboard (val/acc, higher is better)" in result.stdout


def test_teacher_of_other_classes_is_one_line_exit_2_no_run_dir(distilled, tmp_path):
    _, run, _ = distilled
    result = _cvlab(tmp_path, "distill", f"teacher.ckpt={run / 'teacher' / 'weights' / 'best.ckpt'}", "data=shapes",
                    "data.train_size=20", "data.val_size=10", "data.test_size=10", *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stdout
    assert ("teacher.ckpt was trained on 10 classes at 1x8x8 but data 'shapes' has 5 classes at 3x32x32" in lines[0])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("distill.kind=online", "unknown distill.kind 'online'. Did you mean offline"),
    ("teacher.ckpt=missing.ckpt", "teacher.ckpt 'missing.ckpt' does not exist"),
    ("distill.train_fraction=0.001", "distill.train_fraction=0.001 keeps 1 of 1257 training images"),
    ("resume=last.ckpt", "cvlab distill resumes a killed run by running it again in the same run directory"),
    ("data.mixup_alpha=0.2", "data.mixup_alpha mixes the labels of two images, which distillation cannot use"),
])
def test_bad_distill_input_exits_2_and_removes_the_run_dir(tmp_path, capsys, override, expected):
    from cvlab.engine import run_guarded
    from cvlab.run.distill import run_distill
    from cvlab.utils.config import compose

    out = tmp_path / "runs" / "distillation" / "pair" / "time"
    out.mkdir(parents=True)  # as Hydra leaves it
    cfg = compose("distill", [*TINY, override, f"paths.output_dir={out}"])
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(run_distill, cfg)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "runs" / "distillation").exists()
