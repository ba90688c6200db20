"""Object detection: a detector returns ``loss_*`` terms in training and per-image boxes in evaluation; validation
(checkpoint selection) and test (the reported figures) compute COCO mAP (torchmetrics, pycocotools-exact), per-class
AP and precision-recall curves.

Multi-scale training (YOLOv2) is done here, not in the model: every ``every`` batches the batch is resized to a new
square size from ``min``..``max`` in steps of ``step`` (boxes scaled with it), seeded by the global step so resumes
replay it. The sizes are the paper's for a ``base`` (416 px) input and scale with the configured input size.

Settings that depend on the data are resolved here before the model is built: ``model.anchors=auto`` becomes the
k-means anchors of the training boxes (:mod:`cvlab.tasks.anchors`), stored as such in the checkpoint.

The ``task`` node (conf/task/detection.yaml, :class:`DetectionSettings`) adds three training settings:

- ``ema``: a weight EMA (:class:`~cvlab.tasks.ema.WeightEMA`, YOLOv5's decay 0.9999 ramped over 2000 updates),
  updated after every optimiser step. Validation, test, predict and export run the EMA (:attr:`inference_model`),
  so the best checkpoint is the best EMA, which it holds (``ema.module.*``) beside the live weights a resume
  continues from. Default: the model's (``model.ema``: YOLOv5 / v6 / v7 train with one), else off.
- ``norm_bias_decay``: whether the optimiser's weight decay reaches the network's one-dimensional parameters (biases,
  norm scales and shifts). Off, they train in the ``no_weight_decay`` group at decay 0, as YOLOv6's optimiser (and
  Darknet's, YOLOv5's and YOLOv7's) trains them. Default: the model's (``model.norm_bias_decay``: off for YOLOv6),
  else on: under cvlab's AdamW at 0.05 turning it off helped yolov6n and cost yolov7_tiny (BENCHMARKS.md).
- ``fitness``: ``val/fitness``, the score the best checkpoint is chosen by, a weighted sum of the COCO figures;
  YOLOv5's ``0.1·mAP@0.5 + 0.9·mAP@[.5:.95]`` by default (:func:`~cvlab.metrics.detection.fitness`), so the
  tightness of the boxes counts and not only their hits at IoU 0.5.

`cvlab eval` and `cvlab predict` of a checkpoint run its inference model fused (:attr:`DetectionTask.fused_inference`:
each conv's BatchNorm folded into it, RepVGG branches merged), the network `cvlab export` writes; training, and the
validation inside it, never fuse.

``loss=default`` (the model's own loss) also takes ``box_loss`` (``recipe=modern`` sets it to ``ciou``): the box term
of the model's own loss, where that loss offers the choice (:meth:`DetectionTask._set_own_box_loss`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.metrics.detection import FITNESS_WEIGHTS, SUMMARY_KEYS, DetectionMeanAP, fitness
from cvlab.tasks.base import BaseTask, register_task
from cvlab.tasks.ema import WeightEMA
from cvlab.utils.errors import UserError
from cvlab.utils.plugins import PLUGIN_META_KEYS
from cvlab.utils.validate import check_number

# Box colours by class index (cycled), chosen to stay apart on photos and on the grey letterbox.
_PALETTE = [(255, 56, 56), (44, 153, 168), (255, 157, 151), (72, 249, 10), (146, 204, 23), (61, 219, 134),
            (255, 178, 29), (26, 147, 52), (0, 212, 187), (207, 210, 49), (132, 56, 255), (255, 55, 199)]


@dataclass(frozen=True)
class DetectionSettings:
    """The ``task`` node's settings (conf/task/detection.yaml; see the module docstring). A checkpoint written before
    they existed holds no ``task`` node: no EMA, the default fitness."""

    ema: bool = False
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    norm_bias_decay: bool = True
    fitness: dict = field(default_factory=lambda: dict(FITNESS_WEIGHTS))

    @classmethod
    def from_dict(cls, task: dict | None) -> "DetectionSettings":
        task = task or {}
        settings = cls(**{key: task[key] for key in ("ema", "ema_decay", "ema_tau", "norm_bias_decay", "fitness")
                          if key in task})
        for key in ("ema", "norm_bias_decay"):
            if not isinstance(getattr(settings, key), bool):
                raise UserError(f"task.{key} is true or false, got {getattr(settings, key)!r}.")
        check_number("task.ema_decay", settings.ema_decay, 0, 1, high_open=True, hint=" (YOLOv5's 0.9999)")
        check_number("task.ema_tau", settings.ema_tau, 0, low_open=True,
                     hint=" (the decay's ramp in optimiser steps, YOLOv5's 2000)")
        weights = settings.fitness
        if not isinstance(weights, dict) or not weights or set(weights) - set(SUMMARY_KEYS):
            raise UserError(f"task.fitness weighs some of {', '.join(SUMMARY_KEYS)} (e.g. {{map_50: 0.1, map: 0.9}}), "
                            f"got {weights!r}.")
        for key, weight in weights.items():
            check_number(f"task.fitness.{key}", weight, 0)
        if not sum(weights.values()) > 0:
            raise UserError(f"task.fitness weights are all 0: {weights!r}; give one a positive weight.")
        return settings


@register_task("detection")
class DetectionTask(BaseTask):
    """See the module docstring. Hyper-parameters besides BaseTask's: ``task`` (:class:`DetectionSettings`)."""

    groups = (*BaseTask.groups, "task")
    # The YOLOs' conv+BN pairs folded (and RepVGG branches merged): `cvlab eval` and `cvlab predict` time and score the
    # network that `cvlab export` writes.
    fused_inference = True

    def __init__(self, *args, task: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = DetectionSettings.from_dict(task)
        info = self.data_info
        loss = self.build_plugin(self.hparams.loss, num_classes=info.num_classes, class_counts=list(info.class_counts))
        self.model = self.build_model(num_classes=info.num_classes, image_size=info.image_size,
                                      **({"loss": loss} if loss is not None else {}))
        if loss is None:
            self._set_own_box_loss(self.hparams.loss or {})
        self.ema = self._build_ema()
        self.map_metric = DetectionMeanAP(self.class_names)
        self.multiscale = self.hparams.model.get("multiscale")
        self.per_class: dict = {}

    def _set_own_box_loss(self, loss_cfg: dict) -> None:
        """``loss=default`` with ``box_loss`` (recipe=modern, ``+loss.box_loss=ciou``) chooses the box term of the
        model's own loss, among the ``box_losses`` that loss offers; any other setting is refused: it belongs to a
        named loss (``loss=yolov3 loss.ignore_thresh=...``)."""
        settings = {key: value for key, value in loss_cfg.items() if key not in PLUGIN_META_KEYS}
        if not settings:
            return
        name = self.hparams.model["name"]
        others = sorted(set(settings) - {"box_loss"})
        if others:
            raise UserError(f"loss=default (the model's own loss) takes only box_loss; set "
                            f"{', '.join('loss.' + key for key in others)} on a named loss (`cvlab list loss`).")
        own = getattr(self.model, "loss", None)
        choices = tuple(getattr(own, "box_losses", ()))
        if settings["box_loss"] not in choices:
            which = f" ({type(own).__name__})" if own is not None else ""
            offered = f"takes box_loss {', '.join(choices)}" if choices else "has no box_loss choice"
            raise UserError(f"loss.box_loss={settings['box_loss']}: {name}'s own loss{which} {offered}.")
        own.box_loss = settings["box_loss"]

    def _build_ema(self) -> WeightEMA | None:
        if not self.settings.ema:
            return None
        if self.hparams.model.get("pipeline"):
            raise UserError(f"task.ema averages the weights of a detector trained by gradient steps; "
                            f"model={self.hparams.model['name']} is trained in stages. Drop task.ema=true.")
        return WeightEMA(self.model, self.settings.ema_decay, self.settings.ema_tau)

    def no_weight_decay_names(self) -> set[str]:
        """The model's own exemptions, and with ``task.norm_bias_decay=false`` every one-dimensional parameter of
        the network (biases, norm scales and shifts)."""
        names = super().no_weight_decay_names()
        if not self.settings.norm_bias_decay:
            names |= {f"model.{name}" for name, parameter in self.model.named_parameters() if parameter.ndim <= 1}
        return names

    @property
    def inference_model(self) -> nn.Module:
        """The weight EMA when the task keeps one, else the model."""
        return self.model if self.ema is None else self.ema.module

    @classmethod
    def resolve(cls, configs: dict, datamodule, seed: int) -> dict:
        """``model.anchors=auto`` becomes the k-means anchors of the training boxes. A model with ``proposals:``
        settings (R-CNN, Fast R-CNN) has the datamodule attach them to every split (computed once now, cached; see
        :mod:`cvlab.data.proposals`), and keeps the settings completed with their defaults."""
        if configs["model"].get("anchors") == "auto":
            from cvlab.tasks.anchors import auto_anchors

            configs["model"] = {**configs["model"],
                                "anchors": auto_anchors(configs["model"], datamodule.train_set, datamodule.info, seed)}
        if configs["model"].get("proposals"):
            configs["model"] = {**configs["model"],
                                "proposals": datamodule.attach_proposals(configs["model"]["proposals"])}
        return configs

    def attach_inputs(self, datamodule) -> None:
        if self.hparams.model.get("proposals"):
            datamodule.attach_proposals(self.hparams.model["proposals"])

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None,
                proposals: list[torch.Tensor] | None = None):
        network = self.model if self.training else self.inference_model
        if getattr(network, "needs_proposals", False):  # Fast R-CNN: region proposals per image, or None
            return network(images, targets, proposals=proposals)
        return network(images, targets)

    @staticmethod
    def _proposals(targets: list[dict]) -> list[torch.Tensor] | None:
        """The cached ``proposals`` the targets carry, or None (a model that needs them computes its own) when
        any lacks them."""
        if not all("proposals" in t for t in targets):
            return None
        return [t["proposals"] for t in targets]

    def _rescale(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        plan = self.multiscale
        ratio = self.data_info.image_size / plan.get("base", 416)
        step = plan["step"]
        low, high = (max(step, round(plan[k] * ratio / step) * step) for k in ("min", "max"))
        window = self.global_step // plan["every"]
        choices = list(range(low, high + 1, step))
        size = choices[int(torch.randint(len(choices), (), generator=torch.Generator().manual_seed(window)))]
        factor = size / images.shape[-1]
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images, [{**t, **{key: t[key] * factor for key in ("boxes", "proposals") if key in t}}
                        for t in targets]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.multiscale:
            images, targets = self._rescale(images, targets)
        losses = self(images, targets, self._proposals(targets))
        total = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # after every optimiser step (every accumulate_grad_batches batches)
            self.ema.update_parameters(self.model)

    # ------------------------------------------------------------------------------------------ val and test
    def _evaluate_batch(self, batch, batch_idx: int, split: str) -> None:
        images, targets = batch
        detections = self(images, proposals=self._proposals(targets))
        self.map_metric.update(detections, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def _log_evaluation(self, split: str) -> None:
        scores = self.map_metric.compute()
        self.per_class = {"ap50_per_class": scores["ap50_per_class"], "ap_per_class": scores["ap_per_class"],
                          "pr_curves": self.map_metric.pr_curves(0.5)}
        figures = {key: scores[key] for key in SUMMARY_KEYS}
        figures["fitness"] = fitness(figures, self.settings.fitness)
        self.log_dict({f"{split}/{key}": value for key, value in figures.items()}, prog_bar=split == "val")
        self.map_metric.reset()

    def report(self, out: Path) -> dict:
        """PR curves and the per-class AP table of the last evaluation pass; the per-class APs go to the json."""
        from cvlab.utils.console import class_ap_table, console
        from cvlab.utils.plots import plot_pr_curves

        super().report(out)
        if not self.per_class:
            return {}
        if self.per_class["pr_curves"]:
            plot_pr_curves(self.per_class["pr_curves"], out / "pr_curves.png")
        console.print(class_ap_table(self.per_class["ap50_per_class"], self.per_class["ap_per_class"]))
        return {key: self.per_class[key] for key in ("ap50_per_class", "ap_per_class")}

    # ------------------------------------------------------------------------------------------ predict
    def predict_step(self, batch, batch_idx: int = 0) -> list[dict]:
        """Detections (``dict(boxes, scores, labels)`` per image) of a batch of letterboxed images."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images)

    @staticmethod
    def _coco_ids(data_cfg: dict | None, class_names: list[str]) -> tuple[list[int] | None, dict[str, int]]:
        """(category id of each class, image id of each file name) from the validation json of a COCO-folder
        checkpoint's data config; (None, {}) when the data was not COCO or its json is gone or names other
        classes."""
        data_cfg = data_cfg or {}
        if data_cfg.get("source") != "coco" or not data_cfg.get("root"):
            return None, {}
        split = data_cfg.get("val_split") or "val2017"
        ann_file = Path(data_cfg["root"]).expanduser() / "annotations" / f"instances_{split}.json"
        try:
            data = json.loads(ann_file.read_text())
            categories = sorted(data["categories"], key=lambda c: c["id"])  # CocoDataset's label order
            image_ids = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None, {}
        if [c["name"] for c in categories] != class_names:
            return None, {}
        return [int(c["id"]) for c in categories], image_ids

    @classmethod
    def predict_images(cls, runner, paths, names, out, settings):
        """Draws every image's detections scoring above ``settings["conf"]``; returns them in the COCO results
        format (``bbox`` [x, y, w, h] in original pixels) and the number of boxes per class name.

        Each image is letterboxed to the model's input size (as in validation) and the boxes are mapped back to the
        original pixels. For a model trained on a COCO folder whose validation json is still readable,
        ``category_id`` is the json's category id and ``image_id`` the json's id of a listed file name."""
        from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype, to_pil_image
        from torchvision.utils import draw_bounding_boxes

        from cvlab.data.detection import Letterbox, unletterbox_boxes
        from cvlab.utils.images import open_image

        conf = float(settings["conf"])
        size, class_names = runner.info.image_size, list(runner.info.class_names)
        category_ids, known_ids = cls._coco_ids(runner.data, class_names)
        if runner.postprocess is not None:  # thresholding before NMS is faster; the filter below is the rule
            runner.postprocess.conf_thresh = conf
        letterbox = Letterbox(size)
        results, counts = [], Counter()
        for path, name in zip(paths, names):
            pixels = pil_to_tensor(open_image(path, "RGB"))
            height, width = pixels.shape[-2:]
            batch = to_dtype(letterbox(pixels), torch.float32, scale=True)[None]
            with torch.inference_mode():
                detections = runner(batch)[0]
            keep = detections["scores"] > conf
            boxes = unletterbox_boxes(detections["boxes"][keep].float().cpu(), height, width, size)
            scores, labels = detections["scores"][keep].cpu(), detections["labels"][keep].cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).round(decimals=2)
            inside = (xywh[:, 2:] > 0).all(1)  # a box wholly in the letterbox padding has no pixels of the image
            boxes, xywh, scores, labels = boxes[inside], xywh[inside], scores[inside], labels[inside]
            image_id = known_ids.get(path.name, settings["image_ids"][path])
            counts.update(class_names[k] for k in labels)
            for bbox, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
                results.append({"image_id": image_id, "category_id": category_ids[label] if category_ids else label,
                                "bbox": [round(v, 2) for v in bbox], "score": round(score, 5)})
            if len(boxes):
                pixels = draw_bounding_boxes(pixels, boxes,
                                             [f"{class_names[k]} {s:.2f}" for k, s in zip(labels, scores)],
                                             colors=[_PALETTE[int(k) % len(_PALETTE)] for k in labels],
                                             width=max(1, min(height, width) // 200))
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            to_pil_image(pixels).save(out / name)
        return results, counts, "boxes", f"boxes scoring above {conf} in {len(paths)} image(s)"
