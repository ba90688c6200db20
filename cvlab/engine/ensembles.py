"""`cvlab train strategy=easy_ensemble|balance_cascade`: the model-level imbalance methods of Liu, Wu & Zhou 2009
("Exploratory Undersampling for Class-Imbalance Learning", IEEE TSMC-B 39(2)), with the configured model (any zoo
CNN) as the member, on the engine's stage runner (:func:`~cvlab.engine.stages.run_stages`).

The run directory holds one stage per member, ``member1/`` ... ``member<T>/``, each an ordinary training run
(:func:`~cvlab.engine.training.run_train`: weights/, results.csv, metrics.json) on its own balanced draw of the
training split (:class:`~cvlab.data.balanced.BalancedDrawDataModule`: every image of the smallest class and as many
of each other class, imbalanced-learn's ``RandomUnderSampler``), with its own seed (member t: ``seed + t - 1``, its
draw, initialisation and data order); the split itself (``data.seed``) is the run's for every member. Each member's
softmax probabilities on the whole validation and test splits (whatever ``trainer.limit_test_batches``) are saved
(``predictions.npz``), and a last stage, ``ensemble/``, averages them (:func:`average_probabilities`; the paper's
members vote through their summed AdaBoost scores, here the members are CNNs and their probabilities are averaged,
for both methods) and scores the average with
:func:`~cvlab.metrics.classification.score_probabilities`, the figures of every classification run: accuracy,
balanced accuracy, macro-F1, G-mean and, for a long tail, the many / medium / few recalls. The final table has a
row per member (its own probabilities scored alike) and the ensemble's row; the run's ``metrics.json`` holds the
ensemble's figures (``val/acc`` ranks it in sweeps and studies) and each member's accuracy.

- **easy_ensemble** (the paper's Algorithm 1): the T members are independent draws from the whole split.
- **balance_cascade** (Algorithm 2): member t draws from a pool that shrinks. After member t trains, every majority
  class c (each class with more training images than the smallest, the multi-class reading of the paper's
  majority N) keeps in the pool only its images that member t finds hardest: its threshold θ_c on the member's
  probability of the true class is set so that the false-positive rate, the share of the class's pool not
  classified as c at θ_c (kept), is ``f_c``, and the images above θ_c (classified correctly, one class against
  the rest) are dropped (:func:`shrink_pool`). The paper's ``f = (|P| / |N|)^(1 / (T - 1))`` brings the majority
  down to the minority's size after T - 1 members; per class, ``f_c = (n_min / n_c)^(1 / (T - 1))``
  (:func:`cascade_rates`), or ``strategy.fpr`` for every class. A pool never keeps fewer than ``n_min`` images
  of a class, so every member can draw a balanced set. Each member's row logs the majority pool it drew from
  (``majority_pool``, per class in its stage.json, with the thresholds it set); its pool and the next member's are
  saved as ``pool.npy`` / ``next_pool.npy`` (training-split indices).

The budget of a member (``strategy.budget``):

- ``steps``: as many optimiser steps as a plain run on the whole training split. The member's epochs
  are as long as the split (as many draws from its balanced subset as the split has images, each image about
  ``n / m`` times an epoch; :class:`~cvlab.data.balanced.RepeatedDrawSampler`), so the same ``trainer.max_epochs``
  gives the plain run's batches per epoch, learning-rate schedule (per epoch or per step) and validation points. A
  study row of an ensemble then compares methods at equal training per member, as a row of any other method does.
- ``epochs`` (the default): the run's epochs on the draw alone (the paper's members): on digits_lt, whose smallest
  class has 2 training images, a member's 20 images are one batch, 6 optimiser steps in 6 epochs against a plain
  run's 30. It is the default because it scored better there: with ``steps`` every member memorises its 20 images
  (train accuracy 1.0 after an epoch) and the ensembles fall to balanced accuracy 0.42 / 0.31 (EasyEnsemble /
  BalanceCascade, 3 seeds) from 0.54 / 0.63; the short budget acts as early stopping. A member is short of data,
  not of steps.

Each member's row records its ``steps`` (Lightning's ``global_step``).

imbalanced-learn deprecated its ``BalanceCascade`` sampler in 0.4 and removed it in 0.6 (and its
``EasyEnsembleClassifier`` bags AdaBoost learners of feature vectors, not networks), so both the cascade (threshold,
pool) and the members as training runs are cvlab's own, written here; the draws are imbalanced-learn's.

Everything that can be wrong (the setting, the task, a sampler, the data) is refused before the first member
trains. A killed run resumes: run the same command again with ``hydra.run.dir=<its run directory>``; finished
members are skipped (an EasyEnsemble member does not depend on T: ``strategy.members=6`` after 4 trains two more).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cvlab.data.balanced import majority_classes
from cvlab.engine.builders import build_datamodule, inference_device
from cvlab.engine.runs import output_dir, quiet_lightning, say_run_dir, write_json
from cvlab.engine.stages import Column, Stage, StageContext, refuse_resume, refuse_several_devices, run_stages
from cvlab.engine.training import register_pipeline, run_train
from cvlab.metrics.classification import frequency_groups, score_probabilities
from cvlab.utils.console import class_recall_table, console
from cvlab.utils.errors import UserError, suggest
from cvlab.utils.validate import check_choice, check_number

METHODS = {"easy_ensemble": "EasyEnsemble", "balance_cascade": "BalanceCascade"}
SETTINGS = {"easy_ensemble": ("members", "budget"), "balance_cascade": ("members", "fpr", "budget")}
BUDGETS = ("steps", "epochs")  # a member's training: a plain run's optimiser steps, or the run's epochs on its draw
SPLITS = ("val", "test")
CLASSIFICATION_DATA = "cvlab.data.classification.ClassificationDataModule"
MEMBER_DATA = "cvlab.data.balanced.BalancedDrawDataModule"
PREDICTIONS = "predictions.npz"  # <split>_probabilities Tensor[N, C] and <split>_labels Tensor[N]
POOL, NEXT_POOL = "pool.npy", "next_pool.npy"
# The row figures that the run's metrics.json repeats per member.
MEMBER_KEYS = ("val/acc", "test/acc", "test/balanced_acc", "test/f1")
COLUMNS = (
    Column("train_images", "train images", "{:,}"),
    Column("steps", "steps", "{:,}"),
    Column("majority_pool", "majority pool", "{:,}"),
    Column("val/acc", "val acc", "{:.4f}"),
    Column("test/acc", "test acc", "{:.4f}"),
    Column("test/balanced_acc", "test bal. acc", "{:.4f}"),
    Column("test/f1", "test macro-F1", "{:.4f}"),
    Column("test/recall_few", "test few recall", "{:.4f}"),
)


@dataclass(frozen=True)
class EnsembleSettings:
    """The ``strategy`` group's settings: ``method`` (easy_ensemble | balance_cascade), ``members`` T >= 2,
    BalanceCascade's ``fpr`` (None: the paper's per-class rate, :func:`cascade_rates`) and a member's ``budget``
    (:data:`BUDGETS`, the module docstring)."""

    method: str
    members: int
    fpr: float | None = None
    budget: str = "epochs"

    @property
    def cascade(self) -> bool:
        return self.method == "balance_cascade"

    def rates(self, class_counts: Sequence[int]) -> np.ndarray:
        """BalanceCascade's share of its pool that each class keeps after a member (:func:`cascade_rates`)."""
        return cascade_rates(class_counts, self.members, self.fpr)


