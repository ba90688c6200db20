"""Isolation forest and one-class SVM (scikit-learn) on the features of a zoo CNN trained on the normal images to
tell which way up they are.

Papers: Liu, Ting & Zhou 2008, "Isolation Forest"; Schölkopf, Platt, Shawe-Taylor, Smola & Williamson 2001,
"Estimating the Support of a High-Dimensional Distribution" (the one-class SVM). The feature network's task is
RotNet's (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image Rotations"),
as a one-class representation in Golan & El-Yaniv 2018, "Deep Anomaly Detection Using Geometric Transformations",
and in the two-stage form of Sohn, Li, Yoon, Jin & Pfister 2021, "Learning and Evaluating Representations for Deep
One-Class Classification": a self-supervised representation of the normal data, then a shallow one-class model on it.

- **Feature network**: the trunk of the zoo classifier ``backbone`` (``create_model(..., features_only=True)``, its
  last stage), globally average-pooled, and a linear layer to the four rotations. :meth:`training_loss` shows it each
  normal image at 0, 90, 180 and 270 degrees (``torch.rot90``: exact on the square pixel grid) and scores the
  cross-entropy of which one it sees. Telling an upright image from a turned one takes the shapes and the orientation
  of the normal images, which is what an anomaly does not share; no label of any class is used.
- **Features** (:meth:`features`): the pooled trunk features of the image in its four rotations, concatenated,
  ``Tensor[N, 4·D]``: the representation under every transformation, as Golan & El-Yaniv score (on digits it measured
  a higher AUROC than the upright image's features alone).
- **Scorer** (:meth:`fit`): scikit-learn's ``StandardScaler`` then ``IsolationForest`` (drawn from a fixed seed) or
  ``OneClassSVM``, fitted on the features of the normal training images. Standardising gives every feature the unit
  scale that the SVM's ``gamma="scale"`` assumes; a forest is indifferent to it. :meth:`anomaly_score` is minus
  sklearn's ``score_samples`` (its normality).

The fitted estimator is no part of the module's state: no ``state_dict`` or checkpoint holds it, since sklearn
persists only by pickle, which cvlab never loads. Whoever restores the weights fits it again from the features of the
same images, and gets the same estimator (task=anomaly does so before every evaluation pass).

Written by hand: the rotation task and its head (a few lines); the estimators are sklearn's.
"""
from __future__ import annotations

import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.anomaly import AnomalyDetector
from cvlab.models.segmentors import segmentation_backbone
from cvlab.utils.errors import UserError
from cvlab.utils.validate import first_line

ROTATIONS = 4  # 0, 90, 180, 270 degrees
FOREST_SEED = 0  # IsolationForest's random_state: the same features grow the same forest
# model name -> (module, class) of its sklearn estimator
ESTIMATORS = {"isolation_forest": ("sklearn.ensemble", "IsolationForest"),
              "one_class_svm": ("sklearn.svm", "OneClassSVM")}


def rotations(images: Tensor) -> Tensor:
    """``Tensor[N, C, S, S]`` → ``Tensor[4N, C, S, S]``: all the images at 0°, then all at 90°, 180° and 270°
    (counter-clockwise)."""
    return torch.cat([torch.rot90(images, turns, dims=(-2, -1)) for turns in range(ROTATIONS)])


