"""`cvlab train sampler=smote sampler.space=features` (any imbalanced-learn sampler: random_under, random_over,
nearmiss, enn, smote, smote_enn): classifier re-training in the embedding space, the decoupling recipe of Kang et al.
2020 ("Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR; its cRT), with the sampler's
selection or synthesis done by imbalanced-learn on the embeddings instead of the images. Three stages of the engine's
stage runner (:func:`~cvlab.engine.stages.run_stages`), each in its own folder of the run directory:

1. ``encoder``: the network that gives the embeddings. By default an ordinary training run of the configured model
   (:func:`~cvlab.engine.training.run_train`: weights/, results.csv, metrics.json) at the run's settings without a
   sampler, the paper's representation learning with instance-balanced sampling. With ``sampler.encoder=PATH`` a
   cvlab classification checkpoint instead (read safely: :func:`~cvlab.engine.checkpoints.restore_task`), scored on
   this run's val and test splits; its classes and input size must be the data's and its model the run's
   (``model=``; the checkpoint's own model, norm, activation and attention settings are used).
2. ``features``: the embeddings, the input of the encoder's linear classifier head (:func:`classifier_head`), of the
   training images in eval mode through the evaluation transform (no augmentation) and of the validation images,
   saved as ``embeddings.npz``. The training embeddings are resampled by
   :meth:`~cvlab.data.imbalance.Resampler.resample` with the sampler's method, settings and ``sampling_strategy``
   (imbalanced-learn's meaning) exactly as in pixel space, seeded by the run's seed.
3. ``head``: the head re-initialised and re-trained alone on the resampled embeddings, the rest of the network frozen
   (it never runs in training, so its weights and BatchNorm statistics stay the encoder's): ``sampler.head_epochs``
   epochs of the run's loss and optimizer (``optimizer=``, at its constant rate: no schedule) in shuffled batches of
   ``data.batch_size`` drawn from the run's seed, keeping the epoch whose validation embeddings score best by the
   task's monitor (``val/acc``). The whole model is then scored on val and test by the classification task (the
   figures of every classification run: accuracy, balanced accuracy, macro-F1, G-mean, the many / medium / few
   recalls) and saved as ``head/weights/best.ckpt`` (`cvlab eval` restores it).

The final table has a row per stage; the run's ``metrics.json`` holds the re-trained model's figures (``val/acc``
ranks it in sweeps and studies, ``test/*`` are what `cvlab study` compares) and the encoder's as ``encoder/<key>``.
Everything that can be wrong (the task, the data, the encoder file, a model without a linear head, the sampler's
settings against the labels) is refused before the encoder trains. A killed run resumes: run the same command again
with ``hydra.run.dir=<its run directory>``; a changed sampler setting runs ``features`` and ``head`` again, a changed
``head_epochs`` only ``head``.

Hand-written: the search for the head, and its re-training loop (a linear layer on a tensor of embeddings, a fit
too small for a Lightning run of its own); imbalanced-learn selects and synthesises.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cvlab.callbacks.checkpoint import keep_weights_only
from cvlab.data.imbalance import FEATURE_SETTINGS, Resampler, check_resampling, vector_budget
from cvlab.engine.builders import build_datamodule, build_task, inference_device, quiet_trainer
from cvlab.engine.checkpoints import restore_task
from cvlab.engine.runs import output_dir, quiet_lightning, say_run_dir, write_json
from cvlab.engine.stages import Column, Stage, StageContext, refuse_resume, refuse_several_devices, run_stages
from cvlab.engine.training import (
    FEATURE_PIPELINE,
    evaluate,
    evaluate_checkpoint,
    finish_run,
    register_pipeline,
    run_train,
)
from cvlab.metrics.classification import frequency_groups, score_probabilities
from cvlab.tasks.base import to_plain
from cvlab.tasks.classification import ClassificationTask
from cvlab.utils.config import read_option
from cvlab.utils.console import console
from cvlab.utils.errors import UserError
from cvlab.utils.plugins import instantiate_plugin

CLASSIFICATION_DATA = "cvlab.data.classification.ClassificationDataModule"
EMBEDDINGS = "embeddings.npz"  # train_features float32[M, D], train_labels int64[M] (resampled); val_* (as they are)
# The groups an encoder checkpoint's network is built from: the head stage rebuilds it from them.
NETWORK_GROUPS = ("model", "norm", "activation", "attention", "init")
# The encoder's figures that the run's metrics.json repeats (as encoder/<key>).
ENCODER_KEYS = ("val/acc", "test/acc", "test/balanced_acc", "test/f1", "test/recall_few")
COLUMNS = (
    Column("trained_on", "trained on", justify="left"),
    Column("val/acc", "val acc", "{:.4f}"),
    Column("test/acc", "test acc", "{:.4f}"),
    Column("test/balanced_acc", "test bal. acc", "{:.4f}"),
    Column("test/f1", "test macro-F1", "{:.4f}"),
    Column("test/recall_few", "test few recall", "{:.4f}"),
)


# ------------------------------------------------------------------------------------------------- the head
def classifier_head(model: nn.Module, num_classes: int, in_chans: int, image_size: int) -> nn.Linear | None:
    """The ``nn.Linear`` whose output ``model`` returns as its logits ``Tensor[N, num_classes]`` (ResNet's ``fc``,
    MobileNet's last classifier layer, ViT's ``head``), found by one eval-mode forward pass of two random images;
    None when the logits are no linear layer's own output (Darknet-19's 1x1-convolution head)."""
    linears = [module for module in model.modules()
               if isinstance(module, nn.Linear) and module.out_features == num_classes]
    outputs: dict[int, torch.Tensor] = {}
    hooks = [linear.register_forward_hook(lambda module, inputs, output: outputs.__setitem__(id(module), output))
             for linear in linears]
    device = next(model.parameters()).device
    images = torch.rand(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    training = model.training
    try:
        with torch.inference_mode():
            logits = model.eval()(images.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return next((linear for linear in linears if outputs.get(id(linear)) is logits), None)


def find_head(model: nn.Module, info, model_name: str) -> nn.Linear:
    """:func:`classifier_head`, or a UserError for a model without one."""
    head = classifier_head(model, info.num_classes, info.in_chans, info.image_size)
    if head is None:
        raise UserError(f"model={model_name} gives its logits through no linear classifier head, which "
                        "sampler.space=features re-trains on the resampled embeddings (its input); use a model with "
                        "one (resnet18, mobilenetv2, vit_tiny, ...) or sampler.space=pixels.")
    return head


@dataclass
class Embeddings:
    """Embeddings ``float32[N, D]`` with their labels ``int64[N]``."""

    features: np.ndarray
    labels: np.ndarray


@torch.inference_mode()
def extract_embeddings(model: nn.Module, head: nn.Linear, loader, device: torch.device) -> Embeddings:
    """The input of ``head`` (a layer of ``model``) for every batch of ``loader``, ``model`` in eval mode."""
    captured, labels = [], []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    model.to(device).eval()
    try:
        for images, targets in loader:
            model(images.to(device))
            labels.append(torch.as_tensor(targets))
    finally:
        hook.remove()
    return Embeddings(torch.cat(captured).numpy(), torch.cat(labels).numpy().astype(np.int64))


@dataclass(frozen=True)
class HeadMonitor:
    """How :func:`retrain_head` rates an epoch: the task's ``monitor`` (``val/<key>``: a figure of
    :func:`~cvlab.metrics.classification.score_probabilities`, or ``loss``, the ``criterion``'s) on the validation
    embeddings, better when higher (``mode`` max) or lower (min)."""

    monitor: str
    mode: str
    criterion: nn.Module
    num_classes: int
    groups: dict

    def __post_init__(self):
        keys = self.keys()
        if not self.monitor.startswith("val/") or self.key not in keys:
            raise UserError(f"task.monitor={self.monitor}: the re-trained head's epoch is chosen on the validation "
                            f"embeddings by one of {', '.join(f'val/{name}' for name in keys)}.")

    @property
    def key(self) -> str:
        return self.monitor.removeprefix("val/")

    def keys(self) -> list[str]:
        figures = score_probabilities(torch.eye(self.num_classes), torch.arange(self.num_classes), self.num_classes,
                                      self.groups)
        return ["loss", *(name for name in figures if name != "recall_per_class")]

    @torch.inference_mode()
    def score(self, head: nn.Linear, val: Embeddings) -> float:
        logits = head.eval()(torch.from_numpy(val.features).to(head.weight.device))
        labels = torch.from_numpy(val.labels).to(logits.device)
        if self.key == "loss":
            return float(self.criterion(logits, labels))
        return float(score_probabilities(logits.softmax(-1).cpu(), labels.cpu(), self.num_classes,
                                         self.groups)[self.key])

    def better(self, value: float, best: float) -> bool:
        return value > best if self.mode == "max" else value < best


def retrain_head(head: nn.Linear, train: Embeddings, val: Embeddings, criterion: nn.Module, optimizer_cfg: dict,
                 epochs: int, batch_size: int, seed: int, monitor: HeadMonitor) -> tuple[list[float], int]:
    """Re-initialises ``head`` (seeded) and trains it alone on ``train`` for ``epochs`` epochs of shuffled batches
    (the order drawn from ``seed``) with ``criterion`` and the ``optimizer_cfg`` optimizer (the optimizer group's
    partial config); ``monitor`` rates each epoch on ``val``. ``head`` ends with the weights of its best epoch;
    returns each epoch's score and the best epoch (1-based)."""
    device = head.weight.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    optimizer = instantiate(optimizer_cfg)(head.parameters())
    features = torch.from_numpy(train.features).to(device)
    labels = torch.from_numpy(train.labels).to(device)
    order = torch.Generator().manual_seed(seed)
    history, best, best_state, best_epoch = [], None, None, 0
    for epoch in range(1, epochs + 1):
        head.train()
        for batch in torch.randperm(len(labels), generator=order).split(batch_size):
            batch = batch.to(device)
            loss = criterion(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        value = monitor.score(head, val)
        history.append(value)
        if best is None or monitor.better(value, best):
            best, best_state, best_epoch = value, copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    return history, best_epoch


# ------------------------------------------------------------------------------------------------- the checks
@dataclass(frozen=True)
class FeatureSettings:
    """The feature-space settings of the sampler config: the imbalanced-learn sampler's own (``sampler``, for
    :class:`~cvlab.data.imbalance.Resampler`), ``encoder`` (a checkpoint path or None) and ``head_epochs``."""

    sampler: dict
    encoder: Path | None
    head_epochs: int

    @property
    def method(self) -> str:
        return str(self.sampler["method"])


def check_feature_resampling(cfg: DictConfig) -> FeatureSettings:
    """The settings, and what they combine with, one line each, before anything is read or trained."""
    sampler = to_plain(cfg.sampler)
    check_resampling(sampler)
    method = sampler["method"]
    task = str(cfg.task.name)
    if task != "classification":
        raise UserError(f"sampler={method} sampler.space=features re-trains a classifier's head; task={task} has "
                        "none. Use a classification model (`cvlab list model`), or sampler.space=pixels.")
    if str(cfg.data.get("_target_")) != CLASSIFICATION_DATA:
        raise UserError(f"sampler={method} sampler.space=features resamples classification data's training split; "
                        f"data={cfg.data.name} is read by {cfg.data.get('_target_')}.")
    refuse_resume(cfg, f"sampler={method} sampler.space=features", "runs/classification/<model>/<time>")
    refuse_several_devices(cfg, f"sampler={method} sampler.space=features", "stages")
    encoder = sampler.get("encoder")
    return FeatureSettings({key: value for key, value in sampler.items() if key not in FEATURE_SETTINGS},
                           Path(encoder).expanduser() if encoder else None, int(sampler.get("head_epochs", 10)))


def check_encoder(task, info, cfg: DictConfig, path: Path) -> ClassificationTask:
    """``task`` (restored from ``sampler.encoder=path``) if it can encode the run's data for the run's model."""
    if not isinstance(task, ClassificationTask):
        raise UserError(f"sampler.encoder {str(path)!r} holds a {task.name} task; the encoder must be a classifier.")

    def shape(data) -> str:
        return f"{data.num_classes} classes ({', '.join(map(str, data.class_names[:4]))}" \
               f"{', ...' if data.num_classes > 4 else ''}) of {data.in_chans}x{data.image_size}x{data.image_size}"

    trained = task.data_info
    if (trained.num_classes, trained.in_chans, trained.image_size, list(trained.class_names)) != (
            info.num_classes, info.in_chans, info.image_size, list(info.class_names)):
        raise UserError(f"sampler.encoder was trained on {shape(trained)} but data={cfg.data.name} has {shape(info)}; "
                        "the encoder's head re-trains on this data's classes at its input size.")
    name = str(task.hparams.model["name"])
    if name != str(cfg.model.name):
        raise UserError(f"sampler.encoder holds a {name}, but the run's model is {cfg.model.name}: add model={name}.")
    return task


def base_config(cfg: DictConfig, encoder: ClassificationTask | None) -> DictConfig:
    """The stages' train config: the run's groups without a sampler (the encoder trains, and every stage reads the
    data, as they are), and a given encoder's own network groups (:data:`NETWORK_GROUPS`)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.update(sampler=read_option("sampler", "none"), resume=None)
    if encoder is not None:
        plain.update({group: copy.deepcopy(encoder.hparams[group]) for group in NETWORK_GROUPS
                      if encoder.hparams.get(group) is not None})
    return OmegaConf.create(plain)


# ------------------------------------------------------------------------------------------------- the stages
def _load_embeddings(context: StageContext) -> tuple[Embeddings, Embeddings]:
    try:
        with np.load(context.out_dir / EMBEDDINGS, allow_pickle=False) as saved:
            return (Embeddings(saved["train_features"], saved["train_labels"]),
                    Embeddings(saved["val_features"], saved["val_labels"]))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read the embeddings in {context.out_dir} ({error}); delete its stage.json to "
                        "extract them again") from None


def _row(metrics: dict, trained_on: str) -> dict:
    return {**{key: value for key, value in metrics.items() if "/" in key or key in ("epochs", "train_time_s",
                                                                                    "params")},
            "trained_on": trained_on}


@register_pipeline(FEATURE_PIPELINE)
def run_feature_resampling(cfg: DictConfig) -> tuple[dict, dict]:
    """Runs the encoder, features and head stages per ``cfg`` (see the module docstring); returns (the re-trained
    model's metrics and the encoder's, {"task": the re-trained model's task when the head stage ran or was restored,
    "stages": {name: StageResult}})."""
    quiet_lightning()
    settings = check_feature_resampling(cfg)
    out = output_dir(cfg)
    say_run_dir(out, "start")
    seed = int(cfg.seed)
    loaded = None
    if settings.encoder is not None:
        loaded = restore_task(settings.encoder, "sampler.encoder", "best.ckpt")
    base = base_config(cfg, loaded)
    data = build_datamodule(base)  # the run's data, read once: the checks, the embeddings, the evaluations
    info = data.info
    if loaded is not None:
        check_encoder(loaded, info, cfg, settings.encoder)
    labels = np.asarray(data.train_labels, dtype=np.int64)
    probe = build_task(base, data)  # the network the head stage rebuilds: its head, the loss, the monitor
    head = find_head(probe.model, info, str(base.model.name))
    resampler: Resampler = instantiate_plugin(settings.sampler, labels=labels, seed=seed)
    vector_budget(len(labels), (head.in_features,), settings.method, "features")
    # imbalanced-learn checks its settings and the strategy against the labels before the encoder trains: a dry run
    # on one constant feature costs nothing beside the training (its warnings about such data are not the run's).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resampler.resample(np.zeros((len(labels), 1), dtype=np.float32))
    monitor = HeadMonitor(str(cfg.task.monitor), str(cfg.task.mode), probe.criterion, info.num_classes,
                          frequency_groups(info.class_counts))
    device = inference_device("cpu" if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else "auto")
    method = settings.method

    def train_encoder(context: StageContext):
        metrics, objects = run_train(context.config)
        return _row(metrics, f"{len(labels):,} images, no sampler"), objects["task"]

    def score_encoder(context: StageContext):
        metrics = {}
        for split in ("val", "test"):
            metrics.update(evaluate_checkpoint(loaded, data, cfg.trainer, context.out_dir, split))
        write_json(context.out_dir / "metrics.json", {**metrics, "ckpt": str(settings.encoder)})
        return _row(metrics, f"sampler.encoder ({settings.encoder.name})"), loaded

    def features(context: StageContext):
        encoder = context.output("encoder").model
        encoder_head = find_head(encoder, info, str(base.model.name))
        train = extract_embeddings(encoder, encoder_head, data.train_eval_dataloader(), device)
        val = extract_embeddings(encoder, encoder_head, data.val_dataloader(), device)
        if not np.array_equal(train.labels, labels):
            raise RuntimeError("the training embeddings are not in the order of the training labels")
        resampled, resampled_labels, _ = resampler.resample(train.features)
        train = Embeddings(np.ascontiguousarray(resampled, dtype=np.float32), resampled_labels.astype(np.int64))
        np.savez(context.out_dir / EMBEDDINGS, train_features=train.features, train_labels=train.labels,
                 val_features=val.features, val_labels=val.labels)
        counts = np.bincount(train.labels, minlength=info.num_classes).tolist()
        lowered = f"; {resampler.lowered}" if resampler.lowered else ""
        console.print(f"sampler {method} (imbalanced-learn, seed {seed}{lowered}) on {train.features.shape[1]}-value "
                      f"embeddings: {len(labels)} -> {len(train.labels)} training embeddings, "
                      f"{', '.join(map(str, counts))} per class", highlight=False)
        row = {"train_images": len(labels), "resampled": len(train.labels), "dimension": int(train.features.shape[1]),
               "resampled_per_class": dict(zip(map(str, info.class_names), counts)), "lowered": resampler.lowered,
               "trained_on": f"{len(labels):,} -> {len(train.labels):,} embeddings ({method})"}
        return row, (train, val)

    def retrain(context: StageContext):
        train, val = context.output("features")
        task = build_task(context.config, data)
        task.model.load_state_dict(context.output("encoder").model.state_dict())
        task.to(device)
        task_head = find_head(task.model, info, str(base.model.name))
        history, best_epoch = retrain_head(task_head, train, val, task.criterion, to_plain(base.optimizer),
                                           settings.head_epochs, int(data.hparams.batch_size), seed, monitor)
        trainer = quiet_trainer(context.config.trainer, context.out_dir)
        metrics = evaluate(trainer, task, data, "val")
        metrics.update(evaluate(trainer, task, data, "test"))
        ckpt = context.out_dir / "weights" / "best.ckpt"
        # A save killed half-way is no risk: the stage has no record yet, and a rerun starts it from an empty folder.
        trainer.save_checkpoint(ckpt, weights_only=True)
        keep_weights_only(ckpt, monitor.monitor, monitor.mode, metrics.get(monitor.monitor))
        metrics.update(params=sum(p.numel() for p in task.model.parameters()),
                       head_params=sum(p.numel() for p in task_head.parameters()))
        finish_run(task, context.out_dir, "metrics.json", metrics, title=f"{base.model.name} on {cfg.data.name}, "
                   f"head re-trained on {method} embeddings (best epoch on val)", extra={"best_ckpt": str(ckpt)})
        row = {**_row(metrics, f"{len(train.labels):,} embeddings, {settings.head_epochs} epochs"),
               "head_params": metrics["head_params"], "best_epoch": best_epoch,
               "head_history": {"monitor": monitor.monitor, "per_epoch": history}, "best_ckpt": str(ckpt)}
        return row, task

    model = str(base.model.name)
    if loaded is None:
        encoder_stage = Stage("encoder", train_encoder, config=base, label="encoder (no sampler)",
                              title=f"encoder: {model} trained at the run's settings, without a sampler")
    else:
        stat = settings.encoder.stat()
        encoder_stage = Stage("encoder", score_encoder, config=base, label="encoder (sampler.encoder)",
                              params={"ckpt": str(settings.encoder.resolve()), "size": stat.st_size,
                                      "mtime_ns": stat.st_mtime_ns},
                              title=f"encoder: {settings.encoder}", restore=lambda context: loaded)
    stages = [
        encoder_stage,
        Stage("features", features, needs=("encoder",), label=f"embeddings resampled ({method})",
              params={"data": to_plain(base.data), "seed": seed, "sampler": settings.sampler},
              title=f"features: the training embeddings resampled by {method} (imbalanced-learn)",
              restore=_load_embeddings),
        Stage("head", retrain, needs=("encoder", "features"), config=base, label="head re-trained",
              params={"head_epochs": settings.head_epochs},
              title=f"head: re-trained alone on the resampled embeddings, {settings.head_epochs} epochs"),
    ]
    results = run_stages(stages, out, COLUMNS, title=f"classifier re-training on {method} embeddings: {model} on "
                                                     f"{cfg.data.name}")
    head_row, encoder_row = results["head"].metrics, results["encoder"].metrics
    metrics = {key: value for key, value in head_row.items() if "/" in key}
    metrics.update({f"encoder/{key}": encoder_row[key] for key in ENCODER_KEYS if key in encoder_row},
                   params=head_row.get("params"), head_params=head_row.get("head_params"),
                   best_epoch=head_row.get("best_epoch"), resampled=results["features"].metrics.get("resampled"))
    write_json(out / "metrics.json", metrics)
    console.print(f"the re-trained model: cvlab eval ckpt={head_row.get('best_ckpt')}", highlight=False)
    say_run_dir(out, "end")
    return metrics, {"task": results["head"].output, "stages": results}


__all__ = ["Embeddings", "FeatureSettings", "check_feature_resampling", "classifier_head", "extract_embeddings",
           "HeadMonitor", "retrain_head", "run_feature_resampling"]