def check_strategy(cfg: DictConfig) -> EnsembleSettings:
    """The ``strategy`` settings and what they combine with, one line each, before anything is read or trained."""
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
    method = str(strategy.get("name"))
    if method not in METHODS:
        raise UserError(f"strategy={method} is no ensemble method.{suggest(method, METHODS)} Methods: "
                        f"{', '.join(METHODS)} (`cvlab list strategy`).")
    known = SETTINGS[method]
    for key in strategy:
        if key not in ("name", *known):
            raise UserError(f"strategy={method} has no setting {key!r}.{suggest(str(key), known)} Its settings: "
                            f"{', '.join(known)}.")
    members, fpr, budget = strategy.get("members"), strategy.get("fpr"), strategy.get("budget", "epochs")
    check_number("strategy.members", members, 2, integer=True, hint=" (T: an ensemble of one is a single run)")
    check_choice("strategy.budget", budget, BUDGETS)
    check_number("strategy.fpr", fpr, 0, 1, low_open=True, high_open=True, optional=True,
                 hint=" (the share of each majority class's pool a member keeps; null: the paper's)")
    task = str(cfg.task.name)
    if task != "classification":
        raise UserError(f"strategy={method} combines classifiers' class probabilities; task={task} is not "
                        "classification. Use a classification model (`cvlab list model`) or strategy=none.")
    sampler = cfg.get("sampler")
    if sampler is not None and sampler.get("name", "none") != "none":
        raise UserError(f"strategy={method} gives every member its own balanced draw of the training images; "
                        f"sampler={sampler.get('name')} would resample them again. Leave sampler=none.")
    refuse_resume(cfg, f"strategy={method}", "runs/classification/<model>/<time>")
    if str(cfg.data.get("_target_")) != CLASSIFICATION_DATA:
        raise UserError(f"strategy={method} draws from classification data's training split; data={cfg.data.name} "
                        f"is read by {cfg.data.get('_target_')}.")
    refuse_several_devices(cfg, f"strategy={method}", "members", " (trainer=default)")
    return EnsembleSettings(method, int(members), None if fpr is None else float(fpr), budget)


