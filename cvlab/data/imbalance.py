"""Class imbalance at the data level: long-tailed views of a classification training split, and the resampling
samplers of imbalanced-learn.

**Long-tailed views** (``data.imbalance_ratio=ρ``, ``data.imbalance_profile``) keep, of each class ``i`` of the
training split, a seeded random ``n_i`` of its images:

- ``exp`` (the CIFAR-LT convention of Cui et al. 2019 and Cao et al. 2019): ``n_i = ⌊n_max · ρ^(−i/(C−1))⌋``, so
  class 0 keeps ``n_max`` and class ``C − 1`` keeps ``⌊n_max / ρ⌋`` (CIFAR-10 at ρ = 100: 5000, 2997, ..., 83, 50);
- ``step`` (Buda et al. 2018, with μ = 1/2): the first ``⌈C/2⌉`` classes keep ``n_max``, the others ``⌊n_max / ρ⌋``.

``n_max`` is the smallest class count of the training split, so that every class can give its share (for a
balanced source it is the per-class count). Only the training split is thinned: the validation and test splits stay
those of the source, so on a balanced source the test accuracy is the balanced accuracy.

**Normal-class views** (``data.normal_classes``, for ``task=anomaly``): the extreme of imbalance, where the other
classes have no training image at all. The training split keeps the images of the named classes (indices or class
names, :func:`normal_labels`); the validation and test splits keep every class, and the task scores the other
classes as anomalies.

**Resampling** (``sampler=random_under|random_over|nearmiss|enn|smote|smote_enn``): imbalanced-learn selects or
synthesises; nothing of it is rewritten here. :class:`Resampler` runs one of its samplers once, when the data is
read, and the training set becomes the resampled set (a view: :meth:`Resampler.view`), which the loader then
shuffles each epoch like any other. That is imbalanced-learn's own ``fit_resample`` semantics (one resampled set per
run), drawn from the run's seed, so a resumed run rebuilds exactly the same set; the many-subsets form is
EasyEnsemble, at the model level.

- random_under / random_over draw among the images by label alone (any image size): the view is a subset of the
  training images, with repeats for over-sampling (imbalanced-learn's ``sample_indices_``).
- nearmiss / enn look at neighbours and smote / smote_enn interpolate between them, in a feature space:
  ``sampler.space=pixels`` is the flattened image (after the resize, in [0, 1]), sensible for small images such as
  the 8x8 digits only: on large images pixel distances say little and interpolated pixels are ghosts. The selection
  methods give a subset again; the synthesising ones give the resampled pixel array itself (imbalanced-learn
  returns the originals and the new images together), whose images then take the training transform like any
  other.
- ``sampler.space=features`` resamples embeddings instead, the inputs of a trained classifier's linear head: the
  classifier re-training of Kang et al. 2020 with imbalanced-learn as its sampler, every method included. It is a
  `cvlab train` pipeline (:mod:`cvlab.engine.feature_resampling`), whose stages read the data without a sampler;
  a datamodule given a feature-space sampler accepts it (the command line's checks build one) but refuses to read.
  :meth:`Resampler.resample` is the one imbalanced-learn call of both spaces.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from cvlab.utils.errors import UserError, suggest
from cvlab.utils.validate import check_choice, check_number, first_line

PROFILES = ("exp", "step")
SPACES = ("pixels", "features")

# method -> (imbalanced-learn module, class, whether it needs features: neighbours or interpolation)
METHODS = {
    "random_under": ("imblearn.under_sampling", "RandomUnderSampler", False),
    "random_over": ("imblearn.over_sampling", "RandomOverSampler", False),
    "nearmiss": ("imblearn.under_sampling", "NearMiss", True),
    "enn": ("imblearn.under_sampling", "EditedNearestNeighbours", True),
    "smote": ("imblearn.over_sampling", "SMOTE", True),
    "smote_enn": ("imblearn.combine", "SMOTEENN", True),
}
# SMOTE-ENN's own settings are those of its two parts: SMOTE's k_neighbors and the cleaning ENN's n_neighbors.
_SMOTE_ENN_PARAMS = ("k_neighbors", "n_neighbors")
# Settings cvlab sets itself (the run's seed; one process: the loader's workers are the parallelism), and
# RandomOverSampler's shrinkage, a smoothed bootstrap that perturbs features: random_over copies images by label.
_OWN_PARAMS = ("sampling_strategy", "random_state", "n_jobs", "shrinkage")
# Neighbour counts bounded by the smallest class: SMOTE's k_neighbors by its count - 1 (it finds k neighbours of each
# image within its class), NearMiss' n_neighbors by its count (the neighbours are minority images).
_NEIGHBOURS_WITHIN_SMALLEST = {"smote": ("k_neighbors", 1), "smote_enn": ("k_neighbors", 1),
                               "nearmiss": ("n_neighbors", 0)}
_DEFAULT_NEIGHBOURS = {"k_neighbors": 5, "n_neighbors": 3}  # imbalanced-learn's defaults
# Pixel- and feature-space methods hold the training images' vectors (flattened pixels, or embeddings) in memory, and
# imbalanced-learn their resampled copy.
MAX_VECTOR_VALUES = 2**26
# The settings of the feature-space pipeline (:mod:`cvlab.engine.feature_resampling`), not imbalanced-learn's.
FEATURE_SETTINGS = ("encoder", "head_epochs")


# ------------------------------------------------------------------------------------------------- long tail
def check_imbalance(ratio: Any, profile: Any) -> None:
    """``data.imbalance_ratio`` (ρ >= 1, or null: the split as it is) and ``data.imbalance_profile``."""
    check_number("data.imbalance_ratio", ratio, 1, optional=True,
                 hint=" (ρ = n_max / n_min: 1 keeps every class at n_max, 100 is CIFAR-LT's usual)")
    check_choice("data.imbalance_profile", profile, PROFILES)
    if ratio is None and profile != PROFILES[0]:
        raise UserError(f"data.imbalance_profile={profile} acts only with a long tail: add data.imbalance_ratio=ρ "
                        "(e.g. 50).")


def long_tail_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed view (module docstring): ``exp`` ``⌊n_max · ρ^(−i/(C−1))⌋``, ``step``
    ``n_max`` for the first ``⌈C/2⌉`` classes and ``⌊n_max / ρ⌋`` for the others."""
    check_imbalance(ratio, profile)
    if num_classes < 2:
        raise UserError(f"data.imbalance_ratio needs at least 2 classes; the data has {num_classes}.")
    if profile == "exp":
        shares = [ratio ** (-i / (num_classes - 1)) for i in range(num_classes)]
    else:
        majority = math.ceil(num_classes / 2)
        shares = [1.0 if i < majority else 1 / ratio for i in range(num_classes)]
    # round() first: 100 * 10 ** -1.0 is 10.000000000000002 in floats (10), and 0.1 * 3 is 0.30000000000000004.
    return [math.floor(round(n_max * share, 6)) for share in shares]


