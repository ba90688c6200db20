"""Anomaly detectors of the model zoo (``task=anomaly``); every module here is imported (and so registered) by
cvlab.models.

This package also holds the contract every anomaly detector keeps (:class:`AnomalyDetector`): it learns from normal
images alone and scores how anomalous any image looks.
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn


class AnomalyDetector(nn.Module):
    """The anomaly contract, for images ``Tensor[N, in_chans, H, W]`` as the data normalises them:

    - :meth:`training_loss` (a scalar) is the objective the detector trains on normal images by gradient descent;
    - :meth:`anomaly_score` gives ``Tensor[N]``, higher for a more anomalous image;
    - a detector whose scorer has no gradient (an sklearn estimator) sets ``needs_fit``: :meth:`fit` is given the
      :meth:`features` ``Tensor[N, D]`` of the normal training images before it scores.
    """

    needs_fit: ClassVar[bool] = False

    def training_loss(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def anomaly_score(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores without fitted features")

    def fit(self, features: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} scores without fitted features")
