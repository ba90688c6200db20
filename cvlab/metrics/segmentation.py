"""Semantic segmentation metrics over a whole split: mIoU, per-class IoU, pixel accuracy and mean class accuracy, all
from one accumulated pixel confusion matrix.

:class:`SegmentationScores` is torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=...)``, which
*is* a ``MulticlassConfusionMatrix``: its one state is the ``[C, C]`` matrix (rows true classes, columns
predictions) of every pixel it was given, summed over batches and, under DDP, over processes (torchmetrics'
``dist_reduce_fx="sum"``). mIoU is torchmetrics' own macro Jaccard of that matrix; the other figures are read off the
same matrix here, so the four always describe exactly the same pixels.

Why not ``torchmetrics.segmentation.MeanIoU``: it computes an IoU per image (per batch element) and averages those,
which weighs a small image's few pixels like a large one's and differs from the dataset-level IoU that segmentation
papers and MMSegmentation report; and it has no ignore index, so VOC's 255 boundary pixels would count as a class.

How a class is treated when the evaluated data never shows it:

- absent from both truth and prediction (union 0): its IoU is undefined, reported as NaN, and left out of the mIoU
  mean (torchmetrics gives it weight 0); its accuracy is undefined too, and left out of the mean accuracy;
- absent from the truth but predicted somewhere: IoU 0 (every such pixel is a false positive) and counted in the
  mIoU; its accuracy (recall) is undefined, NaN, and left out of the mean accuracy.

This is MMSegmentation's ``nanmean`` convention. Pixels whose truth is ``ignore_index`` (255) are not counted at all,
whatever was predicted there.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

from cvlab.data.base import IGNORE_INDEX


class SegmentationScores(MulticlassJaccardIndex):
    """``update(preds, target)``: ``preds`` logits ``Tensor[N, C, H, W]`` (arg-maxed over C) or class indices
    ``Tensor[N, H, W]``, ``target`` class indices ``Tensor[N, H, W]`` with ``ignore_index`` for unlabelled pixels.

    ``compute()`` returns ``{"miou", "pixel_acc", "mean_acc"}`` (scalar tensors), ``"iou_per_class"`` and
    ``"acc_per_class"`` (``Tensor[C]``, NaN where undefined: see the module docstring) and ``"confusion"``
    (``Tensor[C, C]`` pixel counts, rows true classes). ``pixel_acc`` is correct pixels / counted pixels;
    ``mean_acc`` the mean over classes of correct / true pixels of the class.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs):
        super().__init__(num_classes, average="macro", ignore_index=ignore_index, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        miou = super().compute()  # torchmetrics' macro Jaccard index of the (synchronised) matrix
        confusion = self.confmat.double()
        correct = confusion.diagonal()
        truth, predicted = confusion.sum(1), confusion.sum(0)
        union = truth + predicted - correct
        nan = torch.full_like(correct, float("nan"))
        iou = torch.where(union > 0, correct / union.clamp(min=1), nan)
        acc = torch.where(truth > 0, correct / truth.clamp(min=1), nan)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            iou[self.ignore_index] = acc[self.ignore_index] = float("nan")  # a class that is ignored is not scored
        total = confusion.sum()
        pixel_acc = correct.sum() / total if total > 0 else total.new_tensor(float("nan"))
        return {"miou": miou, "pixel_acc": pixel_acc.float(), "mean_acc": acc.nanmean().float(),
                "iou_per_class": iou.float(), "acc_per_class": acc.float(), "confusion": self.confmat.clone()}
