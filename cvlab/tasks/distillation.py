"""Knowledge distillation: a classification task whose model is the student, taught by a frozen teacher.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (soft targets at temperature T);
Furlanello et al. 2018, "Born-Again Neural Networks" (``self``: the student has the teacher's architecture);
Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (``feature``: a hint loss on a middle layer).

Kinds (``distill.kind``):

=============== ===========================================================================================
offline         alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)
self            the same, teacher and student of one architecture (born-again)
feature         offline + hint_weight * MSE(1x1 regressor(student middle layer), teacher middle layer)
semi_supervised the data withholds most labels (label ``UNLABELED``): CE on the labeled images only, the soft
                targets on every image
self_supervised no labels at all: the student matches the teacher on randomly augmented views of each batch
=============== ===========================================================================================

The teacher lives outside the module tree: it is not trained, not saved in the student's checkpoints, and
Lightning's ``.train()`` never reaches it, so it stays in eval mode (BatchNorm statistics frozen). It is attached
for fitting by the ``AttachTeacher`` callback; a restored checkpoint (``load_task``, ``cvlab eval``) is the
student alone, a working classifier. The FitNets regressor is part of the module (it is trained) and is rebuilt
from the checkpoint's weights when one is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from cvlab.data.classification import ClassificationDataModule, Split
from cvlab.losses.distillation import UNLABELED, distillation_loss, hint_loss
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


def _outputs(model: nn.Module, layers: dict[str, nn.Module], in_chans: int, image_size: int) -> dict[str, object]:
    """What each of ``layers`` (modules of ``model``) outputs for one blank image, the model in eval mode."""
    outputs: dict[str, object] = {}
    handles = [layer.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
               for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return outputs


def feature_stages(model: nn.Module, in_chans: int, image_size: int) -> dict[str, int]:
    """The model's stages and their channels: its top-level blocks with weights that output a Tensor[N, C, H, W],
    or, when there is one such block (MobileNets' ``features`` trunk), that block's children."""
    def stages_of(prefix: str, parent: nn.Module) -> dict[str, int]:
        blocks = {f"{prefix}{name}": child for name, child in parent.named_children()
                  if any(True for _ in child.parameters())}
        outputs = _outputs(model, blocks, in_chans, image_size)
        return {name: outputs[name].shape[1] for name in blocks
                if isinstance(outputs.get(name), torch.Tensor) and outputs[name].dim() == 4}

    stages = stages_of("", model)
    if len(stages) == 1:
        (trunk,) = stages
        stages = stages_of(f"{trunk}.", model.get_submodule(trunk))
    return stages


def hint_layer(model: nn.Module, name: str, in_chans: int, image_size: int, role: str) -> tuple[str, int]:
    """Resolves ``name`` (``auto``: the middle of ``feature_stages``) to a layer of ``model`` whose output is a
    Tensor[N, C, H, W]; returns (name, C). ``role`` (teacher or student) names the model in errors."""
    stages = feature_stages(model, in_chans, image_size)
    if name == "auto":
        if not stages:
            raise UserError(f"the {role} has no convolutional stage for a FitNets hint; name a layer with "
                            f"distill.hint_layers.{role}=...")
        name = list(stages)[len(stages) // 2]
        return name, stages[name]
    layers = [n for n, _ in model.named_modules() if n]
    if name not in layers:
        raise UserError(f"the {role} has no layer {name!r}.{suggest(name, layers)} "
                        f"Its stages: {', '.join(stages)}.")
    out = _outputs(model, {name: model.get_submodule(name)}, in_chans, image_size).get(name)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise UserError(f"the {role} layer {name!r} does not output a Tensor[N, C, H, W] feature map.")
    return name, out.shape[1]


def augmented_views(images: torch.Tensor) -> torch.Tensor:
    """One random view (``VIEW_AUGMENT``, drawn from torch's global RNG) per image of Tensor[N, C, H, W]."""
    return torch.stack([VIEW_AUGMENT(image) for image in images])


class DistillationTask(ClassificationTask):
    """The student (``model``) learns from a frozen teacher; validation, metrics and checkpoints are the student's."""

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
        info = self.hparams.data_info
        size = (info["in_chans"], info["image_size"])
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
            hint = hint_loss(self.hint_regressor(self._features.pop("student")), self._features.pop("teacher"))
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


class HiddenLabels(Dataset):
    """(image, label) pairs of ``base`` with the label replaced by ``UNLABELED`` where ``hidden[i]``."""

    def __init__(self, base: Dataset, hidden: np.ndarray):
        self.base, self.hidden = base, hidden

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, UNLABELED if self.hidden[index] else label


def _stratified_subset(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if fraction >= 1:
        return indices
    if not 0 < fraction < 1:
        raise UserError(f"{what} is a share of the training images in (0, 1], got {fraction}.")
    try:
        kept, _ = train_test_split(indices, train_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        classes = len(np.unique(labels))
        raise UserError(f"{what}={fraction} keeps {int(fraction * len(indices))} of {len(indices)} training images, "
                        f"fewer than the {classes} classes; raise it.") from None
    return np.sort(kept)


class LabelBudgetDataModule(ClassificationDataModule):
    """The classification data with fewer training labels: ``train_fraction`` of the training split (stratified by
    class, drawn with the data seed), of which ``labeled_fraction`` keep their labels. ``unlabeled="drop"`` leaves
    the other images out; ``"hide"`` keeps them with the label ``UNLABELED`` (semi-supervised distillation). The
    validation split is untouched."""

    def __init__(self, *args, train_fraction: float = 1.0, labeled_fraction: float = 1.0, unlabeled: str = "drop",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if unlabeled not in ("drop", "hide"):
            raise UserError(f"unlabeled is drop or hide, got {unlabeled!r}.")
        if unlabeled == "hide" and self.hparams.sampler != "none":
            raise UserError(f"sampler={self.hparams.sampler} balances classes by label, which semi-supervised "
                            "distillation withholds; use sampler=none.")

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        super().setup(stage)
        hp, split = self.hparams, self.split
        labels = np.asarray(split.train_labels)
        kept = _stratified_subset(np.arange(len(labels)), labels, hp.train_fraction, hp.seed, "distill.train_fraction")
        labeled = _stratified_subset(kept, labels[kept], hp.labeled_fraction, hp.seed, "distill.labeled_fraction")
        if hp.unlabeled == "drop":
            train, train_labels = Subset(split.train, labeled.tolist()), labels[labeled]
        else:
            hidden = ~np.isin(kept, labeled)
            train = HiddenLabels(Subset(split.train, kept.tolist()), hidden)
            train_labels = np.where(hidden, UNLABELED, labels[kept])
        self.split = Split(train, split.val, train_labels.tolist(), split.class_names, split.problems)