def long_tail_indices(labels: Sequence[int], num_classes: int, ratio: float, profile: str, seed: int,
                      class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[int]]:
    """The sorted indices of a long-tailed view of ``labels`` (a seeded random ``n_i`` of class ``i``'s items,
    :func:`long_tail_counts` with ``n_max`` the smallest class count), and the counts ``n_i``."""
    labels = np.asarray(labels, dtype=np.int64)
    available = np.bincount(labels, minlength=num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    n_max = int(available.min())
    if n_max == 0:
        raise UserError(f"data.imbalance_ratio: class {names[int(available.argmin())]!r} has no training image; "
                        "a long-tailed view needs every class in the training split.")
    counts = long_tail_counts(n_max, num_classes, ratio, profile)
    if min(counts) < 1:
        raise UserError(f"data.imbalance_ratio={ratio:g} leaves class {names[counts.index(0)]!r} without an image "
                        f"(n_max = {n_max}, the smallest class of the training split); the most it allows is "
                        f"{n_max}.")
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == label))[:count] for label, count in enumerate(counts)]
    return np.sort(np.concatenate(kept)), counts


# ------------------------------------------------------------------------------------------------- normal classes
def check_normal_classes(normal_classes: Any) -> None:
    """``data.normal_classes`` has the form of a class or a list of them (an index or a class name each), or is null;
    whether the data has those classes is checked when it is read (:func:`normal_labels`)."""
    if normal_classes is None:
        return
    given = normal_classes if isinstance(normal_classes, (list, tuple)) else [normal_classes]
    if not given or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in given):
        raise UserError(f"data.normal_classes is a class (an index or a name) or a list of them, e.g. "
                        f"data.normal_classes=[0]; got {normal_classes!r}.")


