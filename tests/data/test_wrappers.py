"""Mosaic and MixUp: boxes stay on their objects, probability 0 is the identity, every draw is seeded by
(epoch, index), and the detection datamodule applies them to its training loader only."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cvlab.data.base import DetectionDataset
from cvlab.data.detection import DetectionDataModule
from cvlab.data.samplers import EpochKeyedSampler, EpochShuffleSampler
from cvlab.data.shapes import ShapesDetection, draw_scene
from cvlab.data.wrappers import MixUp, Mosaic
from cvlab.utils.errors import UserError

SIZE = 64


class CodedScenes(DetectionDataset):
    """Shape scenes drawn as codes instead of colours: channel 0 holds ``40 * (label + 1)`` on an object's visible
    pixels (0 elsewhere), channel 1 the scene's number. Each scene holds distinct classes, so within one scene the
    class map is the instance map and a box can be checked against its own object's pixels."""

    def __init__(self, n: int = 8):
        super().__init__(("circle", "square", "triangle", "diamond", "cross"))
        rng = np.random.default_rng(0)
        self.scenes = [draw_scene(np.random.default_rng(100 + i), SIZE, labels=rng.permutation(5)[:3].tolist())
                       for i in range(n)]

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int):
        scene = self.scenes[index]
        image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
        image[0] = torch.from_numpy(scene.mask.astype(np.uint8) * 40)
        image[1] = index + 1
        return image, torch.from_numpy(scene.boxes), torch.from_numpy(scene.labels), index


@pytest.fixture(scope="module")
def scenes():
    return CodedScenes()


def test_mosaic_boxes_lie_on_their_objects(scenes):
    mosaic = Mosaic(scenes, probability=1.0, size=SIZE, seed=1)
    uncut = cut = 0
    sources_seen = set()
    for epoch in range(3):
        for index in range(len(scenes)):
            image, boxes, labels, image_id = mosaic.load_at(index, epoch)
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8 and image_id == index
            assert len(boxes) == len(labels) > 0
            quadrant_sources = set(image[1].unique().tolist()) - {114}  # grey where no image reaches
            sources_seen.add(len(quadrant_sources))
            for box, label in zip(boxes.tolist(), labels.tolist()):
                x1, y1, x2, y2 = (int(v) for v in box)
                assert box == [x1, y1, x2, y2] and 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
                assert x2 - x1 >= 2 and y2 - y1 >= 2
                inside = image[0, y1:y2, x1:x2] == 40 * (label + 1)
                assert inside.any(), (epoch, index, box, label)  # the box holds pixels of its own class
                source = int(image[1, y1:y2, x1:x2][inside][0]) - 1
                assert (image[1, y1:y2, x1:x2][inside] == source + 1).all()  # ...of one object of one scene
                ys, xs = torch.nonzero(inside, as_tuple=True)
                extent = [x1 + xs.min().item(), y1 + ys.min().item(),
                          x1 + xs.max().item() + 1, y1 + ys.max().item() + 1]
                whole = int((scenes.scenes[source].mask == label + 1).sum())
                if int(inside.sum()) == whole:  # the object is whole on the canvas: its box is tight on it
                    assert extent == [x1, y1, x2, y2]
                    uncut += 1
                else:  # cut at the canvas border or the centre: the box is clipped to what remains
                    cut += 1
    assert uncut >= 10 and cut >= 30 and max(sources_seen) == 4  # really four images, shifted and cut


def _measured_ratio(mixup: MixUp, scenes: CodedScenes, index: int, epoch: int) -> float:
    """Checks one mixup item against the scenes it blends and returns its blending ratio, measured on the pixels."""
    image, boxes, labels, image_id = mixup.load_at(index, epoch)
    own_image, own_boxes, own_labels, _ = scenes.load(index)
    assert image_id == index and torch.equal(boxes[: len(own_boxes)], own_boxes)
    assert torch.equal(labels[: len(own_labels)], own_labels)
    rest = boxes[len(own_boxes):]
    partners = [j for j in range(len(scenes)) if j != index and scenes.load(j)[1].shape == rest.shape
                and torch.equal(scenes.load(j)[1], rest)]
    assert len(partners) == 1, index  # the other boxes are exactly one other scene's, labels with them
    other_image, _, other_labels, _ = scenes.load(partners[0])
    assert torch.equal(labels[len(own_labels):], other_labels)
    a, b = own_image.float(), other_image.float()
    differ = (a - b).abs() > 20
    ratio = ((image.float() - b)[differ] / (a - b)[differ]).median().item()
    assert torch.allclose(image.float(), ratio * a + (1 - ratio) * b, atol=1.01)  # r * a + (1 - r) * b, rounded
    return ratio


def test_mixup_blends_two_images_and_keeps_both_boxes(scenes):
    keys = [(epoch, index) for epoch in range(3) for index in range(len(scenes))]
    near_half = [_measured_ratio(MixUp(scenes, 1.0, SIZE, seed=2), scenes, i, e) for e, i in keys]
    assert all(0.3 < r < 0.7 for r in near_half) and len({round(r, 2) for r in near_half}) > 5  # Beta(32, 32)
    wide = [_measured_ratio(MixUp(scenes, 1.0, SIZE, alpha=0.2, seed=2), scenes, i, e) for e, i in keys]
    assert min(wide) < 0.1 and max(wide) > 0.9  # a small alpha mostly shows one of the two images