# ------------------------------------------------------------------------------------------------- the method
def average_probabilities(probabilities: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """The members' class probabilities ``Tensor[N, C]`` each, averaged: ``Tensor[N, C]``."""
    if not probabilities:
        raise ValueError("an ensemble needs at least one member's probabilities")
    return torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in probabilities]).mean(0)


def cascade_rates(class_counts: Sequence[int], members: int, fpr: float | None = None) -> np.ndarray:
    """The share ``f_c`` of its pool that each class keeps after a member (``float64[C]``): 1 for the classes of the
    smallest count; for the majority, ``fpr``, or by default the paper's ``(n_min / n_c)^(1 / (T - 1))``, which
    takes class c from ``n_c`` down to ``n_min`` images in the ``T - 1`` members that shrink the pool."""
    counts = np.asarray(class_counts, dtype=np.float64)
    rates = np.ones(len(counts))
    majority = majority_classes(class_counts)
    rates[majority] = fpr if fpr is not None else (counts.min() / counts[majority]) ** (1 / (members - 1))
    return rates


def shrink_pool(pool: np.ndarray, labels: np.ndarray, confidence: np.ndarray, rates: np.ndarray, n_min: int
                ) -> tuple[np.ndarray, dict[int, float]]:
    """One BalanceCascade step: the pool left after a member (sorted training indices) and each shrunk class's
    threshold θ_c.

    ``pool``: the member's pool (training indices); ``labels`` and ``confidence`` (the member's probability of the
    true class) per training image; ``rates``: :func:`cascade_rates`. A class c with ``f_c < 1`` keeps its
    ``max(n_min, f_c · |pool_c|)`` (rounded half up; at most all) least confident images; θ_c is the highest
    confidence kept, and the images above it, which the member classifies correctly at θ_c, leave the pool (equal
    confidences: the lower index stays). The other classes keep their pool.
    """
    pool = np.asarray(pool, dtype=np.int64)
    kept, thresholds = [], {}
    for label in np.unique(labels[pool]):
        items = pool[labels[pool] == label]
        if rates[label] >= 1:
            kept.append(items)
            continue
        keep = min(len(items), max(n_min, math.floor(round(rates[label] * len(items), 6) + 0.5)))
        order = np.argsort(confidence[items], kind="stable")
        kept.append(items[order[:keep]])
        thresholds[int(label)] = float(confidence[items[order[keep - 1]]])
    return np.sort(np.concatenate(kept)), thresholds