def normal_labels(normal_classes: Any, class_names: Sequence[str]) -> list[int]:
    """The sorted labels that ``data.normal_classes`` names: each item an index ``0..C-1`` or a class name. A
    UserError names a class the data lacks (with the close names), and refuses naming every class, which would leave
    nothing to be an anomaly."""
    check_normal_classes(normal_classes)
    names = [str(name) for name in class_names]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    labels = set()
    for item in normal_classes if isinstance(normal_classes, (list, tuple)) else [normal_classes]:
        if isinstance(item, int):
            if not 0 <= item < len(names):
                raise UserError(f"data.normal_classes: there is no class {item}; the data's {len(names)} classes are "
                                f"0..{len(names) - 1} ({shown}).")
            labels.add(item)
        elif item in names:
            labels.add(names.index(item))
        else:
            raise UserError(f"data.normal_classes: the data has no class named {item!r}.{suggest(item, names)} Give "
                            f"class indices 0..{len(names) - 1} or names ({shown}).")
    if len(labels) == len(names):
        raise UserError(f"data.normal_classes names all {len(names)} classes, so no class is left to be an anomaly; "
                        "name fewer, e.g. data.normal_classes=[0].")
    return sorted(labels)


# ------------------------------------------------------------------------------------------------- resampling
def _method_class(method: str):
    module, name, _ = METHODS[method]
    return getattr(importlib.import_module(module), name)


def _settings(method: str) -> list[str]:
    """The imbalanced-learn settings a ``method`` takes through the sampler config (``sampler.version=...``)."""
    if method == "smote_enn":
        return list(_SMOTE_ENN_PARAMS)
    return sorted(set(_method_class(method)().get_params()) - set(_OWN_PARAMS))


def _plain_strategy(strategy: Any) -> Any:
    """``sampling_strategy`` as imbalanced-learn reads it: class keys of a dict as integers (a command line's
    ``{0: 50}`` may arrive with text keys), a list of classes as integers."""
    if isinstance(strategy, Mapping):
        try:
            return {int(key): value for key, value in strategy.items()}
        except (TypeError, ValueError):
            raise UserError(f"sampler.sampling_strategy={dict(strategy)}: a dict maps class indices to image "
                            "counts, e.g. {0: 50, 9: 50}.") from None
    if isinstance(strategy, (list, tuple)):
        return [int(label) for label in strategy]
    return strategy


class Resampled(NamedTuple):
    """A resampled training set: its items ``(image, label)`` and its labels (what the loader iterates)."""

    dataset: Dataset
    labels: list[int]


