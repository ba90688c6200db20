"""FID, KID and precision/recall of generated images (cvlab.metrics.generation): the sanity figures of the issue (real
vs real near zero, real vs noise large; identical sets 1 / 1, disjoint far sets 0 / 0), Kynkäänniemi et al.'s
definition on a hand-checked case, and the penultimate features of a classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.metrics.generation import (
    ClassifierFeatures,
    GenerationScores,
    InceptionFeatures,
    kth_neighbour_distances,
    peak_ratio,
    precision_recall,
)
from cvlab.utils.errors import UserError


def digits(count: int, offset: int = 0) -> torch.Tensor:
    """scikit-learn's digits as Tensor[N, 1, 8, 8] in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[offset:offset + count], dtype=torch.float32)
    return (images / 8 - 1).unsqueeze(1)


class PixelFeatures(nn.Module):
    """A fixed feature map for the sanity tests: 16 random projections of the pixels, then ReLU."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(64, 16)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) / 8)
            self.project.bias.zero_()

    def forward(self, images):
        return self.project(images.flatten(1)).relu()


def scores_of(real: torch.Tensor, fake: torch.Tensor, full: bool = True, **kwargs) -> dict[str, float]:
    scores = GenerationScores(PixelFeatures(), full=full, **kwargs)
    for i in range(0, len(real), 100):  # in batches, as an evaluation pass feeds them
        scores.update(real[i:i + 100], real=True)
    for i in range(0, len(fake), 100):
        scores.update(fake[i:i + 100], real=False)
    return scores.compute()


def test_real_against_real_is_near_zero_and_against_noise_large():
    real_a, real_b = digits(600), digits(600, offset=600)
    noise = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    same, other = scores_of(real_a, real_b), scores_of(real_a, noise)
    assert scores_of(real_a, real_a, full=False)["fid"] == pytest.approx(0.0, abs=1e-6)
    # Measured: FID 0.067 vs 2.96, KID 0.0014 vs 0.58, precision / recall 0.83 / 0.84 vs 0.03 / 0.44.
    assert same["fid"] < 0.05 * other["fid"]
    assert abs(same["kid"]) < 0.01 * other["kid"]  # KID is unbiased: about 0 for two samples of one distribution
    # Digits against digits: each set mostly covers the other. Noise lies off the digits' manifold (precision);
    # spread wide, its own balls are large and take in many digits (recall 0.44), so recall alone says little.
    assert same["precision"] > 0.75 and same["recall"] > 0.75
    assert other["precision"] < 0.1


def test_peak_ratio_is_one_for_a_flat_map_and_the_pixel_count_for_one_spike():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 0] = -2.0                   # flat (the magnitude counts)
    maps[0, 1, 1, 2] = 5.0              # one spike in 16 pixels
    maps[1, 0] = torch.arange(16.0).view(4, 4)
    ratios = peak_ratio(maps)
    assert ratios.shape == (2, 3)
    torch.testing.assert_close(ratios[0], torch.tensor([1.0, 16.0, 0.0]))
    assert ratios[1, 0] == pytest.approx(15 / 7.5)


def test_validation_scores_are_fid_alone_and_reset_starts_over():
    scores = GenerationScores(PixelFeatures())
    scores.update(digits(100), real=True)
    scores.update(digits(100, offset=100), real=False)
    first = scores.compute()
    assert set(first) == {"fid"}
    scores.reset()
    scores.update(digits(100), real=True)
    scores.update(digits(100), real=False)
    assert scores.compute()["fid"] == pytest.approx(0.0, abs=1e-6) and first["fid"] > 0.1


def test_kid_subsets_shrink_to_the_images_at_hand():
    full = scores_of(digits(40), digits(40, offset=50), kid_subset_size=1000)  # 40 < 1000: every image, no error
    assert full["kid_std"] == pytest.approx(0.0, abs=1e-9)  # each subset then holds all of them
    sampled = scores_of(digits(40), digits(40, offset=50), kid_subset_size=20)
    assert sampled["kid_std"] > 0 and sampled["kid"] != full["kid"]
    assert scores_of(digits(40), digits(40, offset=50), kid_subset_size=20) == sampled  # subsets drawn from a seed


def test_precision_and_recall_of_identical_and_of_disjoint_far_sets():
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(points, points + 1000, k=3) == (0.0, 0.0)


def test_precision_and_recall_follow_the_k_nearest_neighbour_balls():
    # Real: 0, 1, ..., 9 on a line; with k = 1 every ball has radius 1 and the real manifold is [-1, 10].
    real = torch.arange(10.0)[:, None]
    # Generated: 0.5, 3, 9.9, 10 lie inside it, 12 and 15 outside: precision 4 / 6. Their own radii (k = 1) are 2.5,
    # 2.5, 0.1, 0.1, 2, 3: balls [-2, 3], [0.5, 5.5], [9.8, 10], [9.9, 10.1], [10, 14], [12, 18], which hold the reals
    # 0..5 but not 6..9: recall 6 / 10.
    fake = torch.tensor([0.5, 3.0, 9.9, 10.0, 12.0, 15.0])[:, None]
    assert kth_neighbour_distances(real, 1).tolist() == [1.0] * 10
    assert kth_neighbour_distances(fake, 1).tolist() == pytest.approx([2.5, 2.5, 0.1, 0.1, 2.0, 3.0], abs=1e-6)
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(4 / 6) and recall == pytest.approx(6 / 10)
    # k = 3 widens the balls: radius 2 inside, 3 at the ends 0 and 9 (the manifold [-3, 12]): 12 joins, 5 / 6.
    assert precision_recall(real, fake, k=3)[0] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="1 <= k < 6"):
        precision_recall(real, fake, k=6)


def test_classifier_features_are_the_input_of_the_last_linear_layer():
    from cvlab.models import create_model

    classifier = create_model("resnet18", num_classes=10, in_chans=1, image_size=8).eval()
    features = ClassifierFeatures(classifier, mean=[0.3], std=[0.4])
    images = digits(4)
    with torch.no_grad():
        normalised = ((images + 1) / 2 - 0.3) / 0.4
        expected = classifier.global_pool(classifier.forward_features(normalised)).flatten(1)
    assert features.num_features == 512
    torch.testing.assert_close(features(images), expected)
    features.train()
    assert not features.classifier.training  # frozen in eval mode: BatchNorm keeps its statistics
    assert not any(p.requires_grad for p in features.parameters())


def test_a_network_without_a_linear_layer_has_no_penultimate_features():
    with pytest.raises(UserError, match="has no linear classifier layer"):
        ClassifierFeatures(nn.Sequential(nn.Conv2d(1, 4, 3)), [0.5], [0.5])


def test_inception_features_need_torch_fidelity_or_say_so(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed: the refusal does not apply")
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        InceptionFeatures(str(tmp_path / "weights.pth"))


def _random_inception_weights(path, monkeypatch) -> None:
    """A weights file of torch-fidelity's FID Inception-v3 with random values (the real ones are a download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    with monkeypatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)


@pytest.mark.slow  # FID's eigenvalues of a 2048 x 2048 product: ~20 s on 2 cores
def test_inception_features_from_a_weights_file(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    _random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    features = InceptionFeatures(str(tmp_path / "inception.pth"))
    images = digits(3)
    assert features(images).shape == (3, 2048)  # greyscale 8 px in, RGB 299 px inside
    scores = GenerationScores(features, full=True, k=1)
    scores.update(images, real=True)
    scores.update(images, real=False)
    figures = scores.compute()
    assert figures["fid"] == pytest.approx(0.0, abs=1e-3) and (figures["precision"], figures["recall"]) == (1.0, 1.0)


def test_an_inception_file_that_holds_more_than_tensors_is_refused_unread(tmp_path):
    pytest.importorskip("torch_fidelity")
    torch.save({"payload": PixelFeatures()}, tmp_path / "module.pth")  # a pickled module: code to run on load
    with pytest.raises(UserError, match="holds no FID Inception-v3 weights"):
        InceptionFeatures(str(tmp_path / "module.pth"))