def test_mixup_letterboxes_images_of_different_sizes():
    class Two(DetectionDataset):
        def __len__(self):
            return 2

        def load(self, index):
            shape = (3, 20, 40) if index == 0 else (3, 40, 20)
            return (torch.full(shape, 200 * index, dtype=torch.uint8), torch.tensor([[2.0, 4, 10, 12]]),
                    torch.tensor([index]), index)

    image, boxes, labels, _ = MixUp(Two(["a", "b"]), 1.0, size=40, seed=0).load_at(0, 0)
    assert image.shape == (3, 40, 40) and labels.tolist() == [0, 1]
    # 40 x 20 (w x h) is padded by 10 rows at the top, 20 x 40 by 10 columns at the left.
    assert boxes.tolist() == [[2, 14, 10, 22], [12, 4, 20, 12]]


@pytest.mark.parametrize("wrapper", [Mosaic, MixUp])
def test_probability_zero_is_the_identity(scenes, wrapper):
    wrapped = wrapper(scenes, 0.0, SIZE, seed=0)
    for key in (0, 5, (3, 2)):
        image, target = wrapped[key]
        expected_image, expected_target = scenes[key]
        assert torch.equal(image, expected_image)
        assert torch.equal(target["boxes"], expected_target["boxes"])
        assert target["image_id"] == expected_target["image_id"]


@pytest.mark.parametrize("wrapper", [Mosaic, MixUp])
def test_draws_depend_only_on_seed_epoch_and_index(scenes, wrapper):
    first, twin = wrapper(scenes, 1.0, SIZE, seed=4), wrapper(scenes, 1.0, SIZE, seed=4)
    image, target = first[(2, 3)]
    again, again_target = twin[(2, 3)]
    assert torch.equal(image, again) and torch.equal(target["boxes"], again_target["boxes"])
    by_epoch = {first[(epoch, 3)][0].numpy().tobytes() for epoch in range(6)}
    assert len(by_epoch) >= 5  # other epochs, other combinations
    assert not torch.equal(wrapper(scenes, 1.0, SIZE, seed=5)[(2, 3)][0], image)
    assert torch.equal(first[3][0], first[(0, 3)][0])  # a plain index is epoch 0


def test_half_probability_wraps_about_half_the_items(scenes):
    mosaic = Mosaic(scenes, 0.5, SIZE, seed=0)
    wrapped = sum(not torch.equal(mosaic.load_at(i, epoch)[0], scenes.load(i)[0])
                  for epoch in range(10) for i in range(len(scenes)))
    assert 25 <= wrapped <= 55  # of 80


def test_datamodule_applies_the_wrappers_to_its_training_loader_only():
    def batches(epoch: int, **kwargs):
        datamodule = DetectionDataModule("shapes_det", image_size=32, batch_size=4, train_size=8, val_size=4, seed=3,
                                         augment=False, **kwargs)
        datamodule.setup()
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return datamodule, loader, next(iter(loader))

    plain, plain_loader, (plain_images, _) = batches(1)
    assert type(plain_loader.sampler) is EpochShuffleSampler
    mixed, loader, (images, targets) = batches(1, mosaic=1.0, mixup=0.5)
    assert type(loader.sampler) is EpochKeyedSampler and isinstance(loader.dataset, MixUp)
    assert isinstance(loader.dataset.dataset, Mosaic) and loader.dataset.dataset.dataset is mixed.train_set
    assert isinstance(mixed.train_set, ShapesDetection) and isinstance(mixed.val_set, ShapesDetection)
    assert images.shape == plain_images.shape == (4, 3, 32, 32) and not torch.equal(images, plain_images)
    # A resumed run (a fresh datamodule at the same epoch) sees the same mosaics; the next epoch other ones.
    _, _, (resumed, resumed_targets) = batches(1, mosaic=1.0, mixup=0.5)
    assert torch.equal(resumed, images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, resumed_targets))
    assert not torch.equal(batches(2, mosaic=1.0, mixup=0.5)[2][0], images)
    val_images, _ = next(iter(mixed.val_dataloader()))
    assert torch.equal(val_images, next(iter(plain.val_dataloader()))[0])


@pytest.mark.parametrize("wrapper", [Mosaic, MixUp])
def test_until_epoch_leaves_the_last_epochs_plain(scenes, wrapper):
    closing = wrapper(scenes, 1.0, SIZE, seed=4, until_epoch=2)
    always = wrapper(scenes, 1.0, SIZE, seed=4)
    for epoch in range(4):
        for index in (0, 5):
            image, boxes, _, _ = closing.load_at(index, epoch)
            own_image, own_boxes, _, _ = scenes.load(index)
            plain = torch.equal(image, own_image) and torch.equal(boxes, own_boxes)
            assert plain == (epoch >= 2)
            if epoch < 2:  # before it, the same draws as without it
                assert torch.equal(image, always.load_at(index, epoch)[0])


def test_close_mosaic_counts_back_from_the_trainers_epochs(caplog):
    def view(close_mosaic: int, max_epochs: int | None):
        datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=8, val_size=4, mosaic=1.0,
                                         mixup=0.5, close_mosaic=close_mosaic)
        datamodule.setup()
        datamodule.trainer = SimpleNamespace(max_epochs=max_epochs)
        return datamodule.training_view()[0]

    with caplog.at_level("INFO"):
        mixup = view(3, 10)
        assert mixup.until_epoch == mixup.dataset.until_epoch == 7
        assert "mosaic/mixup for epochs 1-7 of 10" in caplog.text
        assert view(15, 10).until_epoch == 0 and "no epoch uses mosaic/mixup" in caplog.text
    assert view(0, 10).until_epoch is None
    with pytest.raises(UserError, match="data.close_mosaic=3 counts epochs back from trainer.max_epochs"):
        view(3, -1)
    with pytest.raises(UserError, match="data.close_mosaic"):
        DetectionDataModule("shapes_det", close_mosaic=-1)