class Resampler:
    """One imbalanced-learn sampler run on the training set (module docstring); the ``sampler`` options
    random_under, random_over, nearmiss, enn, smote and smote_enn.

    ``method`` is one of :data:`METHODS`; ``sampling_strategy`` and the method's own settings (``params``: NearMiss'
    ``version``, SMOTE's ``k_neighbors``...) are imbalanced-learn's, passed through with its meaning; SMOTE-ENN takes
    ``k_neighbors`` for its SMOTE and ``n_neighbors`` for its cleaning ENN. ``labels`` are the training labels and
    ``seed`` the run's seed (imbalanced-learn's ``random_state``). ``space`` is what is resampled: ``pixels`` (the
    images, :meth:`view`) or ``features`` (embeddings, :meth:`resample`). ``encoder`` (a checkpoint whose network
    gives the embeddings; None: a first stage trains one) and ``head_epochs`` (the classifier head's re-training)
    are settings of the feature-space pipeline, which reads them from the config; they are only checked here.
    Nothing is computed until :meth:`view` or :meth:`resample`.
    """

    def __init__(self, labels: Sequence[int], seed: int, method: str, space: str = "pixels",
                 sampling_strategy: str | float | dict | list = "auto", encoder: str | None = None,
                 head_epochs: int = 10, **params: Any):
        check_resampling({"method": method, "space": space, "encoder": encoder, "head_epochs": head_epochs, **params})
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.method, self.space = int(seed), method, space
        self.sampling_strategy = _plain_strategy(sampling_strategy)
        self.params = params
        self.lowered = self._fit_neighbours()

    def _fit_neighbours(self) -> str:
        """Lowers a neighbour count that the smallest resampled class cannot supply (a long tail's last class may
        hold 2 images where imbalanced-learn's defaults need 6 for SMOTE, 3 for NearMiss) to the most it allows;
        returns what was lowered, for the log ("" when nothing was). A class of one image cannot be interpolated:
        refused, with the ``sampling_strategy`` that leaves it out."""
        if self.method not in _NEIGHBOURS_WITHIN_SMALLEST or not len(self.labels):
            return ""
        key, fewer = _NEIGHBOURS_WITHIN_SMALLEST[self.method]
        counts = {int(label): int(count) for label, count in enumerate(np.bincount(self.labels)) if count}
        # SMOTE interpolates within the classes its strategy names; NearMiss' neighbours are the minority's images
        # whatever classes it undersamples.
        named = fewer and isinstance(self.sampling_strategy, (dict, list))
        resampled = self.sampling_strategy if named else counts
        smallest_class = min((label for label in resampled if label in counts), key=counts.get, default=None)
        if smallest_class is None:
            return ""  # imbalanced-learn says what is wrong with the strategy
        smallest = counts[smallest_class]
        wanted, most = self.params.get(key, _DEFAULT_NEIGHBOURS[key]), smallest - fewer
        if most < 1 and fewer:
            largest = max(counts.values())
            others = ",".join(f"{label}:{largest}" for label in counts if counts[label] not in (largest, 1))
            fix = (f"leave it out with 'sampler.sampling_strategy={{{others}}}' (the others up to {largest}), or use "
                   "sampler=random_over" if others else "use sampler=random_over")
            raise UserError(f"sampler={self.method}: class {smallest_class} has 1 training image and SMOTE "
                            f"interpolates between two or more of a class; {fix}.")
        if not (isinstance(wanted, int) and 1 <= most < wanted):
            return ""  # fits, or cannot fit at all (imbalanced-learn says why)
        self.params = {**self.params, key: most}
        return f"{key} {wanted} -> {most} (the smallest class has {smallest} images)"

    @property
    def needs_features(self) -> bool:
        """Whether the method measures distances between images (then :meth:`view` reads their pixels)."""
        return METHODS[self.method][2]

    def estimator(self):
        """The imbalanced-learn sampler, configured (not fitted)."""
        kwargs = {"sampling_strategy": self.sampling_strategy}
        if self.method == "smote_enn":
            from imblearn.over_sampling import SMOTE
            from imblearn.under_sampling import EditedNearestNeighbours

            kwargs["smote"] = SMOTE(sampling_strategy=self.sampling_strategy, random_state=self.seed,
                                    k_neighbors=self.params.get("k_neighbors", 5))
            kwargs["enn"] = EditedNearestNeighbours(sampling_strategy="all",
                                                    n_neighbors=self.params.get("n_neighbors", 3))
            return _method_class(self.method)(random_state=self.seed, **kwargs)
        sampler_class = _method_class(self.method)
        if "random_state" in sampler_class().get_params():
            kwargs["random_state"] = self.seed
        return sampler_class(**kwargs, **self.params)

    def resample(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """imbalanced-learn's ``fit_resample`` of ``features`` ``float[N, D]``, one row per label of ``self.labels``:
        the resampled rows ``float[M, D]`` (for the synthesising methods the originals, then the new rows), their
        labels ``int64[M]``, and for the selection methods the row each is (``sample_indices_``; else None)."""
        sampler = self.estimator()
        try:
            resampled, labels = sampler.fit_resample(features, self.labels)
        except ValueError as error:  # imbalanced-learn checks its settings and the strategy against the labels
            raise UserError(f"sampler={self.method}: imbalanced-learn refuses it: {first_line(error)}") from None
        return resampled, labels, getattr(sampler, "sample_indices_", None)

    def view(self, dataset: Dataset, pixels: Callable[[], torch.Tensor]) -> Resampled:
        """The resampled ``dataset`` (whose items are ``(image, label)`` with ``self.labels``). ``pixels`` gives the
        images as ``Tensor[N, C, H, W]`` in [0, 1]; it is called only by the methods that need features."""
        images = pixels() if self.needs_features else None
        features = images.flatten(1).numpy() if images is not None else np.arange(len(self.labels))[:, None]
        resampled, labels, indices = self.resample(features)
        if indices is not None:  # a selection: the images themselves, some repeated
            return Resampled(Subset(dataset, indices.tolist()), labels.tolist())
        # The originals and the synthesised images together, as imbalanced-learn returns them.
        synthesised = torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32)).view(-1, *images.shape[1:])
        return Resampled(TensorDataset(synthesised, torch.from_numpy(labels)), labels.tolist())


