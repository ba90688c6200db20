"""The engine: what every command is built from. The ``cvlab/run/<command>.py`` files import only this package
(and cvlab.utils): builders (datamodule, task, trainer), training and evaluation runs, checkpoint restoring, model
profiling, the stage runner, and run-directory bookkeeping."""
from cvlab.engine.builders import (
    build_datamodule,
    build_task,
    build_trainer,
    checkpoint_datamodule,
    inference_device,
    instantiate_dict,
    quiet_trainer,
)
from cvlab.engine.checkpoints import restore_for_inference, restore_task
from cvlab.engine.ensembles import run_ensemble  # registers strategy=easy_ensemble / balance_cascade
from cvlab.engine.export import ExportCheckFailed, export_checkpoint, open_runner
from cvlab.engine.feature_resampling import run_feature_resampling  # registers sampler.space=features
from cvlab.engine.profiling import LATENCY_THREADS, LATENCY_WARMUP, cpu_profile, describe_model
from cvlab.engine.rcnn import run_rcnn  # registers the R-CNN pipeline that run_train runs for model=rcnn
from cvlab.engine.runs import output_dir, quiet_lightning, run_guarded, say_run_dir, write_json
from cvlab.engine.stages import Column, Stage, StageContext, StageResult, refuse_resume, run_stages
from cvlab.engine.study import CellFailed, cli_cell_runner, plan_study, run_study, study_directory
from cvlab.engine.training import (
    PIPELINES,
    evaluate,
    evaluate_checkpoint,
    finish_run,
    resamples_embeddings,
    run_pipeline,
    run_train,
)
from cvlab.engine.tune import run_tune, tune_overrides
from cvlab.models import list_models, model_task
from cvlab.tasks import (
    anchors,  # the anchor tools `cvlab anchors` prints
    distillation,  # the distillation pieces `cvlab distill` assembles into stages
)
from cvlab.tasks.base import to_plain
from cvlab.utils.config import EVAL_SPLITS as SPLITS

__all__ = [
    "LATENCY_THREADS", "LATENCY_WARMUP", "SPLITS", "Column", "Stage", "StageContext", "StageResult", "anchors",
    "build_datamodule", "build_task", "build_trainer", "checkpoint_datamodule", "cpu_profile", "describe_model",
    "distillation", "evaluate", "evaluate_checkpoint", "finish_run", "inference_device", "instantiate_dict",
    "list_models", "model_task", "output_dir", "quiet_lightning", "quiet_trainer", "restore_for_inference",
    "refuse_resume", "restore_task", "run_guarded", "run_stages", "run_train", "run_tune", "say_run_dir", "to_plain",
    "tune_overrides", "write_json",
    "PIPELINES", "resamples_embeddings", "run_ensemble", "run_feature_resampling", "run_pipeline", "run_rcnn",
    # multi-stage methods of cvlab train (model=rcnn, strategy=easy_ensemble / balance_cascade, sampler.space=features)
    "CellFailed", "cli_cell_runner", "plan_study", "run_study", "study_directory",  # cvlab study
    "ExportCheckFailed", "export_checkpoint", "open_runner",  # cvlab export; cvlab predict of a checkpoint or export
]
