"""Segmentation losses (issue 12): the dice loss is V-Net's softmax dice, computed by hand here; ce_dice adds the
cross-entropy with its weights; ignored pixels contribute nothing to any loss; the `loss` group reaches the task with
the data's ignore index, other tasks' losses are refused, and the auxiliary outputs are weighted as the model says."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.data.base import IGNORE_INDEX
from cvlab.losses.segmentation import CrossEntropyDiceLoss, DiceLoss


def _example(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 4, generator=generator)
    target = torch.randint(0, 3, (2, 5, 4), generator=generator)
    target[0, 0, :3] = IGNORE_INDEX
    target[1, 4, 1] = IGNORE_INDEX
    return logits, target


def test_dice_is_one_minus_the_softmax_dice_per_image_and_class():
    logits, target = _example()
    probabilities = logits.softmax(1)
    expected = []
    for n in range(2):
        counted = target[n] != IGNORE_INDEX
        for c in range(3):
            p = probabilities[n, c][counted]
            t = (target[n][counted] == c).float()
            expected.append(1 - (2 * (p * t).sum() + 1) / ((p ** 2).sum() + (t ** 2).sum() + 1))
    assert float(DiceLoss()(logits, target)) == pytest.approx(float(torch.stack(expected).mean()), abs=1e-6)
    # exponent=1 is the plain (Sørensen) dice: another value.
    assert float(DiceLoss(exponent=1)(logits, target)) != pytest.approx(float(DiceLoss()(logits, target)), abs=1e-4)


def test_ce_dice_adds_the_weighted_cross_entropy_and_dice():
    logits, target = _example()
    ce = float(nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(logits, target))
    dice = float(DiceLoss()(logits, target))
    assert ce != pytest.approx(dice, abs=1e-3)  # the options are different losses
    assert float(CrossEntropyDiceLoss()(logits, target)) == pytest.approx(ce + dice, abs=1e-6)
    weighted = CrossEntropyDiceLoss(ce_weight=0.25, dice_weight=2.0)(logits, target)
    assert float(weighted) == pytest.approx(0.25 * ce + 2.0 * dice, abs=1e-6)


@pytest.mark.parametrize("loss", [DiceLoss(), CrossEntropyDiceLoss(), nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)],
                         ids=["dice", "ce_dice", "default"])
def test_ignored_pixels_contribute_nothing(loss):
    logits, target = _example()
    ignored = (target == IGNORE_INDEX)[:, None].expand_as(logits)
    other = logits.clone()
    other[ignored] = 10 * torch.randn(int(ignored.sum()))
    assert float(loss(other, target)) == pytest.approx(float(loss(logits, target)), abs=1e-6)
    # ... and they would count as pixels of a class
    labelled = target.where(target != IGNORE_INDEX, 0)
    assert float(loss(logits, labelled)) != pytest.approx(float(loss(logits, target)), abs=1e-4)
    # Gradients reach the counted pixels only.
    logits.requires_grad_(True)
    loss(logits, target).backward()
    assert logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().max() > 0


def test_a_perfect_prediction_costs_no_dice():
    _, target = _example()
    logits = 50.0 * nn.functional.one_hot(target.where(target != IGNORE_INDEX, 0), 3).permute(0, 3, 1, 2).float()
    assert float(DiceLoss()(logits, target)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------- the loss group
SEGMENTATION = ["task=segmentation", "data=shapes_seg", "data.image_size=32", "data.train_size=4", "data.val_size=2"]
UNET = ("model=unet", "model.width=0.125")


def _task(train_cfg, *overrides, model=UNET):
    from cvlab.engine import build_datamodule, build_task

    cfg = train_cfg(*SEGMENTATION, *model, *overrides)
    return build_task(cfg, build_datamodule(cfg))


def test_the_loss_group_reaches_the_segmentation_task_with_the_data_ignore_index(train_cfg):
    default = _task(train_cfg).criterion
    assert type(default) is nn.CrossEntropyLoss and default.ignore_index == IGNORE_INDEX
    dice = _task(train_cfg, "loss=dice", "loss.smooth=0.5").criterion
    assert type(dice) is DiceLoss and (dice.ignore_index, dice.smooth, dice.exponent) == (IGNORE_INDEX, 0.5, 2.0)
    both = _task(train_cfg, "loss=ce_dice", "loss.dice_weight=0.25").criterion
    assert type(both) is CrossEntropyDiceLoss and (both.ce_weight, both.dice_weight) == (1.0, 0.25)
    assert both.cross_entropy.ignore_index == both.dice.ignore_index == IGNORE_INDEX


def test_losses_of_other_tasks_are_refused(train_cfg):
    from cvlab.engine import build_datamodule, build_task
    from cvlab.utils.errors import UserError

    with pytest.raises(UserError, match="loss=label_smoothing is a classification loss; task=segmentation cannot"):
        _task(train_cfg, "loss=label_smoothing")
    cfg = train_cfg("loss=dice")  # resnet18 on digits
    with pytest.raises(UserError, match="loss=dice is a segmentation loss; task=classification cannot use it"):
        build_task(cfg, build_datamodule(cfg))


@pytest.mark.filterwarnings("ignore:You are trying to .self.log")  # the step runs without a trainer here
def test_the_auxiliary_outputs_are_weighted_by_the_model_aux_weights(train_cfg):
    """BiSeNet's training loss is loss(out) + w1 loss(aux1) + w2 loss(aux2), with model.aux_weights."""
    task = _task(train_cfg, "model.aux_weights=[0.5,2.0]", "loss=dice", model=("model=bisenet",))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 6, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    masks[:, :3] = IGNORE_INDEX
    task.train()
    torch.manual_seed(0)  # the heads' dropout
    outputs = task.model(images)
    expected = (DiceLoss()(outputs["out"], masks) + 0.5 * DiceLoss()(outputs["aux"][0], masks)
                + 2.0 * DiceLoss()(outputs["aux"][1], masks))
    torch.manual_seed(0)
    total = task.training_step((images, masks), 0)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
