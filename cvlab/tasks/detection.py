"""Object detection: a detector returns ``loss_*`` terms in training and per-image boxes in evaluation; validation
computes COCO mAP (torchmetrics, pycocotools-exact), per-class AP and precision-recall curves.

Multi-scale training (YOLOv2) is done here, not in the model: every ``every`` batches the batch is resized to a new
square size from ``min``..``max`` in steps of ``step`` (boxes scaled with it), seeded by the global step so resumes
replay it. The sizes are the paper's for a ``base`` (416 px) input and scale with the configured input size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cvlab.metrics.detection import DetectionMeanAP
from cvlab.tasks.base import BaseTask


class DetectionTask(BaseTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.hparams.data_info
        self.model = self.build_model(num_classes=info["num_classes"], img_size=info["image_size"])
        self.map_metric = DetectionMeanAP(info["class_names"])
        self.multiscale = self.hparams.model.get("multiscale")
        self.report: dict = {}

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        return self.model(images, targets)

    def _rescale(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        plan = self.multiscale
        ratio = self.hparams.data_info["image_size"] / plan.get("base", 416)
        step = plan["step"]
        low, high = (max(step, round(plan[k] * ratio / step) * step) for k in ("min", "max"))
        window = self.global_step // plan["every"]
        choices = list(range(low, high + 1, step))
        size = choices[int(torch.randint(len(choices), (), generator=torch.Generator().manual_seed(window)))]
        factor = size / images.shape[-1]
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images, [{**t, "boxes": t["boxes"] * factor} for t in targets]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.multiscale:
            images, targets = self._rescale(images, targets)
        losses = self(images, targets)
        total = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        detections = self(images)
        self.map_metric.update(detections, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def on_validation_epoch_end(self) -> None:
        scores = self.map_metric.compute()
        self.report = {"ap50_per_class": scores["ap50_per_class"], "ap_per_class": scores["ap_per_class"],
                       "pr_curves": self.map_metric.pr_curves(0.5)}
        self.log_dict({f"val/{key}": scores[key] for key in ("map", "map_50", "map_75", "mar_100")}, prog_bar=True)
        self.map_metric.reset()
