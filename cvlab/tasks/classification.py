"""Image classification: logits Tensor[N, C] against integer labels; accuracy, macro-F1 and a confusion matrix."""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from cvlab.tasks.base import BaseTask


class ClassificationTask(BaseTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.hparams.data_info
        num_classes = info["num_classes"]
        self.model = self.build_model(num_classes=num_classes, in_chans=info["in_chans"], img_size=info["image_size"])
        self.criterion = instantiate(self.hparams.loss or {"_target_": "torch.nn.CrossEntropyLoss"})
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }, prefix="val/")
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.val_loss = MeanMetric()  # one log call per epoch instead of one per batch (Lightning's log is not free)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_acc.update(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_loss.update(self.criterion(logits, labels), weight=len(labels))
        self.val_metrics.update(logits, labels)
        self.confusion.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/loss": self.val_loss.compute(), **self.val_metrics.compute()}, prog_bar=True)
        self.val_metrics.reset()
        self.val_loss.reset()

    def on_validation_epoch_start(self) -> None:
        # The matrix always describes the latest validation pass.
        self.confusion.reset()
