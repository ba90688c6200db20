"""Knowledge distillation: a classification task whose model is the student, taught by a frozen teacher.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (soft targets at temperature T);
Furlanello et al. 2018, "Born-Again Neural Networks" (``self``: the student has the teacher's architecture);
Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (``feature``: a hint loss on a middle layer).

Kinds (``distill.kind``):

=============== ===========================================================================================
offline         alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)
self            the same, teacher and student of one architecture (born-again)
feature         offline + hint_weight * MSE(1x1 regressor(student middle stage), teacher middle stage): the
                middle of each backbone's ``feature_info`` unless named (a ViT's tokens laid out as a map)
semi_supervised the data withholds most labels (label ``UNLABELED``): CE on the labeled images only, the soft
                targets on every image
self_supervised no labels at all: the student matches the teacher on randomly augmented views of each batch
=============== ===========================================================================================

The teacher lives outside the module tree: it is not trained, not saved in the student's checkpoints, and
Lightning's ``.train()`` never reaches it, so it stays in eval mode (BatchNorm statistics frozen). It is attached
for fitting by the ``AttachTeacher`` callback; a restored checkpoint (``load_task``, ``cvlab eval``) is the
student alone, a working classifier. The FitNets regressor is part of the module (it is trained) and is rebuilt
from the checkpoint's weights when one is loaded. The task is registered as ``distillation`` (``task.name``).

``check_teacher`` and ``check_hint_layers`` let ``cvlab distill`` refuse a wrong teacher or hint layer before any
training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.transforms import v2

from cvlab.data.base import DataInfo
from cvlab.data.budget import HiddenLabels, LabelBudgetDataModule  # noqa: F401  (named by older checkpoints' data)
from cvlab.losses.distillation import UNLABELED, distillation_loss, hint_loss
from cvlab.tasks.base import BaseTask, build_model, register_task
from cvlab.tasks.classification import ClassificationTask
from cvlab.utils.errors import UserError, suggest

KINDS = ("offline", "semi_supervised", "self_supervised", "self", "feature")

# The views of self-supervised distillation: small shifts, turns and zooms that keep a digit or an object what it is
# (no flips: a mirrored digit is another symbol).
VIEW_AUGMENT = v2.RandomAffine(degrees=15, translate=(0.125, 0.125), scale=(0.9, 1.1))


@dataclass
class DistillationSettings:
    kind: str = "offline"
    temperature: float = 4.0
    alpha: float = 0.9
    hint_weight: float = 1.0
    hint_layers: dict = field(default_factory=lambda: {"teacher": "auto", "student": "auto"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown distill.kind {self.kind!r}.{suggest(self.kind, KINDS)} "
                            f"Kinds: {', '.join(KINDS)}.")
        if self.temperature <= 0:
            raise UserError(f"distill.temperature must be positive, got {self.temperature}.")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"distill.alpha weighs the soft targets against the labels; it lies in [0, 1], "
                            f"got {self.alpha}.")

    @classmethod
    def from_config(cls, node) -> "DistillationSettings":
        """The settings of a ``distill`` config node."""
        from omegaconf import OmegaConf

        return cls(kind=str(node.kind), temperature=float(node.temperature), alpha=float(node.alpha),
                   hint_weight=float(node.hint_weight),
                   hint_layers=OmegaConf.to_container(node.hint_layers, resolve=True))


def _shape(info: DataInfo) -> str:
    return f"{info.num_classes} classes at {info.in_chans}x{info.image_size}x{info.image_size}"


def check_teacher(task: BaseTask, info: DataInfo, data_name: str, ckpt: str) -> ClassificationTask:
    """``task`` (restored from ``teacher.ckpt=ckpt``) if it can teach on data ``info``: a classifier of the same
    classes and input size; a UserError otherwise."""
    if not isinstance(task, ClassificationTask):
        raise UserError(f"teacher.ckpt {ckpt!r} holds a {type(task).__name__}; a teacher must be a classifier.")

    def signature(data: DataInfo) -> tuple:
        return data.num_classes, data.in_chans, data.image_size, list(data.class_names)

    trained = task.data_info
    if signature(trained) != signature(info):
        raise UserError(f"teacher.ckpt was trained on {_shape(trained)} but data {data_name!r} has {_shape(info)}; "
                        "teacher and student must agree on classes and input size.")
    return task


def check_hint_layers(teacher: nn.Module | dict, student: dict, groups: dict, info: DataInfo,
                      hint_layers: dict) -> None:
    """Resolves the FitNets layers (``hint_layers``: teacher and student names, or ``auto``) on the two
    architectures before any training, so a wrong name costs nothing. ``teacher`` is a model or a model config,
    ``student`` a model config; ``groups`` holds the norm/activation/attention configs they are built with."""
    def build(model: dict) -> nn.Module:
        return build_model(model, groups["norm"], groups["activation"], groups["attention"], {"name": "default"},
                           num_classes=info.num_classes, in_chans=info.in_chans, image_size=info.image_size)

    size = (info.in_chans, info.image_size)
    hint_layer(teacher if isinstance(teacher, nn.Module) else build(teacher), hint_layers["teacher"], *size,
               role="teacher")
    hint_layer(build(student), hint_layers["student"], *size, role="student")


def _output(model: nn.Module, layer: str, in_chans: int, image_size: int):
    """What ``layer`` (a module of ``model``) outputs for one blank image, the model in eval mode."""
    outputs = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: outputs.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    finally:
        model.train(was_training)
        handle.remove()
    return outputs[0] if outputs else None


def _stages(model: nn.Module) -> dict[str, dict]:
    """The model's feature stages (its ``feature_info``: num_chs, reduction, module) by module name."""
    return {info["module"]: info for info in getattr(model, "feature_info", ())}


