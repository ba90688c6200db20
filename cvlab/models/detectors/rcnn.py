"""R-CNN, assembled for evaluation: a CNN on warped proposals, one linear SVM per class, one box regressor per class.

Paper: Girshick, Donahue, Darrell & Malik 2014, "Rich feature hierarchies for accurate object detection and semantic
segmentation" (CVPR; R-CNN). §2.2 (test: ~2000 selective-search proposals, each warped and scored by every class's
SVM, then greedy NMS per class at IoU 0.3), Appendix C (class-specific box regression).

R-CNN is not trained end to end: ``cvlab train model=rcnn`` runs its stages (:mod:`cvlab.engine.rcnn`: proposals,
fine-tuning, features, SVMs, box regression) and writes this module, whose weights are the stages' results:

- ``cnn``: the fine-tuned zoo classifier (``backbone``, fine-tuned as a ``K + 1``-way classifier of warped regions)
  with its classifying layer removed: it maps a warped region to its penultimate feature vector (fc7 in the
  paper's AlexNet);
- ``feature_scale``: the factor that gives the training features R-CNN's mean L2 norm of 20 (the released code's
  ``feat_norm_mean``), applied before the SVMs and the regressors;
- ``svm``: the ``K`` linear SVMs (``sklearn.svm.LinearSVC``) as one ``nn.Linear(D, K)``: a region's scores are its
  SVM margins (0 is the decision boundary, so ``cvlab predict conf=0`` draws what the SVMs call objects);
- ``box_regressor``: the ``K`` ridge regressors (``sklearn.linear_model.Ridge``) as one ``nn.Linear(D, 4K)`` giving
  each class's ``(t_x, t_y, t_w, t_h)`` (:class:`~cvlab.ops.box_coder.BoxCoder`) relative to the proposal.

Where cvlab departs from the paper, and why: the box regressors read the same penultimate features as the SVMs (the
paper regresses from pool5, a layer every zoo CNN does not have; one feature pass serves both), and the regions are
warped with :func:`cvlab.data.regions.warp_regions` (context p scaled to the warp size). Proposals come with the
data (cached, :mod:`cvlab.data.proposals`) or, when none are given (``cvlab predict`` on new images), are computed
here by selective search with ``proposals`` settings.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cvlab.data.regions import PAPER_CONTEXT, context_padding, warp_regions
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import create_model, list_models, model_task, register_model
from cvlab.ops.box_coder import BoxCoder
from cvlab.ops.postprocess import select_detections
from cvlab.ops.proposals import compute_proposals, proposal_settings
from cvlab.utils.errors import UserError

# Warped regions run through the CNN this many at a time: bounds the memory of one image's ~2000 regions.
REGION_CHUNK = 256


def classifier_path(cnn: nn.Module, num_outputs: int) -> str:
    """The dotted name of ``cnn``'s classifying layer: the last ``nn.Linear`` with ``num_outputs`` outputs (``fc``,
    ``classifier.3``, ``head``, ``head.fc``); its input is the penultimate feature vector."""
    names = [name for name, module in cnn.named_modules()
             if isinstance(module, nn.Linear) and module.out_features == num_outputs]
    if not names:
        raise UserError(f"{type(cnn).__name__} ends in no fully connected classifier (darknet19 classifies with a 1x1 "
                        "convolution), so it has no penultimate feature vector for R-CNN's SVMs; choose another "
                        "model.backbone (resnet*, mobilenet*, vit_*, darknet53).")
    return names[-1]


def region_cnn(backbone: str, num_classes: int, warp_size: int, backbone_args: dict | None = None,
               norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
               attn_layer: AttnFactory | None = None) -> nn.Module:
    """The zoo classifier ``backbone`` that R-CNN fine-tunes: ``num_classes + 1`` outputs (background first) on
    ``warp_size`` inputs, with ``backbone_args`` (its own options, e.g. ``stem``)."""
    classifiers = list_models(task="classification")
    if backbone not in classifiers:
        model_task(backbone)  # an unknown name gets the registry's close matches
        raise UserError(f"rcnn's backbone must be a classification model, got {backbone!r}; choose one of "
                        f"{', '.join(classifiers)}.")
    try:
        return create_model(backbone, num_classes=num_classes + 1, in_chans=3, image_size=warp_size,
                            norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer, **(backbone_args or {}))
    except (TypeError, ValueError) as error:
        raise UserError(f"model.backbone_args={backbone_args} do not suit {backbone}: {error}; give that model's own "
                        f"options (`cvlab info model={backbone}`), or model.backbone_args={{}}.") from None


class RCNN(nn.Module):
    """R-CNN's test-time detector (see the module docstring): ``forward(images, targets=None, proposals=None)``
    in eval mode gives ``list[dict(boxes=Tensor[D, 4], scores=Tensor[D], labels=Tensor[D])]`` (0-based labels,
    xyxy in the input's pixels, scores = SVM margins).

    ==========================================  ======================  ============
    variant                                     classes                 params
    ==========================================  ======================  ============
    rcnn (resnet18, stem standard, warp 32)     20 (PASCAL VOC)         11,227,812
    rcnn (resnet18, stem standard, warp 32)     5 (shapes_det)          11,189,337
    ==========================================  ======================  ============

    Args:
        num_classes: K object classes.
        backbone / backbone_args: the zoo classification model and its options (:func:`region_cnn`).
        warp_size: the side S every region is warped to (the paper: 227).
        context: the padding p around each box, in pixels of a 227 px warp (the paper's 16; scaled by S / 227).
        proposals: selective-search settings (:func:`~cvlab.ops.proposals.proposal_settings`) for images given
            without proposals.
        conf_thresh: (region, class) pairs whose SVM score is at most this are dropped before NMS (-1: beyond the
            margin on the background side, where the SVM is sure; it keeps NMS and the ranking short).
        iou_thresh: per-class NMS IoU (the paper's 0.3).
        max_det: detections kept per image (COCO scores 100).
        image_size: the detector's input size; unused (every region is warped to ``warp_size``), taken for the
            detection contract.
        norm_layer / act_layer / attn_layer: the CNN's (the model contract).
    """

    needs_proposals = True

    def __init__(self, num_classes: int = 20, backbone: str = "resnet18", backbone_args: dict | None = None,
                 warp_size: int = 32, context: float = PAPER_CONTEXT, proposals: dict | None = None,
                 conf_thresh: float = -1.0, iou_thresh: float = 0.3, max_det: int = 100,
                 image_size: int | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        self.num_classes, self.warp_size, self.context = num_classes, warp_size, float(context)
        self.padding = context_padding(warp_size, context)
        self.proposal_settings = proposal_settings(proposals)
        self.conf_thresh, self.iou_thresh, self.max_det = conf_thresh, iou_thresh, max_det
        self.cnn = region_cnn(backbone, num_classes, warp_size, backbone_args, norm_layer, act_layer, attn_layer)
        # The (K + 1)-way classifier only served the fine-tuning: the SVMs read its input.
        self.classifier_path = classifier_path(self.cnn, num_classes + 1)
        self.num_features = self.cnn.get_submodule(self.classifier_path).in_features
        self.cnn.set_submodule(self.classifier_path, nn.Identity())
        self.register_buffer("feature_scale", torch.ones(()))
        self.svm = nn.Linear(self.num_features, num_classes)
        self.box_regressor = nn.Linear(self.num_features, 4 * num_classes)
        # Until the stages fill them in: every class scores 0 and no box moves.
        for layer in (self.svm, self.box_regressor):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.box_coder = BoxCoder()

    def region_features(self, image: Tensor, boxes: Tensor) -> Tensor:
        """The CNN's penultimate features of ``boxes: Tensor[R, 4]`` of ``image: Tensor[3, H, W]``, warped:
        ``Tensor[R, D]``, before ``feature_scale``."""
        chunks = [self.cnn(warp_regions(image, boxes[start:start + REGION_CHUNK], self.warp_size, self.padding))
                  for start in range(0, len(boxes), REGION_CHUNK)]
        return torch.cat(chunks) if chunks else image.new_zeros(0, self.num_features)

    def detect(self, image: Tensor, proposals: Tensor) -> dict[str, Tensor]:
        """One image's detections from its ``proposals: Tensor[R, 4]``: every class's SVM score and regressed box
        for every proposal, then per-class NMS (:func:`~cvlab.ops.postprocess.select_detections`)."""
        proposals = proposals.to(image.device, torch.float32)
        features = self.region_features(image, proposals) * self.feature_scale
        scores = self.svm(features)
        deltas = self.box_regressor(features).view(len(features), self.num_classes, 4)
        boxes = self.box_coder.decode(deltas, proposals[:, None])
        return select_detections(boxes, scores, tuple(image.shape[-2:]), self.conf_thresh, self.iou_thresh,
                                 self.max_det)

    def forward(self, images: Tensor, targets: list[dict] | None = None,
                proposals: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        """``images: Tensor[N, 3, H, W]`` in [0, 1]; ``proposals``: ``Tensor[R_i, 4]`` per image in its pixels (None:
        selective search here). Eval only: R-CNN's stages are trained apart."""
        if self.training:
            raise RuntimeError("R-CNN's detector is assembled from stages trained apart (`cvlab train model=rcnn`); "
                               "it has no training forward: call it in eval mode")
        if proposals is None:
            proposals = [compute_proposals(image, self.proposal_settings) for image in images]
        return [self.detect(image, boxes) for image, boxes in zip(images, proposals)]

    def extra_repr(self) -> str:
        return (f"warp_size={self.warp_size}, context={self.context:g} (padding {self.padding:.2f} px), "
                f"proposals={self.proposal_settings}, conf_thresh={self.conf_thresh}, iou_thresh={self.iou_thresh}, "
                f"max_det={self.max_det}")


@register_model(task="detection")
def rcnn(num_classes: int = 20, **kwargs) -> RCNN:
    """R-CNN (Girshick et al. 2014) on a zoo CNN (``backbone``, default resnet18)."""
    return RCNN(num_classes, **kwargs)