# ------------------------------------------------------------------------------------------------- the stages
@dataclass
class MemberOutput:
    """What a member leaves the stages after it: its probabilities and labels per split (``<split>_probabilities``,
    ``<split>_labels``; BalanceCascade also ``train``), and BalanceCascade's pool for the next member."""

    predictions: dict[str, np.ndarray]
    next_pool: np.ndarray | None = None

    def save(self, directory: Path) -> None:
        np.savez(directory / PREDICTIONS, **self.predictions)
        if self.next_pool is not None:
            np.save(directory / NEXT_POOL, self.next_pool)

    @classmethod
    def load(cls, directory: Path) -> "MemberOutput":
        try:
            with np.load(directory / PREDICTIONS, allow_pickle=False) as saved:
                predictions = {key: saved[key] for key in saved.files}
            next_pool = np.load(directory / NEXT_POOL, allow_pickle=False) if (directory / NEXT_POOL).exists() else None
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the predictions in {directory} ({error}); delete its stage.json to train "
                            "the member again") from None
        return cls(predictions, next_pool)


@torch.inference_mode()
def predict_probabilities(task, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The task's class probabilities (its ``predict_step``) of every batch of ``loader``, with the labels:
    ``(float32[N, C], int64[N])``."""
    task = task.to(device).eval()
    probabilities, labels = [], []
    for images, targets in loader:
        probabilities.append(task.predict_step(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy().astype(np.int64)


def split_scores(predictions: dict[str, np.ndarray], num_classes: int, groups: dict) -> tuple[dict, list]:
    """:func:`score_probabilities` of the val and test probabilities, as a row (``{"val/acc": ..., "test/f1":
    ...}``), and the test split's recall per class."""
    row, recall = {}, []
    for split in SPLITS:
        scores = score_probabilities(predictions[f"{split}_probabilities"], predictions[f"{split}_labels"],
                                     num_classes, groups)
        recall = scores.pop("recall_per_class")
        row.update({f"{split}/{key}": value for key, value in scores.items()})
    return row, recall


def member_config(cfg: DictConfig, member: int, pool: str | None, budget: str) -> DictConfig:
    """Member ``member``'s train config (1-based): the run's groups, no strategy, the seed ``seed + member - 1``,
    the run's split (``data.seed``) and a balanced draw from ``pool`` as its training set, with epochs as long as
    the split for ``budget`` ``steps`` (:data:`BUDGETS`)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    data_seed = int(cfg.data.get("seed", cfg.seed))
    plain.update(strategy={"name": "none"}, seed=int(cfg.seed) + member - 1, resume=None,
                 data={**plain["data"], "_target_": MEMBER_DATA, "seed": data_seed, "pool": pool,
                       "split_length": budget == "steps"})
    return OmegaConf.create(plain)


def majority_sizes(pool: np.ndarray, labels: np.ndarray, majority: list[int]) -> list[int]:
    """The images of each majority class in ``pool`` (training indices)."""
    counts = np.bincount(labels[pool], minlength=max(majority, default=0) + 1)
    return [int(counts[label]) for label in majority]


@register_pipeline("easy_ensemble")
@register_pipeline("balance_cascade")
def run_ensemble(cfg: DictConfig) -> tuple[dict, dict]:
    """Runs the members and the ensemble per ``cfg`` (see the module docstring); returns (the ensemble's metrics and
    each member's accuracy, {"stages": {name: StageResult}})."""
    quiet_lightning()
    settings = check_strategy(cfg)
    out = output_dir(cfg)
    say_run_dir(out, "start")
    data = build_datamodule(cfg)  # the run's data, read once: every member's val and test split, the cascade's pool
    info = data.info
    labels = np.asarray(data.train_labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=info.num_classes)
    if counts.min() == 0:
        raise UserError(f"strategy={settings.method}: class {info.class_names[int(counts.argmin())]!r} has no training "
                        "image, and a balanced draw takes as many of every class as of the smallest.")
    n_min, majority = int(counts.min()), majority_classes(counts)
    groups = frequency_groups(info.class_counts)
    rates = settings.rates(counts)
    # the members' predictions run where they trained: the CPU if the trainer is told so, else a GPU if any
    device = inference_device("cpu" if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else "auto")
    name = METHODS[settings.method]
    if not majority:
        console.print(f"{name}: the training classes are balanced ({n_min} images each), so every member trains on "
                      "the whole split.", style="dim", highlight=False)
    loaders = {"val": data.val_dataloader, "test": data.test_dataloader, "train": data.train_eval_dataloader}

    def train_member(context: StageContext, member: int):
        pool = context.output(f"member{member - 1}").next_pool if settings.cascade and member > 1 else None
        if pool is not None:
            np.save(context.out_dir / POOL, pool)  # the member's data view reads it (its config names the file)
        metrics, objects = run_train(context.config)
        splits = (*SPLITS, "train") if settings.cascade else SPLITS
        predictions = {}
        for split in splits:
            predictions[f"{split}_probabilities"], predictions[f"{split}_labels"] = predict_probabilities(
                objects["task"], loaders[split](), device)
        pool = np.arange(len(labels)) if pool is None else pool
        sizes = majority_sizes(pool, labels, majority)
        row = {"train_images": len(objects["datamodule"].drawn), "steps": int(objects["trainer"].global_step),
               "majority_pool": sum(sizes), "seed": int(context.config.seed),
               **split_scores(predictions, info.num_classes, groups)[0],
               **{key: metrics[key] for key in ("epochs", "train_time_s", "params")}}
        output = MemberOutput(predictions)
        if settings.cascade:
            row["majority_pool_per_class"] = {info.class_names[c]: size for c, size in zip(majority, sizes)}
            if member < settings.members:  # the last member's pool shrinks for no one
                confidence = predictions["train_probabilities"][np.arange(len(labels)), labels]
                output.next_pool, thresholds = shrink_pool(pool, labels, confidence, rates, n_min)
                row.update(next_majority_pool=sum(majority_sizes(output.next_pool, labels, majority)),
                           thresholds={info.class_names[c]: value for c, value in thresholds.items()})
        output.save(context.out_dir)
        return row, output

    def combine(context: StageContext):
        outputs = [context.output(f"member{member}") for member in range(1, settings.members + 1)]
        averaged = {}
        for split in SPLITS:
            averaged[f"{split}_probabilities"] = average_probabilities(
                [output.predictions[f"{split}_probabilities"] for output in outputs]).float().numpy()
            averaged[f"{split}_labels"] = outputs[0].predictions[f"{split}_labels"]
        np.savez(context.out_dir / PREDICTIONS, **averaged)
        metrics, recall = split_scores(averaged, info.num_classes, groups)
        console.print(class_recall_table(list(info.class_names), recall,
                                         np.bincount(averaged["test_labels"], minlength=info.num_classes).tolist(),
                                         f"{name} recall per class (test)", list(counts), groups))
        per_class = {"recall_per_class": {n: r for n, r in zip(info.class_names, recall) if r is not None}}
        write_json(context.out_dir / "metrics.json", {**metrics, **per_class})
        return {**metrics, "members": settings.members}

    stages = []
    for member in range(1, settings.members + 1):
        config = member_config(cfg, member, "${paths.output_dir}/" + POOL if settings.cascade and member > 1 else None,
                               settings.budget)
        stages.append(Stage(
            f"member{member}", lambda context, member=member: train_member(context, member),
            needs=(f"member{member - 1}",) if settings.cascade and member > 1 else (), config=config,
            # A cascade member's pool depends on T and f; an EasyEnsemble member on its seed alone.
            params={"members": settings.members, "fpr": settings.fpr} if settings.cascade else {},
            label=f"member {member}", restore=lambda context: MemberOutput.load(context.out_dir),
            title=f"{name} member {member}/{settings.members}: {cfg.model.name}, {n_min} training images per class, "
                  f"seed {config.seed}"))
    stages.append(Stage("ensemble", combine, needs=tuple(stage.name for stage in stages),
                        params={"members": settings.members}, label=f"{name} (mean probability)",
                        title=f"{name}: the {settings.members} members' probabilities averaged"))
    results = run_stages(stages, out, COLUMNS, title=f"{name}: {settings.members} x {cfg.model.name} on "
                                                     f"{cfg.data.name}")

    ensemble = results["ensemble"].metrics
    metrics = {**ensemble, **{f"{stage}/{key}": result.metrics[key] for stage, result in results.items()
                              if stage != "ensemble" for key in MEMBER_KEYS}}
    write_json(out / "metrics.json", metrics)
    say_run_dir(out, "end")
    return metrics, {"stages": results}


__all__ = ["BUDGETS", "EnsembleSettings", "MemberOutput", "average_probabilities", "cascade_rates", "check_strategy",
           "member_config", "predict_probabilities", "run_ensemble", "shrink_pool"]