def hint_layer(model: nn.Module, name: str, in_chans: int, image_size: int, role: str) -> tuple[str, int]:
    """Resolves ``name`` to a layer of ``model`` for a FitNets hint; returns (name, C), C the channels of its
    feature map. ``auto`` is the middle stage of the model's ``feature_info``; a stage's output becomes a map
    through :func:`hint_map`, and any other named layer must output a Tensor[N, C, H, W]. ``role`` (teacher or
    student) names the model in errors."""
    stages = _stages(model)
    if name == "auto":
        if not stages:
            raise UserError(f"the {role} lists no feature stages for a FitNets hint; name a layer with "
                            f"distill.hint_layers.{role}=...")
        name = list(stages)[len(stages) // 2]
    layers = [n for n, _ in model.named_modules() if n]
    if name not in layers:
        raise UserError(f"the {role} has no layer {name!r}.{suggest(name, layers)} "
                        f"Its stages: {', '.join(stages)}.")
    if name in stages:
        return name, stages[name]["num_chs"]
    out = _output(model, name, in_chans, image_size)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise UserError(f"the {role} layer {name!r} does not output a Tensor[N, C, H, W] feature map.")
    return name, out.shape[1]


def hint_map(model: nn.Module, layer: str, output: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """What ``layer`` of ``model`` output for ``input_size`` images, as a Tensor[N, C, H, W]: a feature stage
    through its backbone's ``feature_map`` (a ViT's tokens laid out on their patch grid), any other layer as is."""
    stage = _stages(model).get(layer)
    return type(model).feature_map(output, input_size, stage["reduction"]) if stage else output


def augmented_views(images: torch.Tensor) -> torch.Tensor:
    """One random view (``VIEW_AUGMENT``, drawn from torch's global RNG) per image of Tensor[N, C, H, W]."""
    return torch.stack([VIEW_AUGMENT(image) for image in images])


def check_data(data_cfg) -> None:
    """Refuses the data options that mix labels (mixup, CutMix, SamplePairing): the hard-label term and the
    withheld labels of semi-supervised distillation read one class per image."""
    mixing = next((key for key in ("mixup_alpha", "cutmix_alpha", "sample_pairing") if data_cfg.get(key)), None)
    if mixing is not None:
        raise UserError(f"data.{mixing} mixes the labels of two images, which distillation cannot use (its "
                        f"hard-label term reads one class per image); drop data.{mixing} for cvlab distill.")


@register_task("distillation")
class DistillationTask(ClassificationTask):
    """The student (``model``) learns from a frozen teacher; validation, metrics and checkpoints are the student's."""

    model_task = "classification"
    checkpoint_records = ("distillation",)  # how the student was taught (on_save_checkpoint)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings: DistillationSettings | None = None
        self.hint_regressor: nn.Conv2d | None = None
        self._features: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    @property
    def teacher(self) -> nn.Module | None:
        return self.__dict__.get("_teacher")

    def attach_teacher(self, teacher: nn.Module, settings: DistillationSettings) -> None:
        """Freezes ``teacher`` (eval mode, no gradients) and keeps it outside the module tree; for ``feature``
        distillation also hooks the two hint layers and builds the 1x1 regressor between them."""
        teacher.eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module's registration: the teacher is no submodule of the task.
        object.__setattr__(self, "_teacher", teacher)
        self.settings = settings
        self._remove_hooks()
        if settings.kind != "feature":
            return
        size = (self.data_info.in_chans, self.data_info.image_size)
        teacher_layer, teacher_channels = hint_layer(teacher, settings.hint_layers["teacher"], *size, role="teacher")
        student_layer, student_channels = hint_layer(self.model, settings.hint_layers["student"], *size, role="student")
        self.settings = replace(settings, hint_layers={"teacher": teacher_layer, "student": student_layer})
        if self.hint_regressor is None:
            self.hint_regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self._hooks = [self._capture(teacher, teacher_layer, "teacher"),
                       self._capture(self.model, student_layer, "student")]

    def _capture(self, model: nn.Module, layer: str, key: str):
        return model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out: self._features.__setitem__(key, out))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._features.clear()

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_fit_end(self) -> None:
        self._remove_hooks()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DistillationTask needs a teacher: call attach_teacher(...) (cvlab distill does).")
        images, labels = batch
        settings = self.settings
        if settings.kind == "self_supervised":
            images, labels = augmented_views(images), None
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = self(images)
        terms = distillation_loss(logits, teacher_logits, labels, settings.temperature, settings.alpha, self.criterion)
        loss = terms.total
        batch_size = len(images)
        if settings.kind == "feature":
            layers, size = settings.hint_layers, tuple(images.shape[-2:])
            guided = hint_map(self.model, layers["student"], self._features.pop("student"), size)
            hint = hint_loss(self.hint_regressor(guided),
                             hint_map(self.teacher, layers["teacher"], self._features.pop("teacher"), size))
            loss = loss + settings.hint_weight * hint
            self.log("train/loss_hint", hint, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_kd", terms.soft, on_step=False, on_epoch=True, batch_size=batch_size)
        if terms.hard is not None:
            self.log("train/loss_ce", terms.hard, on_step=False, on_epoch=True, batch_size=batch_size)
            labeled = labels != UNLABELED
            if labeled.any():
                self.train_acc(logits[labeled], labels[labeled])
                self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=int(labeled.sum()))
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.settings is not None:  # for the record: how this student was taught
            checkpoint["distillation"] = asdict(self.settings)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        weight = checkpoint["state_dict"].get("hint_regressor.weight")
        if weight is not None and self.hint_regressor is None:
            self.hint_regressor = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
        if self.settings is None and "distillation" in checkpoint:
            self.settings = DistillationSettings(**checkpoint["distillation"])


class AttachTeacher(pl.Callback):
    """Hands the frozen teacher to a DistillationTask when fitting starts (before its optimizer is built, so a
    FitNets regressor is optimised too)."""

    def __init__(self, teacher: nn.Module, settings: DistillationSettings):
        self.teacher, self.settings = teacher, settings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.attach_teacher(self.teacher, self.settings)