def is_resampler(cfg: Mapping | None) -> bool:
    """Whether a sampler config names :class:`Resampler` (it changes the training set, not only its order)."""
    if not cfg or not cfg.get("_target_"):
        return False
    from hydra.utils import get_object

    try:
        target = get_object(str(cfg["_target_"]))
    except Exception:  # reported by the plug-in machinery, which names the config
        return False
    return isinstance(target, type) and issubclass(target, Resampler)


def resamples_features(cfg: Mapping | None) -> bool:
    """Whether a sampler config resamples embeddings (``sampler.space=features``): a pipeline of its own. A sampler
    that draws among the images themselves (class_balanced...) has no feature space: a UserError."""
    if not cfg or cfg.get("space", "pixels") != "features":
        return False
    if not is_resampler(cfg):
        raise UserError(f"sampler={cfg.get('name', cfg.get('_target_'))} draws among the training images "
                        "themselves and has no feature space; imbalanced-learn's samplers resample embeddings "
                        f"({', '.join(METHODS)}): sampler=random_over sampler.space=features re-trains the head on "
                        "class-balanced embeddings.")
    return True


def check_resampling(cfg: Mapping) -> None:
    """A resampler's ``method``, ``space`` and settings, before any data is read (one line each)."""
    method = cfg.get("method")
    check_choice("sampler.method", method, list(METHODS))
    space = cfg.get("space", "pixels")
    check_choice("sampler.space", space, SPACES)
    encoder = cfg.get("encoder")
    if encoder is not None and space != "features":
        raise UserError(f"sampler.encoder gives the network whose embeddings sampler.space=features resamples; "
                        f"sampler.space={space} resamples the images themselves. Add sampler.space=features, or "
                        "drop sampler.encoder.")
    if encoder is not None and not (isinstance(encoder, str) and encoder.strip()):
        raise UserError(f"sampler.encoder is the path of a cvlab checkpoint (runs/.../weights/best.ckpt), got "
                        f"{encoder!r}.")
    check_number("sampler.head_epochs", cfg.get("head_epochs", 10), 1, integer=True,
                 hint=" (the epochs that re-train the classifier head on the resampled embeddings)")
    known = _settings(method)
    for key in cfg:
        if key not in ("method", "space", "sampling_strategy", "_target_", "name", *FEATURE_SETTINGS, *known):
            raise UserError(f"sampler={method} has no setting {key!r}.{suggest(str(key), known)} Its imbalanced-learn "
                            f"settings: {', '.join(known) or 'none'}.")


def vector_budget(num_images: int, shape: Sequence[int], method: str, space: str = "pixels") -> None:
    """Refuses a resampling whose training vectors (images of ``shape`` in pixel space, embeddings of ``shape``
    ``(D,)`` in feature space) would not fit :data:`MAX_VECTOR_VALUES` values."""
    values = num_images * math.prod(shape)
    if values <= MAX_VECTOR_VALUES:
        return
    held = f"({values:,} values, over cvlab's {MAX_VECTOR_VALUES:,})"
    if space == "features":
        raise UserError(f"sampler={method} in feature space needs the {num_images:,} training embeddings of "
                        f"{shape[0]:,} values in memory {held}; use a model with a smaller embedding, or "
                        "sampler=class_balanced or a class-imbalance loss (`cvlab list loss`).")
    size = "x".join(map(str, shape))
    raise UserError(f"sampler={method} in pixel space needs the {num_images:,} training images of {size} in "
                    f"memory {held}, and SMOTE-like methods on raw pixels of large images are not sensible anyway; "
                    "use sampler.space=features (embeddings of a trained encoder), lower data.image_size, or use "
                    "sampler=random_over / random_under / class_balanced or a class-imbalance loss.")
