"""Knowledge distillation: the loss against a hand computation, the frozen teacher, each kind's use of labels, the
FitNets regressor, and `cvlab distill` / `cvlab sweep` end to end with tiny budgets."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvlab.losses.distillation import UNLABELED, distillation_loss, soft_target_loss
from cvlab.models import create_model
from cvlab.tasks.distillation import (
    AttachTeacher,
    DistillationSettings,
    DistillationTask,
    LabelBudgetDataModule,
    augmented_views,
)

DIGITS_INFO = {"num_classes": 10, "in_chans": 1, "image_size": 8, "class_names": [str(d) for d in range(10)]}
TINY = ["trainer=debug", "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
        "data.batch_size=8", "optimizer=sgd", "distill.latency_runs=3"]  # sgd: no optimizer state to save


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread: on a shared 2-core machine a second OpenMP thread mostly waits for the other jobs (up to
    10x slower here), and the subprocesses below get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    task.attach_teacher(create_model(teacher, num_classes=10, in_chans=1, img_size=8), DistillationSettings(kind=kind))
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
    # auto = middle stage: resnet50 layer2 (512 ch, 4x4 at 8 px), mobilenetv2 features.9 (64 ch, 2x2)
    assert task.hint_regressor.weight.shape == (512, 64, 1, 1)
    assert task.settings.hint_layers == {"teacher": "layer2", "student": "features.9"}
    loss = _step(task, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    loss.backward()
    assert task.hint_regressor.weight.grad.abs().sum() > 0
    # a checkpoint of the student restores the regressor without a teacher
    restored = DistillationTask(**{k: task.hparams[k] for k in ("model", "optimizer", "data_info")})
    restored.on_load_checkpoint({"state_dict": task.state_dict()})
    restored.load_state_dict(task.state_dict())
    assert restored.teacher is None and restored.eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_teacher_stays_frozen_in_eval_mode_outside_the_checkpoint():
    import pytorch_lightning as pl

    from cvlab.data.classification import ClassificationDataModule

    torch.manual_seed(0)
    task = DistillationTask(model={"name": "mobilenetv3_small"}, data_info=DIGITS_INFO,
                            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    teacher = create_model("resnet18", num_classes=10, in_chans=1, img_size=8).train()
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

    from cvlab.run.distill import _model_node, stage_config
    from cvlab.run.train import build_task
    from cvlab.utils.config import compose

    cfg = compose("distill", [*TINY, f"paths.output_dir={tmp_path}"])
    students = {}
    for stage in ("student", "student_kd"):
        stage_cfg = stage_config(cfg, stage, _model_node(cfg.student))
        assert stage_cfg.paths.output_dir == str(tmp_path / stage)
        pl.seed_everything(stage_cfg.seed, verbose=False)
        students[stage] = build_task(stage_cfg, DIGITS_INFO)
    assert type(students["student_kd"]) is DistillationTask
    baseline, distilled = (students[s].model.state_dict() for s in ("student", "student_kd"))
    assert all(torch.equal(baseline[k], distilled[k]) for k in baseline)


def test_label_budget_keeps_stratified_fractions_and_hides_the_rest():
    def data(unlabeled):
        dm = LabelBudgetDataModule(source="digits", image_size=8, in_chans=1, train_fraction=0.5,
                                   labeled_fraction=0.2, unlabeled=unlabeled)
        dm.setup()
        return dm.split

    hidden, dropped = data("hide"), data("drop")
    assert len(hidden.val) == len(dropped.val) == 360  # validation untouched
    assert len(hidden.train) == 718  # half of the 1,437 training images
    labels = np.array([hidden.train[i][1] for i in range(len(hidden.train))])
    assert (labels != UNLABELED).sum() == len(dropped.train) == 143
    assert np.bincount(labels[labels != UNLABELED]).min() >= 13  # every class keeps labels (stratified)
    kept = {hidden.train[i][0].numpy().tobytes() for i in np.flatnonzero(labels != UNLABELED)}
    assert kept == {dropped.train[i][0].numpy().tobytes() for i in range(len(dropped.train))}


def _cvlab(cwd, *args, timeout=300):
    env = {**os.environ, "CVLAB_RUNS": str(cwd / "runs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cvlab.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """`cvlab distill teacher=resnet50 student=mobilenetv2` as typed, tiny budgets; returns (cwd, run dir, result)."""
    cwd = tmp_path_factory.mktemp("distill")
    result = _cvlab(cwd, "distill", "teacher=resnet50", "student=mobilenetv2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "runs" / "distillation" / "resnet50-to-mobilenetv2").iterdir()
    return cwd, run, result


def test_cli_distill_writes_three_stages_and_one_table(distilled):
    from cvlab.tasks.base import load_task

    _, run, result = distilled
    for stage in ("teacher", "student", "student_kd"):
        for name in ("weights/best.ckpt", "weights/last.ckpt", "results.csv", "metrics.json"):
            assert (run / stage / name).is_file(), f"{stage}/{name}"
    report = json.loads((run / "distill.json").read_text())
    rows = {row["stage"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "student", "student_kd"]
    assert [rows[s]["model"] for s in rows] == ["resnet50", "mobilenetv2", "mobilenetv2"]
    assert [rows[s]["params"] for s in rows] == [23_519_690, 2_236_106, 2_236_106]  # 10 classes, 1x8x8 digits
    assert rows["teacher"]["flops"] > rows["student"]["flops"] > 0
    assert all(rows[s]["cpu_latency_ms"] > 0 for s in rows)
    for stage, row in rows.items():
        assert row["val/acc"] == json.loads((run / stage / "metrics.json").read_text())["val/acc"]
    assert (report["kind"], report["temperature"], report["alpha"]) == ("offline", 4.0, 0.9)
    assert report["kd_gain"] == pytest.approx(rows["student_kd"]["val/acc"] - rows["student"]["val/acc"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/acc"] == rows["student_kd"]["val/acc"]
    assert metrics["teacher/val/acc"] == rows["teacher"]["val/acc"]
    assert "student with KD" in result.stdout and "KD gain over the student alone" in result.stdout
    kd = torch.load(run / "student_kd" / "weights" / "best.ckpt", map_location="cpu", weights_only=False)
    assert kd["distillation"]["temperature"] == 4.0
    assert not any(k.startswith(("teacher", "_teacher")) for k in kd["state_dict"])
    student = load_task(str(run / "student_kd" / "weights" / "best.ckpt"))  # a classifier on its own
    assert type(student).__name__ == "DistillationTask" and student.teacher is None
    assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_sweep_reuses_a_teacher_checkpoint_and_ranks_temperatures(distilled):
    cwd, run, _ = distilled
    teacher = run / "teacher" / "weights" / "best.ckpt"
    teacher_acc = json.loads((run / "teacher" / "metrics.json").read_text())["val/acc"]
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
        assert report["teacher_ckpt"] == str(teacher)
        assert report["rows"][0]["val/acc"] == pytest.approx(teacher_acc)  # the same teacher, re-validated
        assert not (board.parent / job / "teacher" / "weights").exists()  # loaded, not trained
    assert "leaderboard (val/acc, higher is better)" in result.stdout


def test_teacher_of_other_classes_is_one_line_exit_2_no_run_dir(distilled, tmp_path):
    _, run, _ = distilled
    result = _cvlab(tmp_path, "distill", f"teacher.ckpt={run / 'teacher' / 'weights' / 'best.ckpt'}", "data=shapes",
                    "data.train_size=20", "data.val_size=10", *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stdout
    assert ("teacher.ckpt was trained on 10 classes at 1x8x8 but data 'shapes' has 5 classes at 3x32x32" in lines[0])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("distill.kind=online", "unknown distill.kind 'online'. Did you mean offline"),
    ("teacher.ckpt=missing.ckpt", "teacher.ckpt 'missing.ckpt' does not exist"),
    ("distill.train_fraction=0.001", "distill.train_fraction=0.001 keeps 1 of 1437 training images"),
])
def test_bad_distill_input_exits_2_and_removes_the_run_dir(tmp_path, capsys, override, expected):
    from cvlab.run.common import run_guarded
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
