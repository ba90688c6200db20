"""Class imbalance at the data level: long-tailed views of the training split (exact counts, balanced val/test),
imbalanced-learn's samplers (the class counts imbalanced-learn itself gives on the same pixels), and the
augmentations (transforms.v2 single-image settings; mixup, CutMix and SamplePairing with their numbers)."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import DIGITS_LT_COUNTS
from cvlab.data.classification import _STATS, ClassificationDataModule
from cvlab.data.imbalance import Resampler, long_tail_counts, long_tail_indices
from cvlab.data.mixing import CutMixImages, MixupImages, SamplePairingImages
from cvlab.utils.errors import UserError

DIGITS = {"source": "digits", "image_size": 8, "in_chans": 1, "seed": 42}


def _setup(**kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule(**{**DIGITS, **kwargs})
    dm.setup()
    return dm


def _sampler(name: str, **settings) -> dict:
    from cvlab.utils.config import compose

    node = OmegaConf.to_container(compose("train", [f"sampler={name}"]).sampler)
    return {**node, **settings}


def _pixels(dm: ClassificationDataModule) -> np.ndarray:
    """The training images of ``dm`` (augment off) back on [0, 1], flattened: Tensor[N, 64] as numpy."""
    mean, std = _STATS["digits"]
    return np.stack([(image * std[0] + mean[0]).flatten().numpy() for image, _ in dm.train_set])


@pytest.fixture(scope="module")
def digits_lt():
    return _setup(imbalance_ratio=50)


# ----------------------------------------------------------------------------------------------- long tail
def test_exponential_profile_is_cifar_lt():
    # CIFAR-10-LT at ρ = 100 (Cao et al. 2019's counts, 12,406 images).
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for n_max, classes, ratio in ((500, 100, 100), (122, 10, 50), (1000, 7, 10), (40, 3, 2.5)):
        expected = [math.floor(n_max * ratio ** (-i / (classes - 1)) + 1e-9) for i in range(classes)]
        assert long_tail_counts(n_max, classes, ratio) == expected
    assert long_tail_counts(100, 10, 10)[-1] == 10  # 100 * 10 ** -1.0 is 10.000000000000002: no off-by-one
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]


def test_step_profile():
    assert long_tail_counts(100, 10, 10, "step") == [100] * 5 + [10] * 5
    assert long_tail_counts(90, 5, 4, "step") == [90, 90, 90, 22, 22]  # the larger half keeps n_max


def test_long_tail_view_of_digits(digits_lt):
    plain = _setup()
    assert list(digits_lt.info.class_counts) == DIGITS_LT_COUNTS
    assert min(plain.info.class_counts) == DIGITS_LT_COUNTS[0]  # n_max: the smallest class of the split
    assert DIGITS_LT_COUNTS == long_tail_counts(122, 10, 50)
    assert len(digits_lt.train_set) == sum(DIGITS_LT_COUNTS) == 336
    # Only the training split is thinned: val and test are the balanced splits of plain digits, image for image.
    for split in ("val_set", "test_set"):
        ours, theirs = getattr(digits_lt, split), getattr(plain, split)
        assert len(ours) == len(theirs)
        assert all(torch.equal(ours[i][0], theirs[i][0]) for i in range(0, len(ours), 17))
    test_counts = np.bincount([label for _, label in digits_lt.test_set])
    assert test_counts.max() - test_counts.min() <= 2  # 26..28 of each class: accuracy is balanced accuracy
    # The kept images are images of the plain training split.
    plain_images = {tuple(image.flatten().tolist()) for image, _ in plain.train_set}
    assert all(tuple(image.flatten().tolist()) in plain_images for image, _ in digits_lt.train_set)


def test_long_tail_is_seeded_by_the_data_seed():
    labels = np.repeat(np.arange(4), 30)
    first, counts = long_tail_indices(labels, 4, 10, "exp", seed=0)
    again, _ = long_tail_indices(labels, 4, 10, "exp", seed=0)
    other, other_counts = long_tail_indices(labels, 4, 10, "exp", seed=1)
    assert counts == other_counts == [30, 13, 6, 3]
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.bincount(labels[first]).tolist() == counts


def test_step_profile_through_the_datamodule():
    dm = _setup(imbalance_ratio=10, imbalance_profile="step")
    assert list(dm.info.class_counts) == [122] * 5 + [12] * 5


def test_digits_lt_preset():
    from cvlab.utils.config import compose

    data = compose("train", ["data=digits_lt"]).data
    assert (data.name, data.source, data.imbalance_ratio, data.imbalance_profile) == ("digits_lt", "digits", 50, "exp")


@pytest.mark.parametrize("settings, message", [
    ({"imbalance_ratio": 0.5}, r"data.imbalance_ratio must be a number >= 1"),
    ({"imbalance_ratio": float("inf")}, r"data.imbalance_ratio must be a number >= 1"),
    ({"imbalance_ratio": "ten"}, r"data.imbalance_ratio must be a number"),
    ({"imbalance_ratio": 10, "imbalance_profile": "expo"}, r"is one of exp, step; got 'expo'. Did you mean exp"),
])
def test_bad_imbalance_settings_are_one_line(settings, message):
    with pytest.raises(UserError, match=message) as error:
        ClassificationDataModule(**DIGITS, **settings)
    assert "\n" not in str(error.value)


def test_a_ratio_that_empties_a_class_is_refused():
    with pytest.raises(UserError, match=r"ratio=200 leaves class '9' without an image .* the most it allows is 122"):
        _setup(imbalance_ratio=200)


# ----------------------------------------------------------------------------------------------- samplers
def _imblearn(estimator, features, labels):
    resampled, resampled_labels = estimator.fit_resample(features, labels)
    return np.bincount(resampled_labels, minlength=10).tolist(), resampled, estimator


@pytest.mark.parametrize("name", ["random_under", "random_over", "nearmiss", "enn", "smote", "smote_enn"])
def test_each_sampler_gives_imbalanced_learns_counts(digits_lt, name):
    from imblearn.combine import SMOTEENN
    from imblearn.over_sampling import SMOTE, RandomOverSampler
    from imblearn.under_sampling import EditedNearestNeighbours, NearMiss, RandomUnderSampler

    dm = ClassificationDataModule(**DIGITS, imbalance_ratio=50, sampler=_sampler(name))
    dm.seed_order(7)
    dm.setup()
    labels = np.asarray(digits_lt.train_labels)
    features = _pixels(digits_lt)
    # What imbalanced-learn gives on the same pixels with the run's seed (neighbours lowered to the 2-image class).
    expected = {
        "random_under": lambda: RandomUnderSampler(random_state=7),
        "random_over": lambda: RandomOverSampler(random_state=7),
        "nearmiss": lambda: NearMiss(n_neighbors=2),
        "enn": lambda: EditedNearestNeighbours(),
        "smote": lambda: SMOTE(k_neighbors=1, random_state=7),
        "smote_enn": lambda: SMOTEENN(random_state=7, smote=SMOTE(k_neighbors=1, random_state=7),
                                      enn=EditedNearestNeighbours(sampling_strategy="all")),
    }[name]()
    counts, resampled, estimator = _imblearn(expected, features, labels)
    ours = np.bincount([int(label) for _, label in dm.train_set], minlength=10).tolist()
    assert ours == np.bincount(dm.resampled_labels, minlength=10).tolist() == counts
    assert ours != DIGITS_LT_COUNTS  # the sampler changed the training set
    assert list(dm.info.class_counts) == DIGITS_LT_COUNTS  # the losses still see the data's counts
    if name == "random_under":
        assert counts == [2] * 10  # down to the smallest class
    if name in ("random_over", "smote"):
        assert counts == [122] * 10  # up to the largest class
    if hasattr(estimator, "sample_indices_"):  # a selection: exactly imbalanced-learn's images
        assert np.allclose(_pixels(dm), features[estimator.sample_indices_], atol=1e-6)
    else:  # the synthesised set itself
        assert np.allclose(_pixels(dm), resampled, atol=1e-6)


def test_nearmiss_version_and_sampling_strategy_pass_through(digits_lt):
    from imblearn.under_sampling import NearMiss

    lt10 = _setup(imbalance_ratio=10)  # 12 images in the last class: room for 3 neighbours
    features, labels = _pixels(lt10), np.asarray(lt10.train_labels)
    views = {}
    for version in (1, 2, 3):
        dm = _setup(imbalance_ratio=10, sampler=_sampler("nearmiss", version=version))
        views[version] = _pixels(dm)
        expected = NearMiss(version=version)
        expected.fit_resample(features, labels)
        assert np.allclose(views[version], features[expected.sample_indices_], atol=1e-6)
    for first, second in ((1, 2), (1, 3), (2, 3)):  # the version reached imbalanced-learn
        assert views[first].shape != views[second].shape or not np.allclose(views[first], views[second])
    # sampling_strategy with imbalanced-learn's meaning: {class: count} under-samples those classes only.
    dm = _setup(imbalance_ratio=50, sampler=_sampler("random_under", sampling_strategy={0: 10, 1: 4}))
    assert np.bincount(dm.resampled_labels).tolist() == [10, 4, *DIGITS_LT_COUNTS[2:]]
    dm = _setup(imbalance_ratio=50, sampler=_sampler("random_over", sampling_strategy="minority"))
    assert np.bincount(dm.resampled_labels).tolist() == [*DIGITS_LT_COUNTS[:9], 122]


def test_smote_keeps_the_originals_and_interpolates_within_a_class(digits_lt):
    dm = _setup(imbalance_ratio=50, sampler=_sampler("smote"))
    pixels, originals = _pixels(dm), _pixels(digits_lt)
    assert np.allclose(pixels[: len(originals)], originals, atol=1e-6)
    synthetic = pixels[len(originals):]
    assert len(synthetic) == 1220 - 336 and synthetic.min() >= -1e-6 and synthetic.max() <= 1 + 1e-6
    # Class 9 has two images: every synthetic 9 lies on the segment between them.
    nines = originals[np.asarray(digits_lt.train_labels) == 9]
    labels = np.asarray(dm.resampled_labels[len(originals):])
    for image in synthetic[labels == 9]:
        share = np.dot(image - nines[0], nines[1] - nines[0]) / np.dot(nines[1] - nines[0], nines[1] - nines[0])
        assert 0 <= share <= 1 and np.allclose(image, nines[0] + share * (nines[1] - nines[0]), atol=1e-5)


def test_resampling_is_seeded_by_the_run_seed():
    views = []
    for seed in (1, 1, 2):
        dm = ClassificationDataModule(**DIGITS, imbalance_ratio=50, sampler=_sampler("random_under"))
        dm.seed_order(seed)
        dm.setup()
        views.append(_pixels(dm))
    assert np.array_equal(views[0], views[1]) and not np.array_equal(views[0], views[2])
    assert len(dm.train_dataloader().sampler) == 20  # the loader shuffles the resampled set


@pytest.mark.parametrize("settings, message", [
    ({"encoder": "best.ckpt"}, r"sampler.encoder gives the network whose embeddings sampler.space=features "
                               r"resamples; sampler.space=pixels resamples the images themselves"),
    ({"space": "voxels"}, r"sampler.space is one of pixels, features; got 'voxels'"),
    ({"k_neighbours": 3}, r"sampler=smote has no setting 'k_neighbours'. Did you mean k_neighbors"),
])
def test_bad_sampler_settings_are_refused_before_reading(settings, message):
    with pytest.raises(UserError, match=message):
        ClassificationDataModule(**DIGITS, sampler=_sampler("smote", **settings))


def test_a_class_of_one_image_is_refused_with_the_strategy_that_leaves_it_out():
    labels = [0] * 6 + [1] * 3 + [2]
    with pytest.raises(UserError, match=r"sampler=smote: class 2 has 1 training image .*"
                                        r"'sampler.sampling_strategy=\{1:6\}' \(the others up to 6\)"):
        Resampler(labels, seed=0, method="smote")
    # The suggested strategy is taken: class 1 grows to 6 by interpolation (k lowered to its 3 images - 1).
    resampler = Resampler(labels, seed=0, method="smote", sampling_strategy={"1": 6})
    assert resampler.lowered == "k_neighbors 5 -> 2 (the smallest class has 3 images)"
    features = np.arange(10, dtype=float)[:, None]
    _, resampled_labels, _ = resampler.resample(features)
    assert np.bincount(resampled_labels).tolist() == [6, 6, 1]


def test_imbalanced_learns_own_refusals_are_one_line():
    with pytest.raises(UserError, match=r"sampler=nearmiss: imbalanced-learn refuses it: .*version.*Got 4"):
        _setup(sampler=_sampler("nearmiss", version=4))


def test_pixel_space_memory_is_bounded(monkeypatch):
    monkeypatch.setattr("cvlab.data.imbalance.MAX_VECTOR_VALUES", 1000)
    with pytest.raises(UserError, match=r"sampler=smote in pixel space needs the 1,257 training images of 1x8x8"):
        _setup(sampler=_sampler("smote"))
    assert len(_setup(sampler=_sampler("random_over")).train_set) == 1280  # label-only: no pixels held


def test_detection_data_refuses_the_resamplers():
    from cvlab.cli import complete_task
    from cvlab.utils.config import check_overrides

    with pytest.raises(UserError, match="sampler=smote needs labels, which detection data does not provide"):
        check_overrides("train", complete_task(["model=yolov3_tiny", "sampler=smote"]))


def test_sampler_list_says_where_smote_makes_sense():
    from cvlab.utils.config import describe

    for name in ("smote", "smote_enn"):
        assert "small images" in describe("sampler", name) and "not sensible" in describe("sampler", name)
        assert "sampler.space=features" in describe("sampler", name)
    assert Resampler([0, 0, 1, 1], 0, "smote").needs_features
    assert not Resampler([0, 0, 1, 1], 0, "random_over").needs_features


# ----------------------------------------------------------------------------------------------- augmentation
def _train_images(dm: ClassificationDataModule, count: int = 40) -> torch.Tensor:
    """The first ``count`` training images, each drawn from torch's RNG seeded by its index: with and without a
    setting, the crops are the same."""
    images = []
    for index in range(count):
        torch.manual_seed(index)
        images.append(dm.train_set[index][0])
    return torch.stack(images)


@pytest.mark.parametrize("key, value", [("rotate", 30.0), ("color_jitter", 0.4), ("noise", 0.1), ("erasing", 1.0)])
def test_single_image_augmentations_take_effect(key, value):
    base = _train_images(_setup(augment=True))
    assert torch.equal(base, _train_images(_setup(augment=True)))  # the same draws without the setting
    changed = _train_images(_setup(augment=True, **{key: value}))
    mean, std = _STATS["digits"]
    if key == "noise":  # Gaussian noise of standard deviation 0.1 where no clipping happens
        diff = (changed - base) * std[0]
        clean = base * std[0] + mean[0]
        inside = (clean > 0.4) & (clean < 0.6)
        assert inside.sum() > 100 and abs(diff[inside].std().item() - 0.1) < 0.02
    elif key == "erasing":  # every image has an erased rectangle, 0 after Normalize (the mean)
        assert (base == 0).sum() == 0 and all((image == 0).sum() >= 1 for image in changed)
    else:
        assert (changed - base).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5


@pytest.mark.parametrize("key", ["rotate", "color_jitter", "noise", "erasing"])
def test_single_image_augmentations_need_augment(key):
    with pytest.raises(UserError, match=f"data.{key} acts only with data.augment=true"):
        ClassificationDataModule(**DIGITS, **{key: 0.5})


class Constant(torch.utils.data.Dataset):
    """Image ``i`` is filled with ``i`` and labelled ``i``: a mixed image tells which images made it."""

    def __init__(self, size: int = 6, side: int = 8):
        self.size, self.side = size, side

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.full((1, self.side, self.side), float(index)), index


def test_mixup_blends_images_and_labels_with_beta_ratios():
    shares = {}
    for alpha in (0.2, 32.0):
        mixed = MixupImages(Constant(), num_classes=6, alpha=alpha, seed=3)
        products = []
        for epoch in range(50):
            for index in range(6):
                image, label = mixed[(epoch, index)]
                assert label.dtype == torch.float32 and label.shape == (6,) and abs(label.sum() - 1) < 1e-6
                assert label[index] >= 0 and (label > 0).sum() <= 2
                # The image is the label-weighted blend of the two images (image i holds the value i).
                assert torch.allclose(image, torch.full_like(image, float((label * torch.arange(6)).sum())))
                ratio = float(label[index])
                products.append(ratio * (1 - ratio))
        shares[alpha] = float(np.mean(products))
    # E[λ(1 - λ)] = α / (2 (2α + 1)) for λ ~ Beta(α, α): 0.071 at α = 0.2, 0.246 at α = 32.
    assert abs(shares[0.2] - 0.2 / (2 * 1.4)) < 0.02 and abs(shares[32.0] - 32 / (2 * 65)) < 0.01
    assert torch.equal(mixed[(4, 2)][0], mixed[(4, 2)][0]) and not torch.equal(mixed[(4, 2)][1], mixed[(5, 2)][1])


def test_cutmix_labels_follow_the_pasted_area():
    mixed = CutMixImages(Constant(side=16), num_classes=6, alpha=1.0, seed=0)
    pasted = 0
    for epoch in range(20):
        image, label = mixed[(epoch, 1)]
        own = (image == 1).float().mean()
        assert abs(label[1] - own) < 1e-6 and abs(label.sum() - 1) < 1e-6
        others = [value for value in image.unique().tolist() if value != 1]
        assert len(others) <= 1
        if others:
            other = int(others[0])
            assert abs(label[other] - (1 - own)) < 1e-6
            rows, cols = torch.nonzero(image[0] == other, as_tuple=True)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box == len(rows)  # one rectangle
            pasted += 1
    assert pasted > 10


def test_sample_pairing_schedule_and_labels():
    pairing = SamplePairingImages(Constant(), start=2, on=3, off=1, stop=8, seed=0)
    active = [epoch for epoch in range(12) if pairing.active(epoch)]
    assert active == [2, 3, 4, 6, 7]
    for epoch in range(12):
        image, label = pairing[(epoch, 4)]
        assert label == 4  # the first image's label, always
        if epoch in active:
            value = float(image[0, 0, 0])
            assert torch.all(image == value) and value != 4 and (2 * value - 4) in range(6)  # (4 + j) / 2, j != 4
        else:
            assert torch.equal(image, Constant()[4][0])


def test_mixing_options_reach_the_training_loader():
    for settings, wrapper in (({"mixup_alpha": 0.2}, MixupImages), ({"cutmix_alpha": 1.0}, CutMixImages),
                              ({"sample_pairing": True, "pairing_start": 0}, SamplePairingImages)):
        dm = _setup(batch_size=8, **settings)
        view, keyed = dm.training_view()
        assert isinstance(view, wrapper) and keyed
        images, labels = next(iter(dm.train_dataloader()))
        if wrapper is SamplePairingImages:
            assert labels.dtype == torch.int64 and labels.shape == (8,)
        else:
            assert labels.shape == (8, 10) and torch.allclose(labels.sum(1), torch.ones(8))
    plain = _setup()
    assert plain.training_view() == (plain.train_set, False)
    with pytest.raises(UserError, match="data.mixup_alpha and data.cutmix_alpha both mix training images"):
        ClassificationDataModule(**DIGITS, mixup_alpha=0.2, cutmix_alpha=1.0)
    with pytest.raises(UserError, match="data.pairing_stop must be an integer >= 5"):
        ClassificationDataModule(**DIGITS, sample_pairing=True, pairing_start=5, pairing_stop=3)


def test_mixup_trains_a_step_on_soft_labels(train_cfg):
    from cvlab.engine import run_train

    steps = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "~callbacks.model_checkpoint",
             "~callbacks.last_checkpoint", "trainer.enable_checkpointing=false", "data.mixup_alpha=0.4",
             "loss=focal"]
    metrics, built = run_train(train_cfg(*steps))
    assert math.isfinite(metrics["val/loss"])
    assert isinstance(built["datamodule"].training_view()[0], MixupImages)
