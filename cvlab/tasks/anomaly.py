"""Anomaly detection: a model learns the normal classes of classification data (``data.normal_classes``) from their
images alone, and scores how anomalous every image looks; every other class is an anomaly.

Data: the training split keeps the normal classes' images (:mod:`cvlab.data.imbalance`); the validation and test
splits keep every class. The task stores the normal labels (``normal``), so a checkpoint labels its splits alone.

Methods (:mod:`cvlab.models.anomaly`), each trained by gradient descent on its own objective through the ordinary
loop (the run's optimizer and scheduler), and each scoring ``Tensor[N]``, higher for a more anomalous image:

- ``model=autoencoder``: a convolutional autoencoder; its objective and its score are the reconstruction error.
- ``model=isolation_forest`` / ``model=one_class_svm``: scikit-learn's estimators on the features of a zoo CNN that
  learns, on the normal images, which of four rotations it is shown. An estimator has no gradient: before every
  evaluation pass it is fitted on the features of the normal training images (the evaluation transform: no
  augmentation). It is never saved (sklearn persists only by pickle, which cvlab never loads): a restored checkpoint
  fits it again from its feature network on the training split that its data config cuts again, and the same
  weights and images give the same estimator.

Why that feature network, and not the feature classifier generation trains on the data (``cvlab features``,
:mod:`cvlab.tasks.generation`): that one learns the labels of every class of the training split, the anomaly classes
included, so its features would tell the anomalies apart because it was taught them; here nothing of an anomaly may
be seen in training. A classifier of the normal classes alone has nothing to learn with a single normal class, so
the CNN learns a task that needs no label (rotation prediction, RotNet), the two-stage form of Sohn et al. 2021: a
self-supervised representation of the normal data, then a shallow one-class model on it.

Metrics (:mod:`cvlab.metrics.anomaly`), anomalies positive: AUROC (``val/auroc``, the checkpoint monitor, highest
best), AUPRC beside the split's anomaly rate (the AUPRC of chance), F1 at the split's best threshold (an upper bound
of a threshold fixed beforehand) and that threshold; ``val/loss`` is the model's training objective on the normal
validation images. The validation split holds anomalies, which the checkpoint choice reads (as every task chooses on
val); the test split is the reported one.

Report: ``roc_curve.png`` (val and test), and a table per class of the test split: its role, images, mean score,
the share flagged at the F1 threshold (for a normal class its false alarms) and the AUROC of the normal images
against that class alone (which anomalies pass for normal).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import MeanMetric

from cvlab.metrics.anomaly import MEASURES, AnomalyScores
from cvlab.tasks.base import BaseTask, register_task
from cvlab.utils.errors import UserError


@register_task("anomaly")
class AnomalyTask(BaseTask):
    """See the module docstring. Hyper-parameters besides BaseTask's: ``normal`` (``{"labels": [...]}``, the normal
    classes' labels, resolved from the datamodule)."""

    groups = ("model", "optimizer", "scheduler", "norm", "activation", "attention", "init", "data")

    def __init__(self, *args, normal: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not normal or not normal.get("labels"):
            raise ValueError("an anomaly task needs its normal classes (normal={'labels': [...]}); build it with "
                             "Task.from_config(cfg, datamodule)")
        info = self.data_info
        self.normal_labels = [int(label) for label in normal["labels"]]
        self.model = self.build_model(in_chans=info.in_chans, image_size=info.image_size)
        self.scores = AnomalyScores(self.normal_labels, info.num_classes)
        self.eval_loss = MeanMetric()
        self.register_buffer("normal_tensor", torch.tensor(self.normal_labels), persistent=False)
        self.figures: dict[str, dict] = {}  # the last evaluation of each split, for the report

    @classmethod
    def resolve(cls, configs: dict, datamodule, seed: int) -> dict:
        """Refuses data that is not classification data or keeps no normal classes; records the normal labels."""
        data_name = (configs.get("data") or {}).get("name")
        if getattr(datamodule, "kind", None) != "classification":
            raise UserError(f"task=anomaly learns the normal classes of classification data (digits, shapes, "
                            f"imagefolder, mnist, cifar10); data={data_name} is {getattr(datamodule, 'kind', '?')} "
                            "data.")
        labels = getattr(datamodule, "normal_labels", None)
        if not labels:
            raise UserError(f"task=anomaly trains on the normal classes only: give data.normal_classes=[0] (class "
                            f"indices or names of data={data_name}).")
        return {**configs, "normal": {"labels": list(labels)}}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly scores ``Tensor[N]`` of a batch of normalised images."""
        return self.model.anomaly_score(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, _ = batch
        loss = self.model.training_loss(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    # ------------------------------------------------------------------------------------------ val and test
    def on_validation_epoch_start(self) -> None:
        self._fit_scorer()

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def _fit_scorer(self) -> None:
        """A model scoring with a fitted estimator is fitted on the features of the normal training images."""
        if not self.model.needs_fit:
            return
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "normal_labels", None) != self.normal_labels:
            raise UserError(f"this {self.hparams.model['name']} fits its estimator on the training images of its "
                            f"normal classes {self.normal_labels}; the data keeps "
                            f"{getattr(datamodule, 'normal_labels', None)}: give data.normal_classes="
                            f"{self.normal_labels}.")
        was_training = self.model.training
        self.model.eval()
        features = [self.model.features(images.to(self.device)) for images, _ in datamodule.train_eval_dataloader()]
        self.model.fit(torch.cat(features))
        self.model.train(was_training)

    def _evaluate_batch(self, batch, batch_idx: int, split: str) -> None:
        images, labels = batch
        self.scores.update(self(images), labels)
        normal = torch.isin(labels, self.normal_tensor)
        if normal.any():
            self.eval_loss.update(self.model.training_loss(images[normal]), weight=int(normal.sum()))

    def _log_evaluation(self, split: str) -> None:
        figures = self.scores.compute()
        self.scores.reset()
        self.figures[split] = figures
        scalars = {f"{split}/{key}": figures[key] for key in MEASURES}
        if self.eval_loss.update_count:
            scalars[f"{split}/loss"] = self.eval_loss.compute()
        self.eval_loss.reset()
        self.log_dict(scalars, prog_bar=split == "val")

    # ------------------------------------------------------------------------------------------ report
    def report(self, out: Path) -> dict:
        """``roc_curve.png`` and the per-class table of the test split; its per-class figures go to the json."""
        from rich.table import Table

        from cvlab.utils.console import console
        from cvlab.utils.plots import plot_roc_curves

        super().report(out)
        curves = {split: {**figures["roc"], "auroc": figures["auroc"]} for split, figures in self.figures.items()
                  if len(figures["roc"]["fpr"])}
        if curves:
            normal = ", ".join(self.class_names[label] for label in self.normal_labels)
            plot_roc_curves(curves, out / "roc_curve.png", title=f"ROC: anomalies against normal class(es) {normal}")
        split = "test" if "test" in self.figures else next(iter(self.figures), None)
        if split is None:
            return {}
        per_class = self.figures[split]["per_class"]
        table = Table(title=f"anomaly scores per class ({split}; flagged: score >= the F1 threshold "
                            f"{self.figures[split]['threshold']:.4g})", title_justify="left")
        for column in ("class", "role", "images", "mean score", "flagged", "AUROC vs normal"):
            table.add_column(column, justify="left" if column in ("class", "role") else "right")
        for label, name in enumerate(self.class_names):
            cells = (per_class["mean_score"][label], per_class["flagged"][label], per_class["auroc"][label])
            table.add_row(name, "normal" if label in self.normal_labels else "anomaly",
                          f"{per_class['images'][label]:,}", *("-" if v is None else f"{v:.4f}" for v in cells))
        console.print(table)
        return {"normal_classes": [self.class_names[label] for label in self.normal_labels],
                f"{split}/per_class": {name: {key: values[label] for key, values in per_class.items()}
                                       for label, name in enumerate(self.class_names)}}
