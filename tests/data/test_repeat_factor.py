"""sampler=repeat_factor (LVIS, Gupta et al. 2019): the repeat factors of a hand-made annotation set against a hand
computation, the epoch length, counts that round the factors, sampled class frequencies that move as predicted,
replay by (seed, epoch), DDP sharding through Lightning's wrapper, the detection datamodules (shapes_det, a COCO
folder) and a one-step training run, and the refusal on classification and segmentation data."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

from cvlab.data.detection import DetectionDataModule
from cvlab.data.samplers import RepeatFactorSampler, repeat_factors
from cvlab.utils.errors import UserError
from detection_files import shape_scenes, write_coco

# Ten images. Class 0 is in 8 of them (f = 0.8), class 1 in one (0.1), class 2 in two (0.2); one image is empty.
IMAGE_LABELS = [[0], [0, 0], [0, 1], [0], [0], [0], [2, 0], [2], [0], []]
THRESHOLD = 0.5
# r_c = max(1, sqrt(t / f_c)): class 0 max(1, sqrt(0.625)) = 1, class 1 sqrt(5), class 2 sqrt(2.5).
HAND_FACTORS = [1, 1, math.sqrt(5), 1, 1, 1, math.sqrt(2.5), math.sqrt(2.5), 1, 1]
HAND_TOTAL = 7 + math.sqrt(5) + 2 * math.sqrt(2.5)  # 12.398
EPOCH = 13  # ceil(12.398)
REPEAT_FACTOR = {"_target_": "cvlab.data.samplers.RepeatFactorSampler", "name": "repeat_factor", "task": "detection"}


def test_repeat_factors_are_lvis_formula_by_hand():
    assert repeat_factors(IMAGE_LABELS, THRESHOLD).tolist() == pytest.approx(HAND_FACTORS, abs=1e-12)
    # The default threshold (0.001) is below every share here: no image repeats.
    assert repeat_factors(IMAGE_LABELS, 0.001).tolist() == [1.0] * 10
    # A share of images, not of objects: class 3 is in 1 of 4 images (sqrt(0.8 / 0.25)), though 2 of the 5 objects.
    assert repeat_factors([[3, 3], [1], [1], [1]], 0.8).tolist() == pytest.approx(
        [math.sqrt(3.2), *[math.sqrt(0.8 / 0.75)] * 3])


def test_an_epoch_has_the_rounded_up_total_and_rounds_each_factor():
    sampler = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=3)
    assert len(sampler) == EPOCH
    scaled = torch.tensor(HAND_FACTORS, dtype=torch.float64) * EPOCH / HAND_TOTAL
    assert sampler.scaled_factors.tolist() == pytest.approx(scaled.tolist())
    for epoch in range(30):
        sampler.set_epoch(epoch)
        counts, draws = sampler.counts(), list(sampler)
        assert int(counts.sum()) == len(draws) == EPOCH
        assert Counter(draws) == Counter({i: int(c) for i, c in enumerate(counts) if c})
        # floor or ceil of each scaled factor: every image at least once, image 2 (class 1) two or three times
        assert ((counts == scaled.floor()) | (counts == scaled.ceil())).all() and counts.min() >= 1


def test_sampled_class_frequencies_move_as_predicted():
    sampler = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=0)
    epochs = 400
    counts = torch.zeros(10, dtype=torch.float64)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts += sampler.counts()
    # Each image's mean count is its scaled factor (the standard error is below 0.025 here).
    expected = torch.tensor(HAND_FACTORS, dtype=torch.float64) * EPOCH / HAND_TOTAL
    assert (counts / epochs - expected).abs().max() < 0.08
    # The share of drawn images holding class 1: 1 of 10 uniformly, sqrt(5) / 12.398 = 0.180 predicted.
    share = {c: float(sum(counts[i] for i, labels in enumerate(IMAGE_LABELS) if c in labels) / (epochs * EPOCH))
             for c in range(3)}
    assert share[1] == pytest.approx(math.sqrt(5) / HAND_TOTAL, abs=0.01) and share[1] > 0.17
    assert share[2] == pytest.approx(2 * math.sqrt(2.5) / HAND_TOTAL, abs=0.01)  # 0.255, uniformly 0.2
    assert share[0] == pytest.approx((7 + math.sqrt(5) + math.sqrt(2.5) - 1) / HAND_TOTAL, abs=0.01)  # 0.77 < 0.8


def test_the_order_replays_by_seed_and_epoch():
    sampler = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=5)
    sampler.set_epoch(2)
    order = list(sampler)
    assert list(sampler) == order
    again = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=5)
    again.set_epoch(2)
    assert list(again) == order
    again.set_epoch(3)
    assert list(again) != order
    other = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=6)
    other.set_epoch(2)
    assert list(other) != order


def test_ddp_shards_one_epoch_between_the_processes():
    """Lightning wraps the sampler in DistributedSamplerWrapper under DDP: each process draws the same epoch and
    keeps its share; together they hold the epoch (13 draws, padded by one to 14 for two processes)."""
    ranks = [DistributedSamplerWrapper(RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=1),
                                       num_replicas=2, rank=rank, shuffle=True, seed=0) for rank in (0, 1)]
    single = RepeatFactorSampler(IMAGE_LABELS, threshold=THRESHOLD, seed=1)
    for epoch in (0, 1):
        for shard in ranks:
            shard.set_epoch(epoch)  # Lightning's call each epoch; the wrapper passes it on
        single.set_epoch(epoch)
        shards = [list(shard) for shard in ranks]
        assert [len(s) for s in shards] == [7, 7] and [len(s) for s in ranks] == [7, 7]
        extra = Counter(shards[0] + shards[1]) - Counter(single)
        assert sum(extra.values()) == 1 and not Counter(single) - Counter(shards[0] + shards[1])
    assert ranks[0].dataset._sampler.epoch == 1


def test_the_threshold_is_checked():
    with pytest.raises(UserError, match=r"^sampler.threshold must be a number in \(0, 1\]"):
        RepeatFactorSampler(IMAGE_LABELS, threshold=0)


# ------------------------------------------------------------------------------------------ the datamodules
def test_shapes_det_offers_each_image_s_classes():
    datamodule = DetectionDataModule("shapes_det", image_size=32, train_size=12, val_size=2, seed=2,
                                     sampler={**REPEAT_FACTOR, "threshold": 0.9})
    datamodule.setup()
    sampler = datamodule.train_dataloader().sampler
    labels = [datamodule.train_set.annotation(i).labels.tolist() for i in range(12)]
    assert isinstance(sampler, RepeatFactorSampler) and sampler.threshold == 0.9 and sampler.seed == 2
    expected = repeat_factors(labels, 0.9)
    assert torch.equal(sampler.repeat_factors, expected) and expected.max() > 1
    assert len(sampler) == math.ceil(float(expected.sum())) > 12


def test_a_coco_folder_repeats_its_rare_class(tmp_path):
    # Four training images: circles (label 0) in all, one triangle (label 2) in the last.
    train = [(f"img{i}", *rest) for i, (_, *rest) in enumerate(shape_scenes([(0,), (0, 1), (0,), (0, 2)]))]
    write_coco(tmp_path, "train2017", train)
    write_coco(tmp_path, "val2017", shape_scenes([(1,)], seed=300))
    write_coco(tmp_path, "test2017", shape_scenes([(2,)], seed=400))
    datamodule = DetectionDataModule("coco", root=str(tmp_path), image_size=32, augment=False,
                                     sampler={**REPEAT_FACTOR, "threshold": 0.5})
    datamodule.setup()
    sampler = datamodule.train_dataloader().sampler
    # f_0 = 1, f_1 = f_2 = 1/4: r = max(1, sqrt(0.5 / 0.25)) = sqrt(2) for images 1 and 3.
    assert sampler.repeat_factors.tolist() == pytest.approx([1, math.sqrt(2), 1, math.sqrt(2)])
    assert len(sampler) == 5 and len(datamodule.train_dataloader()) == 1  # ceil(2 + 2 sqrt 2); batch 16


@pytest.mark.parametrize("overrides, kind", [((), "classification"),
                                             (("task=segmentation", "model=unet", "data=shapes_seg"), "segmentation")])
def test_data_without_per_image_classes_refuses_it(train_cfg, overrides, kind):
    from cvlab.engine import build_datamodule

    with pytest.raises(UserError, match=rf"^sampler=repeat_factor needs image_labels, which {kind} data does not "
                                        r"provide; leave sampler=none"):
        build_datamodule(train_cfg(*overrides, "sampler=repeat_factor"))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_detection_run_trains_on_the_repeated_epoch(train_cfg):
    """One epoch of 8 images in batches of 4 is 2 steps; repeated, it is ceil(sum r) // 4 (the last part dropped)."""
    from cvlab.cli import complete_task
    from cvlab.engine import run_train

    cfg = train_cfg(*complete_task(["model=yolov3_tiny", "model.width=0.125", "data=shapes_det", "data.image_size=32",
                                    "data.train_size=8", "data.val_size=2", "data.batch_size=4",
                                    "sampler=repeat_factor", "sampler.threshold=1.0",
                                    "trainer.limit_train_batches=null", "trainer.limit_val_batches=1",
                                    "~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
                                    "trainer.enable_checkpointing=false"]))
    metrics, built = run_train(cfg)
    datamodule = built["datamodule"]
    labels = [datamodule.train_set.annotation(i).labels.tolist() for i in range(8)]
    epoch = math.ceil(float(repeat_factors(labels, 1.0).sum()))
    assert isinstance(datamodule.train_dataloader().sampler, RepeatFactorSampler)
    assert built["trainer"].global_step == epoch // 4 > 2
    assert math.isfinite(metrics["val/map_50"])
