"""Scale-out: multi-process (DDP) runs from the `cvlab` entry point, sweeps with DDP, the launcher group (SLURM and
submitit_local), trainer.compile / precision / channels_last, and scripts/gpu_check.py.

The end-to-end runs use the CPU: DDP over gloo with two processes (``trainer=ddp_cpu``). They are `slow`: each
starts two or more Python processes that import torch and Lightning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cvlab.utils.config import CONF_DIR, compose

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
QUIET = ["logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "trainer.num_sanity_val_steps=0"]
# Full-batch training on 16 synthetic images: one process with batch 16 and two with batch 8 each see the whole
# training set in every step, so the sampler's order (which DDP's sampler changes) cannot make them differ. GroupNorm
# normalises each image alone, so the per-process batch does not change the forward pass either (BatchNorm would:
# on the CPU torch has no synchronised BatchNorm). 8 validation images split evenly over two processes (no padding
# duplicates), so the synchronised metrics are those of one process.
PARITY = ["model=resnet18", "norm=gn", "data=synthetic", "data.image_size=16", "data.num_classes=4",
          "data.train_size=16", "data.val_size=8"]
PROBE = ["+callbacks.probe._target_=test_scaleout.StepProbe", "+callbacks.probe.path=${paths.output_dir}/probe"]


class StepProbe(pl.Callback):
    """Records, per process, the loss of every training step and every checkpoint the process writes through the
    trainer's checkpoint writer: ``<path>/rank<global rank>.json``. Loaded by the runs below (PYTHONPATH=tests)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.losses: list[float] = []
        self.saves: list[str] = []
        self.rank = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.rank = trainer.global_rank
        writer = trainer.strategy.checkpoint_io
        if getattr(writer, "probed", False):
            return
        save = writer.save_checkpoint

        def recorded(checkpoint, path, storage_options=None):
            self.saves.append(Path(path).name)
            self.dump()
            return save(checkpoint, path, storage_options)

        writer.save_checkpoint, writer.probed = recorded, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.dump()

    def dump(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{self.rank}.json").write_text(json.dumps({"losses": self.losses, "saves": self.saves}))


def probe(run: Path, rank: int) -> dict:
    return json.loads((run / "probe" / f"rank{rank}.json").read_text())


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.rglob(".hydra"))


