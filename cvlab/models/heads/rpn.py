"""The Region Proposal Network of Faster R-CNN: anchors, the shared conv head, proposal selection and its loss.

Papers:
    Ren, He, Girshick & Sun 2015, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks"
    (§3.1: a 3×3 conv slides over the shared feature map, and two sibling 1×1 convs score ``k`` anchors per position
    as object / not object and regress their boxes; 3 scales × 3 aspect ratios, k = 9; §3.1.2: anchors with IoU > 0.7
    positive, plus each object's best anchor, below 0.3 negative, 256 sampled per image with up to half positive;
    §3.3: NMS at 0.7 on the proposals, the top 2000 kept in training and fewer at test).
    Lin et al. 2017, "Feature Pyramid Networks for Object Detection" (§4.1: the same head on every pyramid level,
    anchors of one scale per level).

Layout and numerics follow torchvision's ``RegionProposalNetwork`` (its ``pre_nms_top_n`` is per level, NMS runs per
level, its anchors are centred on the top-left corner of each cell), so its weights give the same proposals here;
``anchor_offset=0.5`` centres the anchors in their cells instead (Detectron2's ``offset``). The boxes maths is
``torchvision.ops`` (``box_iou``, ``batched_nms``, ``clip_boxes_to_image``, ``remove_small_boxes``); the anchors,
the head, the selection and the loss are written here (torchvision's are in ``torchvision.models.detection``, which
cvlab's models do not import). ``focal_gamma`` scores the objectness with the sigmoid focal loss instead of the BCE
(Lin et al. 2017, ``torchvision.ops.sigmoid_focal_loss``; not in the paper: an imbalance option).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes, sigmoid_focal_loss

from cvlab.layers.typing import ActFactory
from cvlab.ops.box_coder import BoxCoder
from cvlab.ops.matching import IoUMatcher, objects_with_area, sample_balanced
from cvlab.utils.validate import check_number


class AnchorGenerator(nn.Module):
    """Anchor boxes of every level: at each position of a level's ``H × W`` grid, one anchor per (aspect ratio,
    size) pair, ratio-major (torchvision's order), ``h / w = ratio`` and ``√(w h) = size``, corners rounded to whole
    pixels.

    Args:
        sizes: per level, the anchor sizes in input pixels (one level: ``[[128, 256, 512]]``, the paper's).
        aspect_ratios: per level the ratios h / w, or one list for every level.
        offset: where in its cell an anchor is centred, as a fraction of the stride: 0 (the cell's top-left corner,
            torchvision's) or 0.5 (its centre).

    ``forward(grid_sizes, image_size, device) -> list[Tensor[H_l · W_l · A_l, 4]]`` (position-major, xyxy); the
    stride of a level is ``image_size // grid_size`` per axis.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
                 offset: float = 0.0):
        super().__init__()  # a module without weights, so the model's repr and settings show its own
        sizes = [[float(s) for s in level] for level in sizes]
        if not isinstance(aspect_ratios[0], (int, float)):
            ratios = [[float(r) for r in level] for level in aspect_ratios]
        else:
            ratios = [[float(r) for r in aspect_ratios]] * len(sizes)
        if len(ratios) != len(sizes):
            raise ValueError(f"{len(sizes)} levels of anchor sizes but {len(ratios)} of aspect ratios")
        if any(v <= 0 for level in sizes + ratios for v in level) or not all(sizes):
            raise ValueError(f"anchor sizes and aspect ratios must be positive, got {sizes} and {ratios}")
        self.sizes, self.aspect_ratios, self.offset = sizes, ratios, float(offset)
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(sizes, ratios)]

    @staticmethod
    def _cell_anchors(sizes: list[float], ratios: list[float]) -> torch.Tensor:
        """Tensor[A, 4]: the anchors of one position, centred on (0, 0)."""
        sizes_t = torch.tensor(sizes, dtype=torch.float32, device="cpu")
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32, device="cpu"))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * sizes_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * sizes_t[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> list[int]:
        return [len(cell) for cell in self.cell_anchors]

    def forward(self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                 device) -> list[torch.Tensor]:
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(f"anchors are set for {len(self.cell_anchors)} levels, the features have "
                             f"{len(grid_sizes)}")
        anchors = []
        for (grid_h, grid_w), cell in zip(grid_sizes, self.cell_anchors):
            stride_h, stride_w = image_size[0] // grid_h, image_size[1] // grid_w
            shifts_x = (torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w).float()
            shifts_y = (torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h).float()
            if self.offset:
                shifts_x, shifts_y = shifts_x + self.offset * stride_w, shifts_y + self.offset * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)) * 2, dim=1)
            anchors.append((shifts.view(-1, 1, 4) + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
        return anchors


class RPNHead(nn.Module):
    """The sliding head shared by every level: a 3×3 conv (``in_chs`` → ``in_chs``) and activation, then two sibling
    1×1 convs to ``A`` objectness logits and ``4 A`` box deltas per position.

    ``forward(levels: list[Tensor[N, in_chs, H_l, W_l]]) -> (list[Tensor[N, A, H_l, W_l]], list[Tensor[N, 4A, H_l,
    W_l]])``. Weights start at N(0, 0.01²) and biases at 0 (the paper's init, and torchvision's); the keys
    (``conv``, ``cls_logits``, ``bbox_pred``) are torchvision's but for ``conv.0.0`` → ``conv``.
    """

    def __init__(self, in_chs: int, num_anchors: int, act_layer: ActFactory | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, in_chs, 3, padding=1)
        self.act = (act_layer or partial(nn.ReLU, inplace=True))()
        self.cls_logits = nn.Conv2d(in_chs, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_chs, num_anchors * 4, 1)
        for conv in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, levels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        objectness, deltas = [], []
        for level in levels:
            hidden = self.act(self.conv(level))
            objectness.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return objectness, deltas


def _flatten_level(output: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """Tensor[N, A · C, H, W] → Tensor[N, H · W · A, C], position-major like the anchors."""
    n, _, h, w = output.shape
    return output.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


class RegionProposalNetwork(nn.Module):
    """Proposals from the levels of a feature pyramid (or the one map of a plain backbone).

    ``forward(levels: list[Tensor[N, C, H_l, W_l]], image_size=(H, W), targets=None) -> (proposals, losses)``:
    ``proposals`` is one ``Tensor[K_i, 4]`` (xyxy input pixels, no gradient, best first) per image; ``losses`` is
    ``{}`` in eval and in training ``loss_objectness`` (binary cross-entropy, or with ``focal_gamma`` the focal
    loss, averaged over the sampled anchors) and ``loss_rpn_box_reg`` (smooth-L1 over the positives, summed and
    divided by the number sampled).

    Args:
        anchor_generator / head: the :class:`AnchorGenerator` and the :class:`RPNHead`.
        fg_iou / bg_iou: positive at IoU ≥ ``fg_iou`` (and each object's best anchors), negative below ``bg_iou``.
        batch_size_per_image / positive_fraction: anchors sampled per image for the loss, and the share of positives.
        pre_nms_top_n / post_nms_top_n: ``(train, test)``: the best-scoring anchors kept per level before NMS, and the
            proposals kept per image after it.
        nms_thresh: NMS IoU, per level. score_thresh: drop proposals of lower probability. min_size: drop
            proposals with a side under this (pixels).
        box_loss_beta: the smooth-L1's β (1/9: σ = 3 in the paper's Caffe code, and torchvision's).
        focal_gamma / focal_alpha: None: the paper's BCE; a number γ ≥ 0: the sigmoid focal loss ``α_t (1 − p_t)^γ
            BCE`` (RetinaNet's γ = 2, α = 0.25; ``focal_alpha`` None: no α weighting, so γ = 0 is the BCE),
            averaged over the sampled anchors as the BCE is: mmdetection's normalisation of a sampled head (the
            anchors sampled; RetinaNet, which samples none, divides by the positives).
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou: float = 0.7, bg_iou: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: Sequence[int] = (2000, 1000), post_nms_top_n: Sequence[int] = (2000, 1000),
                 nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3,
                 box_loss_beta: float = 1.0 / 9, focal_gamma: float | None = None, focal_alpha: float | None = 0.25):
        super().__init__()
        check_number("the RPN's focal_gamma", focal_gamma, 0, optional=True, hint=" (null: the BCE; RetinaNet's 2)")
        check_number("the RPN's focal_alpha", focal_alpha, 0, 1, optional=True, hint=" (RetinaNet's 0.25)")
        self.anchor_generator, self.head = anchor_generator, head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = IoUMatcher(fg_iou, (0.0, bg_iou), allow_low_quality=True)
        self.batch_size_per_image, self.positive_fraction = int(batch_size_per_image), float(positive_fraction)
        self.pre_nms_top_n = tuple(int(n) for n in pre_nms_top_n)
        self.post_nms_top_n = tuple(int(n) for n in post_nms_top_n)
        self.nms_thresh, self.score_thresh, self.min_size = float(nms_thresh), float(score_thresh), float(min_size)
        self.box_loss_beta = float(box_loss_beta)
        self.focal_gamma = None if focal_gamma is None else float(focal_gamma)
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)

    def forward(self, levels: list[torch.Tensor], image_size: tuple[int, int],
                targets: list[dict] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        objectness, deltas = self.head(levels)
        anchors = self.anchor_generator([level.shape[-2:] for level in levels], image_size, levels[0].device)
        per_level = [len(a) for a in anchors]
        objectness = torch.cat([_flatten_level(o, 1) for o in objectness], dim=1).squeeze(-1)  # [N, total]
        deltas = torch.cat([_flatten_level(d, 4) for d in deltas], dim=1)  # [N, total, 4]
        anchors = torch.cat(anchors)
        proposals = self.box_coder.decode(deltas.detach(), anchors)
        boxes = self.select(proposals, objectness.detach(), per_level, image_size)
        if not self.training:
            return boxes, {}
        if targets is None:
            raise ValueError("the RPN in training mode needs targets (list of dict(boxes, labels))")
        return boxes, self.loss(objectness, deltas, anchors, targets)

    def select(self, proposals: torch.Tensor, objectness: torch.Tensor, per_level: list[int],
               image_size: tuple[int, int]) -> list[torch.Tensor]:
        """Per image: the ``pre_nms_top_n`` best anchors of each level, clipped, without tiny or low-scoring boxes,
        NMS per level, the best ``post_nms_top_n``. ``proposals: Tensor[N, total, 4]``, ``objectness: Tensor[N,
        total]`` logits."""
        pre_nms, post_nms = (n[0] if self.training else n[1] for n in (self.pre_nms_top_n, self.post_nms_top_n))
        top, levels, offset = [], [], 0
        for index, count in enumerate(per_level):
            top.append(objectness[:, offset:offset + count].topk(min(pre_nms, count), dim=1).indices + offset)
            levels.append(torch.full((min(pre_nms, count),), index, dtype=torch.int64, device=objectness.device))
            offset += count
        top, levels = torch.cat(top, dim=1), torch.cat(levels)
        rows = torch.arange(len(objectness), device=objectness.device)[:, None]
        scores, proposals = objectness[rows, top].sigmoid(), proposals[rows, top]
        kept = []
        for boxes, image_scores in zip(proposals, scores):
            boxes = clip_boxes_to_image(boxes, image_size)
            keep = remove_small_boxes(boxes, self.min_size)
            keep = keep[image_scores[keep] >= self.score_thresh]
            boxes, image_scores, image_levels = boxes[keep], image_scores[keep], levels[keep]
            keep = batched_nms(boxes, image_scores, image_levels, self.nms_thresh)[:post_nms]
            kept.append(boxes[keep])
        return kept

    def loss(self, objectness: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
             targets: list[dict]) -> dict[str, torch.Tensor]:
        """``objectness: Tensor[N, total]`` logits and ``deltas: Tensor[N, total, 4]`` of ``anchors: Tensor[total,
        4]``."""
        logits, labels, pos_deltas, pos_targets = [], [], [], []
        for image, target in enumerate(targets):
            boxes, _ = objects_with_area(target, anchors.device)
            match = self.matcher(anchors, boxes)
            positive, negative = sample_balanced(match.kind, self.batch_size_per_image, self.positive_fraction)
            logits += [objectness[image, positive], objectness[image, negative]]
            labels += [objectness.new_ones(len(positive)), objectness.new_zeros(len(negative))]
            pos_deltas.append(deltas[image, positive])
            pos_targets.append(self.box_coder.encode(boxes[match.index[positive]], anchors[positive]))
        logits, labels = torch.cat(logits), torch.cat(labels)
        box_loss = F.smooth_l1_loss(torch.cat(pos_deltas), torch.cat(pos_targets), beta=self.box_loss_beta,
                                    reduction="sum")
        if self.focal_gamma is None:
            objectness_loss = F.binary_cross_entropy_with_logits(logits, labels)
        else:
            alpha = -1.0 if self.focal_alpha is None else self.focal_alpha  # torchvision's "no α"
            objectness_loss = sigmoid_focal_loss(logits, labels, alpha, self.focal_gamma, reduction="mean")
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss / max(len(labels), 1)}
