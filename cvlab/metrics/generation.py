"""How good generated images are, measured without downloading anything: FID, KID, precision and recall on the
features of a classifier that cvlab trained on the same data ("cvlab features"), or on Inception-v3 where its
weights are at hand.

- **FID** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium")
  and **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs") are torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``. The published figures use Inception-v3's pool features, whose weights come from the
  internet; here the feature network is :class:`ClassifierFeatures`, the penultimate layer of a zoo classifier
  trained on the data, so the figures rank models on that data but compare with no published FID. They are named
  "FID (cvlab features)" / "KID (cvlab features)", never plain FID. :class:`InceptionFeatures` is torchmetrics'
  FID Inception, read from a weights file.
- **Precision and recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models"): the real and the generated features each span a manifold, the union of the balls around every sample
  that reach its k-th nearest neighbour (k = 3); precision is the share of generated samples inside the real
  manifold (fidelity), recall the share of real samples inside the generated one (diversity). Hand-written
  (:func:`precision_recall`): neither torchmetrics nor any library cvlab uses has it.

:class:`GenerationScores` runs a feature network once per batch and hands the features to every measure: FID always,
KID and precision/recall when ``full`` (the test split; validation, every epoch, computes FID alone).

:func:`peak_ratio` measures the blob artefact of StyleGAN (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN", section 2): a generator that fights instance normalisation concentrates a feature map's
energy in one spot. Per map, the largest magnitude over the mean magnitude: 1 for a flat map, H·W for one spike.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from cvlab.utils.errors import UserError

# Rows of a pairwise-distance block (x 'all samples' float64 distances): bounds the memory of precision/recall.
DISTANCE_CHUNK = 1024
# KID draws its subsets from the global random generator: forked and seeded, the figure repeats and training's random
# stream stays where it was.
KID_SEED = 0


def unit_range(images: Tensor) -> Tensor:
    """Images in [-1, 1] (the generators' range) as [0, 1]."""
    return (images.clamp(-1, 1) + 1) / 2


class ClassifierFeatures(nn.Module):
    """The penultimate features of a trained classifier, ``Tensor[N, D]``: the input of its last ``nn.Linear`` (the
    pooled backbone features of a ResNet, the hidden layer of a MobileNetV3 head), for images ``Tensor[N, C, H, W]``
    in [-1, 1], normalised as the classifier was trained (``(x + 1) / 2``, then ``(· - mean) / std`` per channel).
    Frozen, always in eval mode; ``num_features`` is D."""

    def __init__(self, classifier: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        heads = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise UserError(f"{type(classifier).__name__} has no linear classifier layer to take features before; "
                            "metrics.feature_model takes a zoo classifier (resnet18, mobilenetv2, ...).")
        self.classifier = classifier.requires_grad_(False).eval()
        self.num_features = heads[-1].in_features
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._captured: list[Tensor] = []
        heads[-1].register_forward_pre_hook(lambda _module, inputs: self._captured.append(inputs[0]))

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        self._captured.clear()
        self.classifier((unit_range(images.float()) - self.mean) / self.std)
        return self._captured.pop().flatten(1)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 (``NoTrainInceptionV3``, pool3: 2048 features), its weights read from
    ``weights_path`` (``feature_extractor_weights_path``; the FID weights ``pt_inception-2015-12-05-6726825d.pth``),
    for images in [-1, 1]: greyscale repeated to RGB, then uint8, as it expects (it resizes to 299 px itself).

    torch-fidelity reads the file with ``torch.load(weights_only=False)``, which would run whatever a pickle in it
    asks: the file is read with ``weights_only=True`` first, and one holding anything but tensors is refused."""

    num_features = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise UserError("metrics.inception_weights needs torchmetrics' Inception, which needs torch-fidelity: "
                            "pip install torch-fidelity (or leave metrics.inception_weights=null).")
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                feature_extractor_weights_path=str(weights_path))
        except Exception as error:  # unpickling refused, not a state dict, or one of another network
            raise UserError(f"metrics.inception_weights {str(weights_path)!r} holds no FID Inception-v3 weights "
                            f"({str(error).splitlines()[0][:200]}).") from None

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        pixels = (unit_range(images.float()) * 255).round().to(torch.uint8)
        return self.inception(pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels)


class _GivenFeatures(nn.Module):
    """The ``feature`` module of the torchmetrics measures inside :class:`GenerationScores`, which are handed
    features already: it passes them on (``num_features`` tells torchmetrics their width)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


# ---------------------------------------------------------------------------------------------- precision / recall
def peak_ratio(features: Tensor) -> Tensor:
    """``max |x| / mean |x|`` over the pixels of each map: ``Tensor[N, C, H, W] → Tensor[N, C]`` (0 / 0 → 0)."""
    magnitude = features.detach().abs().flatten(2).float()
    return magnitude.amax(2) / magnitude.mean(2).clamp_min(torch.finfo(torch.float32).tiny)


def kth_neighbour_distances(points: Tensor, k: int, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """The distance of every row of ``points: Tensor[N, D]`` to its k-th nearest other row, ``Tensor[N]``."""
    if not 1 <= k < len(points):
        raise ValueError(f"the k-th nearest neighbour needs 1 <= k < {len(points)} samples, got k={k}")
    # k + 1: the nearest row of each is itself, at distance 0.
    return torch.cat([torch.cdist(points[i:i + chunk], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), chunk)])


def inside_manifold(queries: Tensor, points: Tensor, radii: Tensor, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """Whether each row of ``queries: Tensor[M, D]`` lies in a ball of ``points: Tensor[N, D]`` with ``radii:
    Tensor[N]`` (on its border counts: the paper's ``<=``), ``Tensor[M]`` bool."""
    return torch.cat([(torch.cdist(queries[i:i + chunk], points) <= radii).any(dim=1)
                      for i in range(0, len(queries), chunk)])


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s improved precision and recall of generated features ``fake: Tensor[M, D]`` against real
    ones ``real: Tensor[N, D]``, each manifold bounded by the k-th nearest neighbour distances (computed in float64)."""
    real, fake = real.double(), fake.double()
    precision = inside_manifold(fake, real, kth_neighbour_distances(real, k)).double().mean()
    recall = inside_manifold(real, fake, kth_neighbour_distances(fake, k)).double().mean()
    return float(precision), float(recall)


class PrecisionRecall(Metric):
    """:func:`precision_recall` over a whole split: ``update(features, real)`` keeps the features (gathered from
    every process), ``compute()`` gives ``(precision, recall)``."""

    full_state_update = False

    def __init__(self, k: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.k = int(k)
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.double())

    def compute(self) -> tuple[float, float]:
        return precision_recall(dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features), self.k)


# ---------------------------------------------------------------------------------------------- together
class GenerationScores(nn.Module):
    """FID of generated against real images on ``features`` (a module from images in [-1, 1] to ``Tensor[N, D]``
    with ``num_features``); with ``full`` also KID (mean and standard deviation over 100 subsets of
    ``kid_subset_size`` images, or of all of them when fewer) and precision/recall at ``k``.

    ``update(images, real)`` takes a batch of either kind; ``compute()`` gives ``{"fid", "kid", "kid_std",
    "precision", "recall"}`` (those measured); ``reset()`` starts over.
    """

    def __init__(self, features: nn.Module, full: bool = False, k: int = 3, kid_subset_size: int = 1000):
        super().__init__()
        self.features = features
        given = _GivenFeatures(int(features.num_features))
        self.fid = FrechetInceptionDistance(feature=given)
        self.kid_subset_size = int(kid_subset_size)
        self.kid = None
        if full:
            with warnings.catch_warnings():  # "KID keeps every feature": bounded here by the evaluated split
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                self.kid = KernelInceptionDistance(feature=given, subset_size=self.kid_subset_size)
        self.precision_recall = PrecisionRecall(k) if full else None

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        features = self.features(images).double()
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)
            self.precision_recall.update(features, real=real)

    def compute(self) -> dict[str, float]:
        scores = {"fid": float(self.fid.compute())}
        if self.kid is not None:
            count = min(sum(len(f) for f in self.kid.real_features), sum(len(f) for f in self.kid.fake_features))
            self.kid.subset_size = min(self.kid_subset_size, count)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(KID_SEED)
                kid, kid_std = self.kid.compute()
            precision, recall = self.precision_recall.compute()
            scores.update(kid=float(kid), kid_std=float(kid_std), precision=precision, recall=recall)
        return scores

    def reset(self) -> None:
        for metric in (self.fid, self.kid, self.precision_recall):
            if metric is not None:
                metric.reset()
