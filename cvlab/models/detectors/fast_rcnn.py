"""Fast R-CNN, and what the two-stage detectors share.

Paper: Girshick 2015, "Fast R-CNN" (ICCV).

R-CNN runs its CNN once per warped proposal; Fast R-CNN runs the conv layers once per image and pools each
proposal's features from the shared map (§2.1, "RoI pooling": max pooling of the RoI's window to a fixed 7 × 7 grid,
``torchvision.ops.roi_pool``). Two FC layers follow, then two sibling outputs: a softmax over K + 1 classes and a
per-class box regressor, trained together with the multi-task loss (cross-entropy + smooth-L1 on the foreground
RoIs, λ = 1). Training samples 64 RoIs per image, 25 % of them foreground (IoU ≥ 0.5 with an object), the rest
background (best IoU in [0.1, 0.5)), and the objects' own boxes join the proposals; the paper's mini-batch is 2
images. At test the boxes of each class are decoded from their proposal and NMS-ed at 0.3. The proposals are
selective search's (Uijlings et al. 2013): given per image (the cached ones of the data,
:mod:`cvlab.data` with the model's ``proposals:`` settings), or computed here when not
(:func:`cvlab.ops.proposals.compute_proposals`, e.g. for ``cvlab predict`` on new images).

The paper's trunk is VGG16 with conv5_3 (stride 16) pooled; here any zoo classification backbone gives the map, by
default its stage of stride 16 (``level=-2``: ResNet's layer3, the C4 map of the ResNet paper's detectors). Images
come in [0, 1] and are normalised inside with ImageNet's mean and std, as torchvision's detectors do.

The RoI head is :mod:`cvlab.models.heads.roi_heads`, shared with Faster R-CNN (:mod:`.faster_rcnn`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import create_model, list_models, model_task, register_model
from cvlab.models.backbones.features import Backbone, FeatureExtractor, FeatureInfo
from cvlab.models.heads.roi_heads import ROI_MODES, BoxPredictor, RoIHeads, RoIPooler, TwoMLPHead
from cvlab.utils.errors import UserError
from cvlab.utils.validate import check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _measured_taps(net: Backbone, modules: list[str], image_size: int) -> dict[str, dict]:
    """``feature_info`` entries for backbone modules named by path: channels and stride of their outputs, from one
    forward pass of a zero image (eval mode, no gradient)."""
    if not modules:
        return {}
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for name in modules:
        try:
            module = net.get_submodule(name)
        except AttributeError:
            raise UserError(f"the backbone has no module {name!r} to take a level from; give a stage index of its "
                            f"feature_info (0..{len(net.feature_info) - 1}) or one of its modules, e.g. "
                            f"{', '.join(net.feature_info.module_names())}.") from None
        hooks.append(module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape)))
    training = net.training
    net.eval()
    with torch.no_grad():
        net.forward_features(torch.zeros(1, 3, image_size, image_size))
    net.train(training)
    for hook in hooks:
        hook.remove()
    taps = {}
    for name in modules:
        if len(shapes.get(name, ())) != 4:
            raise UserError(f"backbone module {name!r} gives no feature map (Tensor[N, C, H, W]) to take a level from.")
        taps[name] = dict(num_chs=int(shapes[name][1]), reduction=image_size // int(shapes[name][-1]), module=name)
    return taps


# Backbone options when a detector is given none: detection trunks keep the stride-4 stem at every input size.
DEFAULT_BACKBONE_ARGS = {"stem": "standard"}


def detection_trunk(backbone: str, levels: Sequence[int | str], model: str, image_size: int,
                    norm_layer: NormFactory | None, act_layer: ActFactory | None, attn_layer: AttnFactory | None,
                    backbone_args: Mapping[str, Any] | None = None) -> FeatureExtractor:
    """The zoo classification backbone ``backbone`` as a two-stage detector's trunk, giving the maps of ``levels``
    (finest first): each an index into the backbone's ``feature_info`` (negative from the end), or the dotted name
    of one of its modules whose output to take (torchvision's MobileNet detectors tap ``features.13``, the first
    block of the last stage, which no stage ends on). ``backbone_args`` are the backbone's own options (None:
    :data:`DEFAULT_BACKBONE_ARGS`; ``{}`` for a backbone without a ``stem``, e.g. vit_*). The trunk holds nothing
    after the last level."""
    backbones = list_models(task="classification")
    if backbone not in backbones:
        model_task(backbone)  # an unknown name gets the registry's close matches
        raise UserError(f"{model}'s backbone must be a classification model, got {backbone!r}; "
                        f"choose one of {', '.join(backbones)}.")
    options = dict(DEFAULT_BACKBONE_ARGS if backbone_args is None else backbone_args)
    try:
        net = create_model(backbone, image_size=image_size, norm_layer=norm_layer, act_layer=act_layer,
                           attn_layer=attn_layer, **options)
    except TypeError as error:
        settings = ", ".join(f"{key}={value}" for key, value in options.items())
        raise UserError(f"{model} cannot build backbone {backbone!r} with model.backbone_args {{{settings}}} "
                        f"({error}); give the options it takes ({{}} for none).") from error
    levels = list(levels)
    taps = _measured_taps(net, [level for level in levels if isinstance(level, str)], image_size)
    count = len(net.feature_info)
    selected = []
    for level in levels:
        if isinstance(level, str):
            selected.append(taps[level])
        elif -count <= int(level) < count:
            selected.append(dict(net.feature_info[int(level)]))
        else:
            raise UserError(f"{model}'s level {level} goes past {backbone}'s {count} stages "
                            f"(valid: 0..{count - 1} or -{count}..-1).")
    # The extractor runs the backbone up to the levels it is given (feature_info describes the taps).
    net.feature_info = FeatureInfo(selected)
    try:
        return FeatureExtractor(net)
    except ValueError as error:
        raise UserError(f"{model} cannot take levels {levels} from {backbone} ({error}); give them in forward "
                        "order, finest first.") from error


def box_roi_heads(num_classes: int, in_chs: int, reductions: Sequence[int], roi: str, output_size: int,
                  sampling_ratio: int, representation_size: int, act_layer: ActFactory | None, model: str,
                  focal_gamma: float | None = None, **settings) -> RoIHeads:
    """RoI pooling (``roi``: ``"pool"`` or ``"align"``) on levels of ``in_chs`` channels and strides ``reductions``,
    the two FC layers and the sibling outputs (K sigmoid class outputs with ``focal_gamma``, else K + 1 with the
    background); ``focal_gamma`` and ``settings`` go to :class:`RoIHeads`."""
    check_choice(f"{model}'s roi", roi, ROI_MODES)
    pooler = RoIPooler(reductions, output_size, roi, sampling_ratio)
    box_head = TwoMLPHead(in_chs * output_size ** 2, representation_size, act_layer)
    predictor = BoxPredictor(representation_size, num_classes, background=focal_gamma is None)
    return RoIHeads(pooler, box_head, predictor, focal_gamma=focal_gamma, **settings)


class TwoStageDetector(nn.Module):
    """The detection contract of the R-CNN family: ``forward(images: Tensor[N, 3, H, W] in [0, 1], targets=None,
    proposals=None)``.

    Training returns the loss dict (the proposal stage's ``loss_*`` and the box head's ``loss_classifier``,
    ``loss_box_reg``); eval one ``dict(boxes=Tensor[D, 4] xyxy pixels, scores=Tensor[D], labels=Tensor[D] int64
    0-based)`` per image. The images are normalised with ImageNet's mean / std, then ``neck(backbone(·))`` gives the
    levels; subclasses implement :meth:`propose`.
    """

    needs_proposals = False

    def __init__(self, backbone: FeatureExtractor, neck: nn.Module, roi_heads: RoIHeads):
        super().__init__()
        self.backbone, self.neck, self.roi_heads = backbone, neck, roi_heads
        self.num_classes = roi_heads.box_predictor.num_classes
        # Not in the state dict: the constants of the input convention, as torchvision's transform holds them.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD), persistent=False)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tensor[N, 3, H, W] in [0, 1] → the neck's levels, finest first."""
        mean, std = self.image_mean.to(images.dtype), self.image_std.to(images.dtype)
        return self.neck(self.backbone((images - mean[:, None, None]) / std[:, None, None]))

    def propose(self, images: torch.Tensor, levels: list[torch.Tensor], image_size: tuple[int, int],
                targets: list[dict] | None, proposals: list[torch.Tensor] | None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """One ``Tensor[K_i, 4]`` of proposals per image (no gradient), and the proposal stage's losses."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None,
                proposals: list[torch.Tensor] | None = None):
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} in training mode needs targets (list of dict(boxes, labels))")
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        levels = self.levels(images)
        proposals, losses = self.propose(images, levels, image_size, targets, proposals)
        result = self.roi_heads(levels, proposals, image_size, targets)
        return {**losses, **result} if self.training else result


class FastRCNN(TwoStageDetector):
    """Fast R-CNN on a zoo backbone: RoI pooling of given (selective-search) proposals, two FC, softmax + per-class
    box regression.

    Measured by cvlab (``torch.nn.Module.parameters``, BatchNorm affine parameters included):

    ======================================================================  ===========
    variant                                                                 params
    ======================================================================  ===========
    ``fast_rcnn()``: ResNet-50 to layer3 (1024 ch), 7×7, FC 1024, 20 cls    61,081,769
    ``model=fast_rcnn`` at 128 px, 5 classes: ResNet-18 to layer3 (256 ch)  16,709,214
    the same with ``model.focal_gamma=2`` (5 sigmoid class outputs, not 6)  16,708,189
    ======================================================================  ===========

    (The first FC dominates: 256 · 7 · 7 → 1024 is 12.8 M of the ResNet-18 variant's 16.7 M; VGG16's fc6 in the
    paper is 25088 → 4096, 102.8 M. The focal classifier drops the background's logit: ``representation_size`` + 1
    parameters.)

    Args:
        num_classes: foreground classes K (the classifier has K + 1 outputs, background first).
        image_size: the input size the backbone is built for (its ``stem="auto"``, a ViT's grid).
        backbone: a zoo classification model; ``level`` picks its map: an index into its ``feature_info`` (-2:
            the stage of stride 16, as the paper's conv5_3) or a module name.
        backbone_args: the backbone's own options; None: ``{"stem": "standard"}`` (stride 4 before the first
            stage at every input size, as detection trunks have); ``{}`` for a backbone without a stem (vit_*).
        roi: ``"pool"`` (the paper's RoI max pooling) or ``"align"`` (RoIAlign); ``roi_output_size`` its grid.
        representation_size / width: the FC width (×``width``).
        batch_size_per_image / positive_fraction / fg_iou / bg_iou: the paper's 64 RoIs, 25 % with IoU ≥ 0.5,
            background [0.1, 0.5).
        ohem_rois / ohem_nms: > 0: online hard example mining in place of that sampling, the ``ohem_rois`` RoIs
            of highest loss per image after NMS at ``ohem_nms`` (:class:`~cvlab.models.heads.roi_heads.RoIHeads`;
            Shrivastava et al. 2016: 64 an image, background down to IoU 0, ``bg_iou=[0, 0.5]``).
        box_loss_beta: the smooth-L1's β (1, the paper's).
        focal_gamma / focal_alpha: None: the paper's softmax over K + 1; a number: K sigmoid class outputs (the
            background all of them 0, RetinaNet's form) trained with the sigmoid focal loss of that γ and α
            (RetinaNet's 2 and 0.25; :class:`~cvlab.models.heads.roi_heads.RoIHeads`), each detection scored by its
            class's sigmoid.
        score_thresh / nms_thresh / detections_per_img: test post-processing (0.05, 0.3, 100).
        proposals: the selective-search settings (``method``, ``mode``, ``max_proposals``, ``min_size``) the data
            caches proposals with and this model computes them with when ``forward`` gets none.
        norm_layer / act_layer / attn_layer: the backbone's (act_layer also the FC layers'; default ReLU).
    """

    needs_proposals = True

    def __init__(self, num_classes: int = 20, image_size: int = 600, backbone: str = "resnet50",
                 level: int | str = -2, backbone_args: Mapping[str, Any] | None = None, roi: str = "pool",
                 roi_output_size: int = 7, sampling_ratio: int = 2, representation_size: int = 1024,
                 width: float = 1.0, batch_size_per_image: int = 64, positive_fraction: float = 0.25,
                 fg_iou: float = 0.5, bg_iou: Sequence[float] = (0.1, 0.5), box_loss_beta: float = 1.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_img: int = 100,
                 ohem_rois: int = 0, ohem_nms: float = 0.7, focal_gamma: float | None = None,
                 focal_alpha: float | None = 0.25, proposals: Mapping[str, Any] | None = None,
                 norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                 attn_layer: AttnFactory | None = None):
        from cvlab.ops.proposals import proposal_settings

        trunk = detection_trunk(backbone, [level], "fast_rcnn", image_size, norm_layer, act_layer, attn_layer,
                                backbone_args)
        roi_heads = box_roi_heads(
            num_classes, trunk.feature_info.channels()[0], trunk.feature_info.reductions(), roi, roi_output_size,
            sampling_ratio, round(representation_size * width), act_layer, "fast_rcnn", fg_iou=fg_iou,
            bg_iou=tuple(bg_iou), batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
            box_loss_beta=box_loss_beta, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img, ohem_rois=ohem_rois, ohem_nms=ohem_nms, focal_gamma=focal_gamma,
            focal_alpha=focal_alpha,
        )
        super().__init__(trunk, nn.Identity(), roi_heads)
        self.proposal_settings = proposal_settings(proposals)

    def propose(self, images, levels, image_size, targets, proposals):
        if proposals is None:
            from cvlab.ops.proposals import compute_proposals

            proposals = [compute_proposals(image, self.proposal_settings) for image in images.detach().cpu()]
        return [p.to(images.device, torch.float32).reshape(-1, 4) for p in proposals], {}


@register_model(task="detection")
def fast_rcnn(num_classes: int = 20, image_size: int = 600, backbone: str = "resnet50", **kwargs) -> FastRCNN:
    """Fast R-CNN (Girshick 2015) on a zoo backbone's stride-16 map: RoI pooling 7×7, two FC, softmax + per-class
    box regression; 64 RoIs per image at 25 % foreground; per-class NMS 0.3."""
    return FastRCNN(num_classes, image_size, backbone, **kwargs)
