"""Image classification: logits Tensor[N, C] against integer labels.

The validation split (checkpoint selection, ``val/acc``) and the test split (the reported figures) are scored alike:
accuracy, macro-F1, balanced accuracy, G-mean and per-class recall (:mod:`cvlab.metrics.classification`), and a
confusion matrix. When the training counts are long-tailed the mean recall of the many / medium / few frequency
groups joins them (``test/recall_few``, ...; the groups: :func:`~cvlab.metrics.classification.frequency_groups`).
The report prints the per-class recall table of the last evaluated split, draws its confusion matrix, and gives the
json the per-class recalls by class name and the classes of each frequency group.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cvlab.metrics.classification import evaluation_metrics, frequency_groups
from cvlab.tasks.base import BaseTask, register_task
from cvlab.utils.errors import UserError

# The evaluation metrics the progress bar shows during validation (the others go to the logs and the final table).
PROGRESS_METRICS = ("loss", "acc", "f1")
# Predicted copies are enlarged to at least this short side so the label is readable (8x8 digits...).
_MIN_DRAWN_SIDE = 160


@register_task("classification")
class ClassificationTask(BaseTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.data_info
        num_classes = info.num_classes
        self.model = self.build_model(num_classes=num_classes, in_chans=info.in_chans, image_size=info.image_size)
        self.criterion = self.build_plugin(self.hparams.loss, num_classes=num_classes,
                                           class_counts=list(info.class_counts)) or nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        # The training counts (of the data before any resampling) define the frequency groups of a long tail.
        self.frequency_groups = frequency_groups(info.class_counts)
        # One set of evaluation metrics serves the val and the test pass (they never run at once).
        self.eval_metrics = evaluation_metrics(num_classes, self.frequency_groups)
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.eval_loss = MeanMetric()  # one log call per epoch instead of one per batch (Lightning's log is not free)
        # The split and per-class recall Tensor[C] (NaN: a class the split never shows) of the latest evaluation.
        self.recall_per_class: tuple[str, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        # mixup and CutMix give soft labels Tensor[N, C]; accuracy counts the larger share as the truth.
        self.train_acc.update(logits, labels.argmax(-1) if labels.is_floating_point() else labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    # ------------------------------------------------------------------------------------------ val and test
    def _evaluate_batch(self, batch, batch_idx: int, split: str) -> None:
        images, labels = batch
        logits = self(images)
        self.eval_loss.update(self.criterion(logits, labels), weight=len(labels))
        self.eval_metrics.update(logits, labels)
        self.confusion.update(logits, labels)

    def _log_evaluation(self, split: str) -> None:
        scores = {"loss": self.eval_loss.compute(), **self.eval_metrics.compute()}
        self.recall_per_class = split, scores.pop("recall_per_class").cpu()
        self.log_dict({f"{split}/{key}": scores.pop(key) for key in PROGRESS_METRICS}, prog_bar=split == "val")
        self.log_dict({f"{split}/{key}": value for key, value in scores.items()})
        self.eval_metrics.reset()
        self.eval_loss.reset()

    def on_validation_epoch_start(self) -> None:
        # The matrix always describes the latest evaluation pass.
        self.confusion.reset()

    on_test_epoch_start = on_validation_epoch_start

    def report(self, out: Path) -> dict:
        """The per-class recall table and confusion matrix of the last evaluation; the json gets the per-class
        recalls (of the classes the split shows) by class name and, for a long tail, each frequency group's
        classes."""
        from cvlab.utils.console import class_recall_table, console
        from cvlab.utils.plots import plot_confusion_matrix

        super().report(out)
        if not self.confusion.update_count or self.recall_per_class is None:
            return {}
        names, groups = self.class_names, self.frequency_groups
        confusion = self.confusion.compute().cpu()
        split, recall = self.recall_per_class
        recall = [None if value != value else value for value in recall.tolist()]  # NaN: undefined
        console.print(class_recall_table(names, recall, confusion.sum(1).tolist(), f"recall per class ({split})",
                                         list(self.data_info.class_counts), groups))
        plot_confusion_matrix(confusion.numpy(), names, out / "confusion_matrix.png")
        per_class = {"recall_per_class": {name: value for name, value in zip(names, recall) if value is not None}}
        if groups:
            per_class["frequency_groups"] = {group: [names[i] for i in classes] for group, classes in groups.items()}
        return per_class

    # ------------------------------------------------------------------------------------------ predict
    def predict_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        """Class probabilities Tensor[N, C] of a batch of preprocessed images."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(-1)

    def eval_transform(self):
        """The checkpoint's evaluation preprocessing, rebuilt from its data config."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        data_cfg = self.hparams.data or {}
        try:
            datamodule = instantiate(OmegaConf.create(data_cfg))
            datamodule.setup()
        except (UserError, OSError, RuntimeError) as error:
            raise UserError(f"cannot rebuild the preprocessing of data {data_cfg.get('name')!r} the checkpoint was "
                            f"trained on ({error}); it is needed to prepare the images") from None
        return datamodule.val_set.transform

    @classmethod
    def predict_images(cls, runner, paths, names, out, settings):
        """Top-k classes per image (``settings["top_k"]``) and a labelled copy of each."""
        from collections import Counter

        from cvlab.utils.images import open_image

        class_names = list(runner.info.class_names)
        mode = "L" if runner.info.in_chans == 1 else "RGB"
        transform = runner.transform
        k = min(int(settings["top_k"]), len(class_names))
        results = []
        for path, name in zip(paths, names):
            image = open_image(path, mode)
            with torch.inference_mode():
                probabilities = runner(transform(image)[None])[0].cpu()
            best = probabilities.topk(k)
            ranked = [{"label": int(label), "class": class_names[label], "probability": round(float(p), 5)}
                      for p, label in zip(best.values, best.indices)]
            results.append({"image_id": settings["image_ids"][path],
                            "file_name": str(path.relative_to(settings["root"])), "top_k": ranked})
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            _labelled_copy(image, f"{ranked[0]['class']} {ranked[0]['probability']:.2f}").save(out / name)
        counts = Counter(r["top_k"][0]["class"] for r in results)
        return results, counts, "images", f"best class of {len(paths)} image(s)"


def _labelled_copy(image, text: str):
    import PIL.Image
    from PIL import ImageDraw

    image = image.convert("RGB")
    factor = max(1, -(-_MIN_DRAWN_SIDE // min(image.size)))
    image = image.resize((image.width * factor, image.height * factor), PIL.Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))
    return image
