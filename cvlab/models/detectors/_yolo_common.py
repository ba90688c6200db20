"""Pieces shared by the YOLO detectors: the train/eval forward of the detection contract, the loss and backbone
options, and the anchor-based detector (YOLOv2 / YOLOv3 and their tiny variants) assembled from backbone, neck and
:class:`~cvlab.models.heads.anchor_head.AnchorHead`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cvlab.layers.init import restore_own_inits
from cvlab.layers.rep import fuse_modules
from cvlab.losses.yolo import AnchorYoloLoss
from cvlab.models._registry import create_model, list_models, model_task
from cvlab.models.backbones.darknet import init_darknet_weights
from cvlab.models.heads.anchor_head import AnchorHead
from cvlab.ops.postprocess import DetectionPostprocess
from cvlab.utils.errors import UserError

# Anchor sets of the released cfgs are for 416×416 inputs; cvlab scales them to the model's image_size.
RELEASE_IMAGE_SIZE = 416


def anchors_for(anchors: Sequence[Sequence[float]] | None, default: Sequence[Sequence[float]],
                image_size: int, release_size: int = RELEASE_IMAGE_SIZE) -> torch.Tensor:
    """Tensor[K, 2] anchor (w, h) in pixels: the user's list as given (pixels at the model's image_size), else the
    released default rescaled from ``release_size`` px (416; YOLOv5's are for 640) to ``image_size``."""
    if anchors is not None:
        # Plain floats first: Hydra hands the list over as nested ListConfig.
        wh = torch.tensor([(float(w), float(h)) for w, h in anchors], device="cpu")
    else:
        wh = torch.as_tensor(default, dtype=torch.float32, device="cpu") * (image_size / release_size)
    if (wh <= 0).any():
        raise ValueError(f"anchor sizes must be positive, got {wh.tolist()}")
    return wh


def check_loss(loss: nn.Module | None, fits: type[nn.Module], options: str, model: str,
               default: Callable[[], nn.Module]) -> nn.Module:
    """``loss``, or ``default()`` (the paper's loss) when None; a loss of another kind is refused, naming the
    ``loss=`` options (``options``) whose targets are ``fits``."""
    if loss is None:
        return default()
    if not isinstance(loss, fits):
        raise UserError(f"{model} cannot train with {type(loss).__name__}; its loss is a "
                        f"{fits.__module__}.{fits.__name__}: choose {options}.")
    return loss


def yolo_backbone(backbone: str | None, paper_trunk: Callable[[], nn.Module], num_levels: int, model: str,
                  image_size: int, **backbone_kwargs) -> nn.Module:
    """The feature module a YOLO reads its ``num_levels`` levels from (finest first): the paper's trunk when
    ``backbone`` is None, else the zoo backbone's last ``num_levels`` stages
    (``create_model(backbone, features_only=True, image_size=image_size, **backbone_kwargs)``).

    Consecutive levels must halve the resolution (the necks upsample ×2 or reorganise 2×2 blocks), so a backbone
    whose stages do not (ViT) is refused; ``image_size`` must be a multiple of the coarsest level's stride.
    """
    if backbone is None:
        trunk = paper_trunk()
    else:
        backbones = list_models(task="classification")
        if backbone not in backbones:
            model_task(backbone)  # an unknown name gets the registry's close matches
            raise UserError(f"{model}'s backbone must be a classification model, got {backbone!r}; "
                            f"choose one of {', '.join(backbones)}.")
        trunk = create_model(backbone, features_only=True, out_indices=tuple(range(-num_levels, 0)),
                             image_size=image_size, **backbone_kwargs)
    reductions = trunk.feature_info.reductions()
    if any(fine * 2 != coarse for fine, coarse in zip(reductions, reductions[1:])):
        raise UserError(f"{model} reads {num_levels} backbone levels, each at half the resolution of the one "
                        f"before (strides such as 8, 16, 32), but {backbone}'s last {num_levels} stages have "
                        f"reductions {reductions}; choose a CNN backbone (resnet*, mobilenet*, darknet*).")
    if image_size % reductions[-1]:
        raise ValueError(f"{model} needs image_size to be a multiple of {reductions[-1]}, got {image_size}")
    return trunk


class YoloDetector(nn.Module):
    """The detection contract for every YOLO: ``forward(images: Tensor[N, 3, H, W], targets=None)``.

    Training returns the loss dict (``loss_box``, ``loss_obj``, ``loss_noobj``, ``loss_cls``); eval returns one
    ``dict(boxes=Tensor[K, 4] xyxy pixels, scores=Tensor[K], labels=Tensor[K] int64)`` per image.
    Subclasses implement ``forward_raw(images)``, ``compute_loss(raw, targets, image_size)`` and
    ``decode(raw, image_size) -> (boxes Tensor[N, P, 4], scores Tensor[N, P, C])``.
    """

    def __init__(self, postprocess: DetectionPostprocess):
        super().__init__()
        self.postprocess = postprocess

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        raw = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("a YOLO model in training mode needs targets (list of dict(boxes, labels))")
            return self.compute_loss(raw, targets, image_size)
        boxes, scores = self.decode(raw, image_size)
        return self.postprocess(boxes, scores, image_size)

    def fuse(self) -> None:
        """The deployed network, in place (eval mode; the fuse hook that ``cvlab export``, and ``cvlab eval`` and
        ``cvlab predict`` of a checkpoint, call): every part's own fuse hook, innermost first
        (:func:`~cvlab.layers.rep.fuse_modules`): each conv's BatchNorm folded into it, each RepVGG block one
        biased 3×3 conv. Idempotent; the outputs stay the eval outputs up to float rounding."""
        fuse_modules(self, include_root=False)


class AnchorYolo(YoloDetector):
    """A YOLO with anchors (v2, v3): ``head(neck(backbone(images)))`` gives one raw level
    ``Tensor[N, A, H_l, W_l, 5 + C]`` per entry of ``anchor_masks``, in that order.

    Args:
        backbone: feature module, ``forward(images) -> list[Tensor]`` (finest level first).
        neck: levels in, levels out (``nn.Identity`` to pass the backbone's levels on).
        head: the :class:`~cvlab.models.heads.anchor_head.AnchorHead`.
        anchors: Tensor[K, 2] (w, h) in pixels.
        anchor_masks: for each output level, the indices of its anchors in ``anchors``.
        loss: the :class:`~cvlab.losses.yolo.AnchorYoloLoss` to train with; its class probabilities (softmax or
            sigmoid) also score the classes at eval.

    Eval scores are ``σ(to) · class probability``; the grid follows the input, so any size that is a multiple of
    the largest stride works. The neck and head start with Darknet's init (and the output convs at their prior);
    the backbone keeps its own.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: AnchorHead, anchors: torch.Tensor,
                 anchor_masks: Sequence[Sequence[int]], loss: AnchorYoloLoss, postprocess: DetectionPostprocess):
        super().__init__(postprocess)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.num_classes = head.num_classes
        self.register_buffer("anchors", anchors)
        self.anchor_masks = [list(mask) for mask in anchor_masks]
        self.loss = loss
        for part in (neck, head):
            init_darknet_weights(part)
        restore_own_inits(head)  # the output convs' prior

    def level_anchors(self) -> list[torch.Tensor]:
        return [self.anchors[mask] for mask in self.anchor_masks]

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class logits Tensor[..., C] → probabilities, as the loss trains them (softmax or sigmoid)."""
        return self.loss.class_probabilities(logits)

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tensor[N, 3, H, W] → per level Tensor[N, A, H_l, W_l, 5 + C]."""
        return self.head(self.neck(self.backbone(images)))

    def compute_loss(self, raw: list[torch.Tensor], targets: list[dict], image_size: tuple[int, int]):
        return self.loss(raw, self.level_anchors(), targets, image_size, xy_scales=self.head.level_xy_scales())

    def decode(self, raw: list[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.decode(raw, self.level_anchors(), image_size, self.class_probabilities)