class FeatureOutlierDetector(AnomalyDetector):
    """See the module docstring. ``forward(images: Tensor[N, C, S, S])`` gives the rotation logits ``Tensor[N, 4]``;
    :meth:`features` ``Tensor[N, num_features]``; :meth:`anomaly_score` ``Tensor[N]`` once :meth:`fit` was given
    the normal training images' features.

    =====================================================  =====================  ============
    variant                                                input                  params
    =====================================================  =====================  ============
    isolation_forest, one_class_svm (resnet18, stem auto)  1 x 8 x 8 (digits)     11,169,732
    isolation_forest, one_class_svm (resnet18, stem auto)  3 x 32 x 32 (CIFAR)    11,170,884
    =====================================================  =====================  ============

    (The estimator's own size follows the training images: a forest of ``n_estimators`` trees of up to
    ``max_samples`` leaves, or the SVM's support vectors.)

    Args:
        estimator: ``isolation_forest`` or ``one_class_svm``; ``estimator_args`` its sklearn settings.
        in_chans / image_size: the images' channels and side (square: the rotations keep it).
        backbone / backbone_args: the zoo classification model whose trunk is the feature network, and its options.
        norm_layer / act_layer / attn_layer: the trunk's (the model contract; None leaves the backbone its own).
    """

    needs_fit: ClassVar[bool] = True

    def __init__(self, estimator: str, estimator_args: dict, in_chans: int = 1, image_size: int = 8,
                 backbone: str = "resnet18", backbone_args: dict | None = None, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None):
        super().__init__()
        self.estimator, self.estimator_args = estimator, dict(estimator_args)
        self.trunk = segmentation_backbone(backbone, estimator, (-1,), in_chans, image_size, norm_layer, act_layer,
                                           attn_layer, **(backbone_args or {}))
        channels = self.trunk.feature_info.channels()[-1]
        self.rotation_head = nn.Linear(channels, ROTATIONS)
        self.num_features = ROTATIONS * channels
        self.scorer = None  # the fitted sklearn pipeline (fit); a plain attribute, outside the state_dict

    def pooled(self, images: Tensor) -> Tensor:
        """The trunk's last stage, globally average-pooled: ``Tensor[N, D]``."""
        return self.trunk(images)[-1].mean(dim=(-2, -1))

    def forward(self, images: Tensor) -> Tensor:
        return self.rotation_head(self.pooled(images))

    def training_loss(self, images: Tensor) -> Tensor:
        turns = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
        return F.cross_entropy(self(rotations(images)), turns)

    def features(self, images: Tensor) -> Tensor:
        pooled = self.pooled(rotations(images))  # [4N, D], rotation-major
        return pooled.view(ROTATIONS, len(images), -1).transpose(0, 1).flatten(1)

    def fit(self, features: Tensor) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        module, name = ESTIMATORS[self.estimator]
        estimator_class = getattr(importlib.import_module(module), name)
        seeded = {"random_state": FOREST_SEED} if "random_state" in estimator_class().get_params() else {}
        try:
            scorer = make_pipeline(StandardScaler(), estimator_class(**self.estimator_args, **seeded))
            self.scorer = scorer.fit(features.detach().double().cpu().numpy())
        except (TypeError, ValueError) as error:  # sklearn's InvalidParameterError is both
            settings = ", ".join(f"model.{key}={value}" for key, value in self.estimator_args.items())
            raise UserError(f"model={self.estimator}: scikit-learn's {name} refuses {settings} "
                            f"({first_line(error)}).") from None

    def anomaly_score(self, images: Tensor) -> Tensor:
        if self.scorer is None:
            raise RuntimeError(f"{self.estimator}: fit() the estimator on the normal training features first")
        normality = self.scorer.score_samples(self.features(images).detach().double().cpu().numpy())
        return torch.as_tensor(-normality, dtype=torch.float32, device=images.device)


@register_model(task="anomaly")
def isolation_forest(in_chans: int = 1, image_size: int = 8, backbone: str = "resnet18",
                     backbone_args: dict | None = None, n_estimators: int = 100,
                     max_samples: int | float | str = "auto", max_features: int | float = 1.0,
                     norm_layer: NormFactory | None = None, act_layer: ActFactory | None = None,
                     attn_layer: AttnFactory | None = None) -> FeatureOutlierDetector:
    """Isolation forest (Liu et al. 2008) on rotation-trained CNN features; the forest's settings are sklearn's
    (its defaults: 100 trees of min(256, n) samples, every feature)."""
    settings = {"n_estimators": n_estimators, "max_samples": max_samples, "max_features": max_features}
    return FeatureOutlierDetector("isolation_forest", settings, in_chans, image_size, backbone, backbone_args,
                                  norm_layer, act_layer, attn_layer)


@register_model(task="anomaly")
def one_class_svm(in_chans: int = 1, image_size: int = 8, backbone: str = "resnet18",
                  backbone_args: dict | None = None, kernel: str = "rbf", nu: float = 0.5,
                  gamma: float | str = "scale", norm_layer: NormFactory | None = None,
                  act_layer: ActFactory | None = None, attn_layer: AttnFactory | None = None) -> FeatureOutlierDetector:
    """One-class SVM (Schölkopf et al. 2001) on rotation-trained CNN features; the SVM's settings are sklearn's (its
    defaults: RBF kernel, nu 0.5, gamma 1 / (features x variance))."""
    settings = {"kernel": kernel, "nu": nu, "gamma": gamma}
    return FeatureOutlierDetector("one_class_svm", settings, in_chans, image_size, backbone, backbone_args,
                                  norm_layer, act_layer, attn_layer)