@pytest.fixture
def probed_cli(cli, monkeypatch):
    """The `cli` fixture with tests/ importable in every process (for StepProbe) and one thread per process."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return cli


# ---------------------------------------------------------------------------------------------- the DDP command
def test_ddp_processes_rerun_this_job_alone_in_its_directory(tmp_path, monkeypatch):
    """What Lightning's launcher runs for the other processes of a sweep job: the job's Hydra entry with the job's own
    overrides in run mode, in the job's directory; not `cvlab sweep` (no such file) with the whole sweep."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from lightning_fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
    from omegaconf import open_dict, read_write

    import __main__
    import cvlab.run.train
    from cvlab.callbacks.rundir import ClaimRunDir

    job_dir = tmp_path / "runs" / "classification" / "sweeps" / "20260101-000000" / "1"
    job_overrides = ["optimizer.lr=0.02", "trainer=ddp_cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = hydra_compose("train", overrides=job_overrides, return_hydra_config=True)
    with read_write(config), open_dict(config):
        config.hydra.runtime.output_dir = str(job_dir)
        config.hydra.runtime.cwd = str(tmp_path)
        config.hydra.overrides.task = job_overrides
    HydraConfig.instance().set_config(config)
    sweep_argv = ["cvlab sweep", "--multirun", "optimizer.lr=0.01,0.02", "trainer=ddp_cpu"]
    monkeypatch.setattr(sys, "argv", list(sweep_argv))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    spec_before = __main__.__spec__
    callback = ClaimRunDir()
    callback.on_job_start(config, task_function=cvlab.run.train.main)
    try:
        command, cwd = _hydra_subprocess_cmd(local_rank=1)
    finally:
        callback.on_job_end(config)
        HydraConfig.instance().cfg = None
    assert command == [sys.executable, "-m", "cvlab.run.train", *job_overrides, f'hydra.run.dir="{job_dir}"',
                       "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    assert cwd == str(tmp_path)
    assert sys.argv == sweep_argv and __main__.__spec__ is spec_before  # the next job starts from the sweep's


def test_a_process_the_launcher_started_leaves_the_command_alone(monkeypatch):
    import __main__
    from cvlab.callbacks.rundir import ClaimRunDir

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(sys, "argv", ["x", "a=1"])
    spec = __main__.__spec__
    ClaimRunDir().on_job_start(None, task_function=None)  # would fail on a None config if it acted
    assert sys.argv == ["x", "a=1"] and __main__.__spec__ is spec


# ---------------------------------------------------------------------------------------------- trainer keys
def test_cvlab_trainer_keys_are_checked_and_kept_from_lightning():
    from cvlab.engine.builders import lightning_trainer_config
    from cvlab.utils.config import check

    checked = check("train", ["trainer.compile=true", "trainer.channels_last=false", "trainer.precision=bf16-mixed"])
    assert checked.cfg.trainer.compile is True and checked.cfg.trainer.channels_last is False
    trainer = lightning_trainer_config(checked.cfg.trainer)
    assert "compile" not in trainer and "channels_last" not in trainer
    assert trainer["precision"] == "bf16-mixed" and trainer["max_epochs"] == 6  # interpolations resolved


def test_bf16_mixed_precision_reaches_the_trainer(train_cfg):
    from pytorch_lightning.plugins.precision import MixedPrecision

    from cvlab.engine.builders import build_trainer

    trainer = build_trainer(train_cfg("trainer.precision=bf16-mixed", "trainer.compile=true"))
    assert trainer.precision == "bf16-mixed"
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.precision == "bf16-mixed"


@pytest.mark.parametrize("overrides", [["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
                                       ["trainer=ddp_cpu"]], ids=["ddp-on-cpu", "ddp_cpu"])
def test_ddp_on_the_cpu_is_two_gloo_processes_without_sync_batchnorm(train_cfg, overrides):
    from pytorch_lightning.strategies import DDPStrategy

    from cvlab.engine.builders import build_trainer, lightning_trainer_config

    cfg = train_cfg(*overrides)
    assert lightning_trainer_config(cfg.trainer)["sync_batchnorm"] is False
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy.root_device.type == "cpu"  # DDP on the CPU communicates over gloo


def test_ddp_keeps_sync_batchnorm_on_gpus():
    from cvlab.engine.builders import lightning_trainer_config

    cfg = compose("train", ["trainer=ddp", "paths.output_dir=unused"])
    assert lightning_trainer_config(cfg.trainer)["sync_batchnorm"] is True
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1 and cfg.trainer.strategy == "ddp"


# ---------------------------------------------------------------------------------------------- channels_last
def _task(train_cfg, *overrides):
    from cvlab.engine.builders import build_datamodule, build_task

    cfg = train_cfg("model=resnet18", "data=synthetic", "data.image_size=16", "data.num_classes=4",
                    "data.train_size=16", "data.val_size=8", *overrides)
    datamodule = build_datamodule(cfg)
    return build_task(cfg, datamodule), datamodule


def _configured(task):
    task.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False)
    task.configure_model()
    return task


def test_channels_last_true_converts_weights_and_images_on_the_cpu(train_cfg):
    torch.manual_seed(0)
    task, datamodule = _task(train_cfg, "trainer.channels_last=true")
    reference = {k: v.clone() for k, v in task.state_dict().items()}
    images, _ = next(iter(datamodule.train_dataloader()))
    task.eval()
    with torch.no_grad():
        expected = task(images)
    _configured(task)
    convs = [m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    spatial = [m for m in convs if m.kernel_size != (1, 1)]  # a 1x1 kernel is laid out alike in both formats
    assert len(spatial) == 17 and not any(m.weight.is_contiguous() for m in spatial)
    received = []
    task.model.register_forward_pre_hook(lambda network, inputs: received.append(inputs[0]))
    with torch.no_grad():
        torch.testing.assert_close(task(images), expected, rtol=1e-4, atol=1e-5)
    assert images.is_contiguous()  # the batch as the loader gave it; the network gets a channels-last copy
    assert received[0].is_contiguous(memory_format=torch.channels_last) and not received[0].is_contiguous()
    assert all(torch.equal(v, reference[k]) for k, v in task.state_dict().items())  # same values, same keys


def test_channels_last_auto_is_for_cnns_on_a_gpu(train_cfg):
    from cvlab.models import create_model
    from cvlab.tasks.base import is_convolutional

    task = _configured(_task(train_cfg)[0])  # auto is the default; this is the CPU
    assert task._channels_last == "auto" and not task._uses_channels_last
    assert all(m.weight.is_contiguous() for m in task.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert is_convolutional(task.model)
    with torch.device("meta"):  # only the parameter shapes count
        vit = create_model("vit_tiny", num_classes=10, image_size=32, in_chans=3)
    assert not is_convolutional(vit)


def test_channels_last_refuses_other_values(train_cfg):
    from cvlab.utils.errors import UserError

    with pytest.raises(UserError, match="trainer.channels_last is true, false or auto"):
        _task(train_cfg, "trainer.channels_last=sometimes")


# ---------------------------------------------------------------------------------------------- compile
def test_compile_compiles_the_network_in_place_once(train_cfg):
    task = _configured(_task(train_cfg, "trainer.compile=true")[0])
    assert task.model._compiled_call_impl is not None  # nn.Module.compile: torch.compile, lazily on the first call
    compiled = task.model._compiled_call_impl
    task.configure_model()  # Lightning calls it again for validate and test
    assert task.model._compiled_call_impl is compiled
    assert not any("_orig_mod" in key for key in task.state_dict())  # checkpoints keep the eager network's keys
    assert _configured(_task(train_cfg)[0]).model._compiled_call_impl is None  # off by default


@pytest.mark.slow
def test_compile_trains_like_eager(train_cfg, tmp_path):
    """trainer.compile=true: the network is compiled (inductor, on the CPU) and its training losses equal eager's.
    Only training runs (fit, no validation): each compiled graph costs tens of seconds here."""
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        task, datamodule = _task(train_cfg, "norm=gn", "data.train_size=32", "data.batch_size=16",
                                 f"trainer.compile={str(compiled).lower()}")
        recorder = StepProbe(str(tmp_path / f"probe-{compiled}"))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                             callbacks=[recorder], enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(task, datamodule=datamodule)
        assert (task.model._compiled_call_impl is not None) is compiled
        losses[compiled] = recorder.losses
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# ---------------------------------------------------------------------------------------------- DDP end to end
@pytest.mark.slow
def test_ddp_on_the_cpu_trains_as_one_process_with_the_global_batch(probed_cli, tmp_path):
    single = probed_cli("train", *QUIET, *PARITY, *PROBE, "trainer.max_epochs=3", "data.batch_size=16",
                        cwd=_fresh(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = probed_cli("train", *QUIET, *PARITY, *PROBE, "trainer.max_epochs=3", "trainer=ddp_cpu",
                     "data.batch_size=8", cwd=_fresh(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    (one,) = run_dirs(tmp_path / "single" / "runs")
    runs = run_dirs(tmp_path / "ddp" / "runs")
    assert len(runs) == 1, runs  # the second process claimed no directory of its own
    run = runs[0]
    assert sorted(p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("metrics.json")) == [
        run.relative_to(tmp_path / "ddp") / "metrics.json"]
    expected = probe(one, 0)["losses"]
    rank0, rank1 = probe(run, 0), probe(run, 1)  # the second process worked in the same directory
    assert len(expected) == len(rank0["losses"]) == len(rank1["losses"]) == 3
    assert rank0["losses"][0] != rank1["losses"][0]  # each process saw its own half of the batch
    global_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert global_losses == pytest.approx(expected, rel=1e-4)
    # Checkpoints: written by rank 0 only, into the one run directory.
    assert rank0["saves"] and set(rank0["saves"]) == {"best.ckpt", "last.ckpt"} and rank1["saves"] == []
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.ckpt", "last.ckpt"]
    # Metrics are synchronised over the processes: the same figures as the single process's.
    single_metrics = json.loads((one / "metrics.json").read_text())
    ddp_metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/loss", "val/acc", "test/loss", "test/acc"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_sweep_with_ddp_runs_each_job_once(probed_cli, tmp_path):
    result = probed_cli("sweep", *QUIET, *PARITY, *PROBE, "trainer=ddp_cpu", "data.batch_size=8",
                        "trainer.max_epochs=1", "optimizer.lr=0.001,0.002")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    sweeps = list((runs / "classification" / "sweeps").iterdir())
    assert len(sweeps) == 1  # the DDP processes did not start sweeps of their own
    jobs = run_dirs(runs)
    assert jobs == [sweeps[0] / "0", sweeps[0] / "1"]  # no run directory outside the sweep either
    for job in jobs:
        assert (job / "metrics.json").is_file()
        assert len(probe(job, 0)["losses"]) == len(probe(job, 1)["losses"]) == 1  # both processes, this job only
    assert len((sweeps[0] / "leaderboard.csv").read_text().splitlines()) == 3


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------------------------------------- launchers
def _composed_with_hydra(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_launcher_slurm_maps_its_settings_to_submitit():
    from cvlab.utils.config import check

    overrides = ["launcher=slurm", "launcher.partition=gpu", "launcher.gpus_per_node=4", "launcher.nodes=2"]
    check("train", overrides)
    cfg = _composed_with_hydra(overrides)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 4, 4, 2)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)  # one process per GPU, ranks from SLURM


def test_launcher_local_is_hydras_basic_launcher_and_slurm_defaults_to_the_clusters_partition():
    from cvlab.utils.config import check
    from cvlab.utils.errors import UserError

    assert _composed_with_hydra(["launcher=local"]).hydra.launcher._target_.endswith("BasicLauncher")
    slurm = _composed_with_hydra(["launcher=slurm"])
    assert slurm.hydra.launcher.partition is None and slurm.hydra.launcher.tasks_per_node == 1
    assert _composed_with_hydra(["launcher=submitit_local"]).hydra.launcher._target_.endswith("LocalLauncher")
    with pytest.raises(UserError, match="unknown launcher option 'slrum'.*slurm"):
        check("train", ["launcher=slrum"])
    with pytest.raises(UserError, match="launcher.partition"):
        check("train", ["launcher=local", "launcher.partition=gpu"])  # a setting of launcher=slurm only


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = cli("sweep", "launcher=submitit_local", *QUIET, "data.batch_size=32", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "optimizer.lr=0.001,0.002")
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "runs" / "classification" / "sweeps").iterdir()
    jobs = run_dirs(tmp_path / "runs")
    assert jobs == [sweep / "0", sweep / "1"]
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert all("test/acc" in m for m in metrics)
    assert (sweep / ".submitit").is_dir()  # the jobs ran through submitit, each in its own process
    overrides = [(job / ".hydra" / "overrides.yaml").read_text() for job in jobs]
    assert "optimizer.lr=0.001" in overrides[0] and "optimizer.lr=0.002" in overrides[1]


# ---------------------------------------------------------------------------------------------- gpu_check
GPU_CHECK = [sys.executable, str(ROOT / "scripts" / "gpu_check.py")]


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    result = subprocess.run([*GPU_CHECK, "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA GPU is visible" in result.stderr
    assert "--dry-run" in result.stderr and not (tmp_path / "x.json").exists()


def test_gpu_check_help_lists_its_options():
    result = subprocess.run([*GPU_CHECK, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(option in result.stdout for option in ("--dry-run", "--out", "--peak-tflops", "--skip"))


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([*GPU_CHECK, "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert report["dry_run"] is True and len(checks) == 11
    assert checks["bisenet bf16 64x128: images/s"]["value"] > 0
    plain = checks["resnet50 bf16 224px: plain PyTorch loop"]
    cvlab = checks["resnet50 bf16 224px: cvlab train"]
    assert plain["value"] > 0 and cvlab["value"] > 0 and "GFLOP/img" in cvlab["note"]
    # resnet50 at 32 px: the FLOP counter's training FLOPs (forward + backward, about 3x forward) per image
    assert float(plain["note"].split("; ")[1].split()[0]) == pytest.approx(3 * 2 * 4.11 * (32 / 224) ** 2, rel=0.1)
    assert checks["resnet50 throughput ratio cvlab / plain"]["value"] == pytest.approx(cvlab["value"] / plain["value"])
    assert checks["yolov3 shapes_det test mAP@0.5"]["value"] is not None
    ddp = checks["DDP smoke: one run dir, one metrics.json"]
    assert ddp["passed"] is True, ddp["note"]
    assert all(check["passed"] is None for name, check in checks.items() if name != ddp["name"])  # not judged
    assert "resnet50 throughput ratio" in result.stdout and "stylegan2 32px shapes" in result.stdout  # the table
    # The step timer counts batches after the warm-up: 2 timed of batch 4 (resnet50), of batch 2 (each YOLO); the GAN
    # (two optimizer steps a batch) all 2 x 2 batches of its 2 epochs after the 1 warm-up, its validations paused.
    timed = {name: json.loads((tmp_path / "work" / f"{name}_steps.json").read_text())
             for name in ("resnet50", "yolov5s", "yolov7", "stylegan2")}
    assert {name: (t["steps"], t["images"]) for name, t in timed.items()} == {
        "resnet50": (2, 8), "yolov5s": (2, 4), "yolov7": (2, 4), "stylegan2": (3, 12)}
    for model in ("yolov5s", "yolov7"):
        speed = checks[f"{model} bf16 64px shapes_det: cvlab train"]
        assert speed["value"] == pytest.approx(timed[model]["images"] / timed[model]["seconds"])
        assert "between steps" in speed["note"]
    assert checks["stylegan2 32px shapes: training images/s"]["value"] == pytest.approx(
        timed["stylegan2"]["images"] / timed["stylegan2"]["seconds"])
    (gan_metrics,) = (tmp_path / "work" / "runs_stylegan2").rglob("metrics.json")
    gan = json.loads(gan_metrics.read_text())
    assert checks["stylegan2 32px shapes: test FID (cvlab features)"]["value"] == gan["test/fid_cvlab"] > 0
    assert checks["stylegan2 32px shapes: test FID / untrained FID"]["value"] == pytest.approx(
        gan["test/fid_cvlab"] / gan["untrained/fid_cvlab"])
