"""Semantic segmentation: a segmentor returns per-pixel class logits ``Tensor[N, C, H, W]`` at the input size in
evaluation, and ``{"out": logits, "aux": [logits, ...]}`` in training; masks are class indices ``Tensor[N, H, W]``
with the data's ignore index (255) where the truth is unknown.

Training loss: ``loss(out) + Σ_i model.aux_weights[i] * loss(aux[i])``, where ``loss`` is the ``loss`` group's option
(default: cross-entropy without the ignored pixels; ``loss=dice``, ``loss=ce_dice``: :mod:`cvlab.losses.segmentation`),
given the data's ignore index. ``train/loss`` is the total; with auxiliary outputs each part is logged too
(``train/loss_out``, ``train/loss_aux1``, ...).

Validation (checkpoint selection, ``val/miou``) and test (the reported figures) score the whole split through one
pixel confusion matrix (:class:`~cvlab.metrics.segmentation.SegmentationScores`): ``miou``, ``pixel_acc`` and
``mean_acc``, per-class IoU and accuracy. The report prints the per-class table, draws the confusion matrix and
``overlays.png``: the first validation images (the evaluated split's when no validation ran), their true and
predicted masks over them in the data's palette.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cvlab.data.base import IGNORE_INDEX
from cvlab.metrics.segmentation import SegmentationScores
from cvlab.tasks.base import BaseTask, register_task

# Images drawn in overlays.png: the first of the latest validation pass.
OVERLAY_IMAGES = 4
# How opaque a drawn mask is over its image (overlays.png and cvlab predict's drawn copies).
MASK_ALPHA = 0.55


@register_task("segmentation")
class SegmentationTask(BaseTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.data_info
        self.ignore_index = IGNORE_INDEX if info.ignore_index is None else int(info.ignore_index)
        self.model = self.build_model(num_classes=info.num_classes, in_chans=info.in_chans,
                                      image_size=info.image_size)
        self.criterion = self.build_plugin(self.hparams.loss, num_classes=info.num_classes,
                                           class_counts=list(info.class_counts), ignore_index=self.ignore_index) \
            or nn.CrossEntropyLoss(ignore_index=self.ignore_index)
        self.scores = SegmentationScores(info.num_classes, ignore_index=self.ignore_index)
        self.eval_loss = MeanMetric()
        self.per_class: dict = {}
        # (images, true masks, predicted masks) of the first batch of the latest pass, by split, for overlays.png.
        self.samples: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def forward(self, images: Tensor):
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, masks = batch
        outputs = self(images)  # training mode: {"out": logits, "aux": [logits, ...]}
        out, aux = outputs["out"], outputs["aux"]
        parts = {"loss_out": self.criterion(out, masks)}
        parts.update({f"loss_aux{i + 1}": self.criterion(logits, masks) for i, logits in enumerate(aux)})
        # The segmentor gives one auxiliary output per weight (the Segmentor contract checks it).
        total = parts["loss_out"] + sum(w * parts[f"loss_aux{i + 1}"] for i, w in enumerate(self.model.aux_weights))
        batch_size = len(images)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        if aux:
            for name, value in parts.items():
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    # ------------------------------------------------------------------------------------------ val and test
    def _evaluate_batch(self, batch, batch_idx: int, split: str) -> None:
        images, masks = batch
        logits = self(images)
        self.eval_loss.update(self.criterion(logits, masks), weight=len(masks))
        self.scores.update(logits, masks)
        if batch_idx == 0:
            keep = slice(0, OVERLAY_IMAGES)
            self.samples[split] = (images[keep].detach().float().cpu(), masks[keep].cpu(),
                                   logits[keep].argmax(1).cpu())

    def _log_evaluation(self, split: str) -> None:
        scores = self.scores.compute()  # the whole split's matrix, summed over processes
        self.log_dict({f"{split}/loss": self.eval_loss.compute(),
                       **{f"{split}/{key}": scores[key] for key in ("miou", "pixel_acc", "mean_acc")}},
                      prog_bar=split == "val")
        self.per_class = {key: scores[key].cpu() for key in ("iou_per_class", "acc_per_class", "confusion")}
        self.scores.reset()
        self.eval_loss.reset()

    def report(self, out: Path) -> dict:
        """The per-class table, confusion matrix and overlays of the last evaluation pass; the per-class IoU and
        accuracy (of the classes where they are defined) go to the json."""
        from cvlab.utils.console import class_iou_table, console
        from cvlab.utils.plots import plot_confusion_matrix, plot_mask_overlays

        super().report(out)
        if not self.per_class:
            return {}
        names = self.class_names
        iou, acc = (_defined(self.per_class[key].tolist()) for key in ("iou_per_class", "acc_per_class"))
        confusion = self.per_class["confusion"].numpy()
        console.print(class_iou_table(names, iou, acc, confusion.sum(1).tolist()))
        plot_confusion_matrix(confusion, names, out / "confusion_matrix.png", title="pixel confusion matrix")
        samples = self.samples.get("val") or next(iter(self.samples.values()), None)
        if samples is not None:
            palette = self.palette
            images = (samples[0].clamp(0, 1) * 255).round().to(torch.uint8)
            rows = [tuple(panel.permute(1, 2, 0).numpy() for panel in
                          (_rgb(image), draw_mask(image, truth, palette), draw_mask(image, predicted, palette)))
                    for image, truth, predicted in zip(images, samples[1], samples[2])]
            plot_mask_overlays(rows, names, palette, out / "overlays.png")
        return {"iou_per_class": {n: v for n, v in zip(names, iou) if v is not None},
                "acc_per_class": {n: v for n, v in zip(names, acc) if v is not None}}

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return data_palette(self.data_info)

    # ------------------------------------------------------------------------------------------ predict
    def predict_step(self, batch, batch_idx: int = 0) -> Tensor:
        """Class logits ``Tensor[N, C, S, S]`` of a batch of preprocessed images."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images)

    def eval_transform(self):
        """The evaluation preprocessing of a uint8 image ``Tensor[C, H, W]``: the data's, at the checkpoint's size."""
        from cvlab.data.segmentation import segmentation_eval_transform

        return segmentation_eval_transform(self.data_info.image_size)

    @classmethod
    def predict_images(cls, runner, paths, names, out, settings):
        """Per image: the class mask at the image's own size (the logits resized back, bilinear, then arg-maxed),
        saved as a palette PNG of class indices in ``masks/``, the mask drawn over the image at ``out / name``, and
        a json record of each class's share of the pixels; returns the predicted pixels per class name."""
        from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

        from cvlab.utils.images import open_image

        info = runner.info
        class_names, palette = list(info.class_names), data_palette(info)
        mode = "L" if info.in_chans == 1 else "RGB"
        results, counts = [], Counter()
        for path, name in zip(paths, names):
            pixels = pil_to_tensor(open_image(path, mode))
            height, width = pixels.shape[-2:]
            with torch.inference_mode():
                logits = runner(runner.transform(pixels)[None])
                logits = F.interpolate(logits.float().cpu(), size=(height, width), mode="bilinear",
                                       align_corners=False)
            mask = logits[0].argmax(0)
            per_class = torch.bincount(mask.flatten(), minlength=len(class_names)).tolist()
            counts.update({class_names[k]: n for k, n in enumerate(per_class) if n})
            mask_name = Path("masks") / name
            for target, image in ((out / mask_name, palette_image(mask, palette)),
                                  (out / name, to_pil_image(draw_mask(pixels, mask, palette)))):
                target.parent.mkdir(parents=True, exist_ok=True)
                image.save(target)
            results.append({"image_id": settings["image_ids"][path],
                            "file_name": str(path.relative_to(settings["root"])), "mask": str(mask_name),
                            "height": int(height), "width": int(width),
                            "pixel_share": {class_names[k]: round(n / mask.numel(), 5)
                                            for k, n in enumerate(per_class) if n}})
        return results, counts, "pixels", f"predicted pixels per class in {len(paths)} image(s)"


def _defined(values: list[float]) -> list[float | None]:
    """NaN (undefined) as None."""
    return [None if v != v else float(v) for v in values]


def _rgb(image: Tensor) -> Tensor:
    """uint8 ``Tensor[3, H, W]`` of a 1- or 3-channel image."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def data_palette(info) -> list[tuple[int, int, int]]:
    """The data's palette: one RGB colour per class."""
    return [tuple(colour) for colour in info.palette]


def draw_mask(image: Tensor, mask: Tensor, palette: list[tuple[int, int, int]], alpha: float = MASK_ALPHA) -> Tensor:
    """``mask`` (class indices ``Tensor[H, W]``) drawn over ``image`` (uint8 ``Tensor[C, H, W]``) in the palette's
    colours (torchvision's ``draw_segmentation_masks``): uint8 ``Tensor[3, H, W]``; ignored pixels are left as
    they are."""
    from torchvision.utils import draw_segmentation_masks

    classes = torch.arange(len(palette))[:, None, None]
    return draw_segmentation_masks(_rgb(image), mask[None].to(classes.device) == classes, alpha=alpha,
                                   colors=list(palette))


def palette_image(mask: Tensor, palette: list[tuple[int, int, int]]):
    """A palette ("P" mode) PIL image of the class indices ``mask`` (``Tensor[H, W]``): each pixel's value is its
    class, shown in the class's colour."""
    import PIL.Image

    image = PIL.Image.fromarray(mask.to(torch.uint8).numpy())  # "L"; a palette makes it "P", values unchanged
    image.putpalette([v for colour in palette for v in colour])
    return image
