"""No setting is silently ignored: every key of every data option, model config, optimizer and trainer either takes
effect or is refused with one line (exit code 2), and any Lightning Trainer argument is accepted as trainer.KEY.

The data walk sets each key of each data option to a valid different value and compares what gets built (the
DataInfo, the split sizes, what torchvision was asked for, the loaders' settings and first batches) with the
option's baseline; the model walk does the same with the built model (its structure, parameter count and, for
settings that only change values, its weights and buffers)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cvlab.cli import complete_task
from cvlab.data.shapes import SHAPE_CLASSES
from cvlab.engine import build_datamodule
from cvlab.tasks.base import EXECUTION_KEYS, MODEL_META_KEYS, build_model
from cvlab.utils.config import check, compose, option_keys, options
from cvlab.utils.errors import UserError
from detection_files import shape_scenes, write_coco, write_voc, write_yolo
from segmentation_files import coco_scene, write_coco_seg, write_masks_folder, write_voc_seg
from test_fuzz import refusal

# The keys Hydra reads itself; an option fixes them.
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_")


# ------------------------------------------------------------------------------------------------- data on disk
class FakeTorchvision(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR / MNIST classes (no files, no network) and records what it was asked for:
    the walk sees data.root and data.download through it. 20 training and 6 test images, labels 0 / 1."""

    calls: list[tuple] = []
    # What cvlab's CIFAR wrapper reads of the class it wraps.
    meta = {"filename": "batches.meta", "key": "label_names", "md5": None}
    base_folder, train_list, test_list = "fake", [], []
    shape, num_classes = (32, 32, 3), 10

    def __init__(self, root, train=True, download=False, **_):
        type(self).calls.append((type(self).__name__, str(root), train, download))
        count = 20 if train else 6
        self.data = np.random.default_rng(int(train)).integers(0, 256, (count, *self.shape), dtype=np.uint8)
        self.targets = [i % 2 for i in range(count)]
        self.classes = [f"class{i}" for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.data[index].squeeze()), self.targets[index]


def _fake(name: str, shape: tuple, num_classes: int) -> type:
    return type(name, (FakeTorchvision,), {"shape": shape, "num_classes": num_classes})


@pytest.fixture
def fake_torchvision(monkeypatch):
    from torchvision import datasets

    FakeTorchvision.calls = []
    for name, shape, classes in (("CIFAR10", (32, 32, 3), 10), ("CIFAR100", (32, 32, 3), 100),
                                 ("MNIST", (28, 28, 1), 10), ("FashionMNIST", (28, 28, 1), 10)):
        monkeypatch.setattr(datasets, name, _fake(name, shape, classes))


def _write_class_folders(root: Path, classes: int, per_class: int = 6) -> Path:
    rng = np.random.default_rng(classes)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """One small dataset per file source, and a second one for each (the value data.root is changed to)."""
    base = tmp_path_factory.mktemp("data")
    scenes = shape_scenes([(i % 5, (i + 2) % 5) for i in range(6)])
    other = shape_scenes([(i % 5,) for i in range(6)], seed=7)
    made = {"imagefolder": _write_class_folders(base / "folders", 2),
            "imagefolder_other": _write_class_folders(base / "folders_other", 3)}
    # The files ship a train split only: val and test are cut from it (so the fractions act).
    for suffix, chosen in (("", scenes), ("_other", other)):
        write_coco(base / f"coco{suffix}", "train2017", chosen)
        write_voc(base / f"voc{suffix}", "train", chosen)
        # A second split list: without one, VOC falls back to every xml (LabelImg's layout), which train is too.
        (base / f"voc{suffix}" / "ImageSets" / "Main" / "half.txt").write_text("img0\nimg1\nimg2\nimg3\n")
        write_yolo(base / f"yolo{suffix}", "train", chosen)
        made.update({f"{source}{suffix}": base / f"{source}{suffix}" for source in ("coco", "voc", "yolo")})
    made["torchvision"], made["torchvision_other"] = base / "tv", base / "tv_other"
    made.update(_segmentation_roots(base))
    return made


def _segmentation_roots(base: Path) -> dict[str, Path]:
    """A masks folder, a VOC SegmentationClass folder and a COCO json per segmentation source, and a second one each
    (other image counts). VOC and COCO ship a train split only, so val and test are cut and the fractions act."""
    write_masks_folder(base / "masks")
    write_masks_folder(base / "masks_other", count=12)
    for name, kept in (("voc_seg", 6), ("voc_seg_other", 5)):
        write_voc_seg(base / name)
        splits = base / name / "VOC2012" / "ImageSets" / "Segmentation"
        (splits / "val.txt").unlink()
        stems = (splits / "train.txt").read_text().split()[:kept]
        (splits / "train.txt").write_text("".join(f"{stem}\n" for stem in stems))
    annotations, _ = coco_scene(16, 16)
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 9, "name": "cow"}]
    for name, count in (("coco_seg", 6), ("coco_seg_other", 8)):
        images = [{"id": k, "file_name": f"{k}.png", "width": 16, "height": 16} for k in range(count)]
        write_coco_seg(base / name, "annotations/instances_train2017.json", images,
                       [{**a, "image_id": 0} for a in annotations], "train2017", categories)
    return {name: base / name for name in ("masks", "masks_other", "voc_seg", "voc_seg_other", "coco_seg",
                                           "coco_seg_other")}


# The overrides each data option is walked from: small sizes, no workers, files written above.
def _baseline(option: str, roots: dict[str, Path]) -> list[str]:
    small = {"shapes": ["data.train_size=20", "data.val_size=10"],
             "synthetic": ["data.train_size=12", "data.val_size=6", "data.image_size=16", "data.num_classes=3"],
             "shapes_det": ["data.train_size=6", "data.val_size=3"],
             "shapes_seg": ["data.train_size=6", "data.val_size=3"]}
    root = roots.get(option, roots["torchvision"] if option in ("cifar10", "cifar100", "mnist", "fashion_mnist")
                     else None)
    files = [f"data.root={root}"] if root is not None else []
    detection = ["model=yolov3_tiny", "data.image_size=32"] if option in ("coco", "voc", "yolo", "shapes_det") else []
    segmentation = (["model=bisenet", "data.image_size=16"] if option in ("masks", "voc_seg", "coco_seg", "shapes_seg")
                    else [])
    return ["data.num_workers=0", *small.get(option, []), *files, *detection, *segmentation, f"data={option}"]


def _alternative(option: str, key: str, value, roots: dict[str, Path]):
    """A valid value for ``key`` that differs from ``value``."""
    if key == "root":
        return roots["torchvision_other" if option not in roots else f"{option}_other"]
    if key == "class_names":
        return list(reversed(SHAPE_CLASSES))
    shipped = "train2017" if option in ("coco", "coco_seg") else "train"  # the one split the files of roots() ship
    table = {
        "name": lambda: "renamed", "source": lambda: "shapes" if option != "shapes" else "digits",
        "batch_size": lambda: 4 if value != 4 else 8, "num_workers": lambda: 1 if value == 0 else 0,
        "augment": lambda: not value, "download": lambda: not value, "num_classes": lambda: (value or 2) + 1,
        "image_size": lambda: value * 2, "in_chans": lambda: 3 if value == 1 else 1,
        "val_fraction": lambda: 0.3, "test_fraction": lambda: 0.3, "train_size": lambda: value // 2,
        "val_size": lambda: value // 2, "test_size": lambda: 7, "n_objects": lambda: [2, 2], "hflip": lambda: 1.0,
        "scale": lambda: [0.5, 0.6], "translate": lambda: 0.3, "color_jitter": lambda: 0.6, "mosaic": lambda: 1.0,
        "mixup": lambda: 1.0, "close_mosaic": lambda: 1, "train_split": lambda: "half" if option == "voc" else "nosuch",
        "val_split": lambda: shipped, "test_split": lambda: shipped,
        "ann": lambda: "annotations/instances_train2017.json", "max_image_pixels": lambda: 100,
        "seed": lambda: value + 1, "rotate": lambda: 15.0, "noise": lambda: 0.1, "erasing": lambda: 0.5,
        "mixup_alpha": lambda: 0.4, "cutmix_alpha": lambda: 1.0, "sample_pairing": lambda: not value,
        "pairing_start": lambda: 0, "pairing_on": lambda: 3, "pairing_off": lambda: 1, "pairing_stop": lambda: 5,
        "imbalance_ratio": lambda: 10.0 if value is None else value * 2,
        "imbalance_profile": lambda: "step" if value != "step" else "exp",
        "normal_classes": lambda: [0] if value is None else None,
    }
    assert key in table, f"data key {key!r} has no alternative value in this test: add one"
    return table[key]()


def _digest(batch) -> tuple:
    images, targets = batch
    if isinstance(targets, torch.Tensor):
        labels = tuple(targets.tolist())
    else:  # detection: one dict per image
        labels = tuple((tuple(t["labels"].tolist()), round(float(t["boxes"].sum()), 3)) for t in targets)
    return tuple(images.shape), round(float(images.double().sum()), 3), labels


def fingerprint(datamodule) -> tuple:
    """What a run gets from a datamodule: the data contract, the split sizes, what torchvision was asked, the
    training transforms and view, and each loader's settings and first batch (augmentation drawn from a fixed seed)."""
    splits = (datamodule.train_set, datamodule.val_set, datamodule.test_set)
    loaders = []
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        torch.manual_seed(0)
        loaders.append((loader.batch_size, loader.num_workers, _digest(next(iter(loader)))))
    pipeline = getattr(datamodule.train_set, "transforms", None) or getattr(datamodule.train_set, "transform", None)
    view = type(datamodule.training_view()[0]).__name__  # a wrapper whose schedule starts later (SamplePairing)
    return (datamodule.info.as_dict(), tuple(len(split) for split in splits), tuple(FakeTorchvision.calls),
            repr(pipeline), view, tuple(loaders))


def _outcome(capsys, overrides: list[str]) -> tuple[str, object]:
    """``("refused", line)`` when the check refuses the settings, ``("unreadable", line)`` when the data they
    point at cannot be read (one line either way, as the run prints it), else ``("built", fingerprint)``."""
    line = refusal(capsys, "train", overrides)
    if line is not None:
        return "refused", line
    FakeTorchvision.calls = []
    try:
        datamodule = build_datamodule(check("train", complete_task(overrides)).cfg)
        return "built", fingerprint(datamodule)
    except UserError as error:  # read when the data is read: the run prints it as its one line
        assert "\n" not in str(error)
        return "unreadable", f"error: {error}"


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("option", options("data"))
def test_every_data_key_takes_effect_or_is_refused(option, roots, fake_torchvision, capsys):
    baseline = _baseline(option, roots)
    kind, reference = _outcome(capsys, baseline)
    assert kind == "built", reference
    assert _outcome(capsys, baseline) == ("built", reference)  # the fingerprint itself is deterministic
    data = compose("train", [f"data={option}"]).data
    keys = sorted(key for key in data if key not in HYDRA_KEYS)
    assert set(keys) == option_keys("data", option) - set(HYDRA_KEYS)  # the yaml and its bases, every key
    baseline_cfg = check("train", complete_task(baseline)).cfg.data
    for key in keys:
        value = OmegaConf.to_container(baseline_cfg, resolve=True)[key]
        new = _alternative(option, key, value, roots)
        kind, result = _outcome(capsys, [*baseline, f"data.{key}={_plain(new)}"])
        if kind == "refused":  # the line names the setting
            assert key in result, (option, key, result)
        elif kind == "built":  # (an unreadable outcome is an effect too: the baseline reads)
            assert result != reference, f"data={option}: data.{key}={new} changed nothing"


# The reproductions of issue 10, each refused now (before: accepted, and ignored or crashing later).
@pytest.mark.parametrize(("overrides", "expected"), [
    (["model=resnet18", "data.num_classes=1000"], "digits: data.num_classes=1000 but the data has 10 classes"),
    (["data=shapes", "data.num_classes=3"], "shapes: data.num_classes=3 but the data has 5 classes"),
    (["data=shapes", "data.val_fraction=0.3"], "data.val_fraction does not apply to data=shapes"),
    (["data=synthetic", "data.val_fraction=0.3"], "data.val_fraction does not apply to data=synthetic"),
    (["data.root=/tmp"], "data.root does not apply to data=digits (it is embedded"),
    (["data.download=true"], "data.download does not apply to data=digits (it is embedded"),
    (["data=cifar10", "data.test_fraction=0.2"], "data.test_fraction does not apply to data=cifar10 (its official"),
    (["data=shapes_det", "data.root=/tmp"], "data.root does not apply to data=shapes_det"),
    (["data=shapes_det", "data.augment=false", "data.hflip=0.1"], "data.hflip acts only with data.augment=true"),
    (["model=yolov3_tiny", "data.close_mosaic=3"], "data.close_mosaic=3 acts only with mosaic or mixup"),
    (["data.in_chans=3"], "data.in_chans=3 but digits images have 1 channel"),
    (["data.sample_pairing=true"], "data.sample_pairing=true never pairs here: it starts at epoch data.pairing_start"),
    (["data.name=mine"], "data.name names the option itself; choose another one with data=NAME"),
    (["model.name=resnet50"], "model.name names the option itself; choose another one with model=NAME"),
    (["optimizer._target_=builtins.exec"], "optimizer._target_ is fixed by the optimizer option"),
])
def test_settings_that_were_ignored_are_refused(capsys, overrides, expected):
    line = refusal(capsys, "train", overrides)
    assert line is not None and expected in line, line


def test_imagefolder_counts_its_classes_and_refuses_another_number(roots, capsys):
    overrides = ["data=imagefolder", f"data.root={roots['imagefolder']}", "data.num_workers=0"]
    assert build_datamodule(check("train", overrides).cfg).info.num_classes == 2
    kind, line = _outcome(capsys, [*overrides, "data.num_classes=1000"])
    assert kind == "unreadable" and "data.num_classes=1000 but the data has 2 classes" in line


# ------------------------------------------------------------------------------------------------- models
def _model_alternative(model: str, key: str, value):
    if key == "anchors":  # each YOLO's own count of anchors, in pixels
        count = {"yolov2": 5, "yolov2_tiny": 5, "yolov3": 9, "yolov3_tiny": 6, "yolov4": 9, "yolov4_tiny": 6,
                 **dict.fromkeys(["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"], 9),
                 "yolov7": 9, "yolov7_tiny": 9}[model]
        return [[8.0 * (i + 1), 6.0 * (i + 1)] for i in range(count)]
    table = {"stem": "standard" if value != "standard" else "small", "output_stride": 16, "head": "gdc",
             "drop_rate": 0.35, "zero_init_residual": True, "width_mult": 0.5, "patch_size": 4, "attn_drop_rate": 0.1,
             "width": 0.5, "depth": 0.5, "conf_thresh": 0.01, "iou_thresh": 0.5, "max_det": 50,
             "backbone": {"resnet18": "resnet34",
                          "mobilenetv3_large": "mobilenetv3_small"}.get(str(value), "resnet18"),
             "bn_momentum": 0.05 if value != 0.05 else 0.2, "padding": "valid" if value != "valid" else "same",
             "aux_heads": not value, "aux_head": not value, "aux_weights": [0.5, 2.0], "aux_weight": 0.2,
             "implicit": not value, "rep_conv": not value, "rep": not value, "bic": not value,
             "xy_scales": [1.3] * (2 if model.endswith("tiny") else 3), "dropblock": 0.1, "dropblock_size": 5,
             # the R-CNN family's
             "level": -3, "levels": [-2, -1], "roi": "align" if value == "pool" else "pool", "roi_output_size": 5,
             "representation_size": 64, "batch_size_per_image": 32, "positive_fraction": 0.5, "score_thresh": 0.1,
             "nms_thresh": 0.45, "fpn": not value, "fpn_channels": 16, "extra_pool": not value,
             "anchor_sizes": [[8, 10, 12], [24, 30, 36], [48, 60, 72]], "aspect_ratios": [1.0, 2.0],
             "anchor_offset": 0.0, "rpn_pre_nms_top_n": [500, 300], "rpn_post_nms_top_n": [500, 300],
             "rpn_nms_thresh": 0.6, "sampling_ratio": 2, "box_batch_size_per_image": 128,
             "box_positive_fraction": 0.5, "box_score_thresh": 0.1, "box_nms_thresh": 0.6, "box_detections_per_img": 50,
                 "ohem_rois": 16, "ohem_nms": 0.5, "box_ohem_rois": 16, "box_ohem_nms": 0.5,
             "focal_gamma": 2.0, "focal_alpha": 0.5, "rpn_focal_gamma": 2.0, "rpn_focal_alpha": 0.5,
             "box_focal_gamma": 2.0, "box_focal_alpha": 0.5,
             # the GANs' (progan, stylegan, stylegan2)
             "conditional": not value, "latent_dim": 64, "w_dim": 64, "fmap_base": 256, "fmap_max": 64,
             "progressive": not value, "kimg_per_phase": 3.0, "pixel_norm": not value, "equalized_lr": not value,
             "mbstd_group": 0, "gp_weight": 0.0, "gp_target": 2.0, "drift_weight": 0.0, "lr": 0.003,
             "betas": [0.5, 0.9], "mapping_layers": 4, "mapping_lr_mul": 0.1, "w_avg_beta": 0.9, "style_mixing": 0.0,
             "use_noise": not value, "instance_norm": not value, "const_input": not value, "blur": not value,
             "r1_gamma": 1.0, "r1_interval": 4, "demodulate": not value, "g_architecture": "orig",
             "d_architecture": "orig", "pl_weight": 0.0, "pl_decay": 0.02, "pl_interval": 8, "pl_batch_shrink": 1,
             "backbone_args": {"stem": "small" if isinstance(value, dict) and value.get("stem") == "standard"
                               else "standard"},
             "warp_size": 48, "context": 8,
             "proposals": {"method": "selective_search", "mode": "quality", "max_proposals": 500},
             # the anomaly detectors' (autoencoder, isolation_forest, one_class_svm)
             "widths": [16, 32], "n_estimators": 50, "max_samples": 64, "max_features": 0.5,
             "kernel": "linear", "nu": 0.1, "gamma": 0.01}
    assert key in table, f"model key {key!r} has no alternative value in this test: add one"
    assert table[key] != value, (model, key)
    return table[key]


# Settings that change values only (an initialisation, anchors): compared on real weights, not on the structure.
VALUE_SETTINGS = ("zero_init_residual", "anchors")


def _as_data(value):
    """A module attribute that is plain data (numbers, text, and lists / dicts of them: anchor sizes, proposal
    settings) as a comparable value; None for anything else (tensors, layers, functions)."""
    if isinstance(value, (int, float, str, bool, tuple)):
        return value
    if isinstance(value, (list, dict)):
        try:
            return json.dumps(value, sort_keys=True)
        except TypeError:  # holds tensors or objects
            return None
    return None


def _build(model_cfg: dict, values: bool) -> tuple:
    """(structure, attributes, parameter count, buffer shapes[, weights and buffers]) of the model the task would
    build."""
    data = {"num_classes": 5, "image_size": 64} if model_cfg.get("task") != "anomaly" else {"image_size": 64}
    if model_cfg.get("task") == "classification":
        data["in_chans"] = 3
    layers = ({"name": "default"}, {"name": "default"}, {"name": "none"}, {"name": "default"})
    torch.manual_seed(0)
    with torch.device("cpu" if values else "meta"):
        net = build_model(model_cfg, *layers, **data)
    # Settings kept as plain attributes (an attention's dropout probability) show in no repr.
    attributes = tuple((name, key, _as_data(value)) for name, module in net.named_modules()
                       for key, value in vars(module).items()
                       if not key.startswith("_") and _as_data(value) is not None)
    found = (repr(net), attributes, sum(p.numel() for p in net.parameters()),
             tuple(tuple(b.shape) for b in net.buffers()))
    if values:
        found += (tuple(round(float(t.detach().double().sum()), 4) for t in [*net.parameters(), *net.buffers()]),)
    return found


# The smallest model of each family; the others share their family's keys (checked below) and walk in the slow run.
FAMILY_REPRESENTATIVES = ("darknet19", "mobilenetv3_small", "resnet18", "vit_tiny", "yolov1_tiny", "yolov2_tiny",
                          "yolov3_tiny", "yolov4_tiny", "yolov4", "yolov5n", "yolov6n", "yolov7_tiny", "unet",
                          "bisenet", "danet", "progan", "stylegan", "stylegan2", "rcnn", "fast_rcnn", "faster_rcnn",
                          "autoencoder", "isolation_forest", "one_class_svm")


def _model_keys(model: str) -> set[str]:
    return option_keys("model", model) - set(MODEL_META_KEYS)


def test_every_model_shares_the_keys_of_a_walked_family_member():
    walked = [_model_keys(model) for model in FAMILY_REPRESENTATIVES]
    assert all(_model_keys(model) in walked for model in options("model"))


@pytest.mark.parametrize("model", [m if m in FAMILY_REPRESENTATIVES else pytest.param(m, marks=pytest.mark.slow)
                                   for m in options("model")])
def test_every_model_key_is_a_constructor_argument_and_takes_effect(model):
    from cvlab.models import create_model

    cfg = OmegaConf.to_container(compose("train", [f"model={model}"]).model, resolve=True)
    keys = sorted(key for key in cfg if key not in MODEL_META_KEYS)
    # Nothing swallows an unknown argument: a misspelt setting cannot pass silently.
    with pytest.raises(TypeError):
        create_model(model, surely_not_a_setting=1)
    reference = {values: _build(cfg, values) for values in {False, *(key in VALUE_SETTINGS for key in keys)}}
    for key in keys:
        changed = {**cfg, key: _model_alternative(model, key, cfg[key])}
        values = key in VALUE_SETTINGS
        try:
            built = _build(changed, values)
        except UserError:  # refused in one line (extra_pool=true with three levels of anchor sizes): it was read
            continue
        assert built != reference[values], f"model={model}: model.{key} changed nothing"


# ------------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("option", options("optimizer"))
def test_every_optimizer_key_is_an_argument_and_reaches_the_optimizer(option):
    from hydra.utils import get_object, instantiate

    cfg = compose("train", [f"optimizer={option}"]).optimizer
    parameters = inspect.signature(get_object(cfg._target_)).parameters
    for key in (k for k in cfg if k not in HYDRA_KEYS):
        assert key in parameters, f"optimizer={option}: {key} is not an argument of {cfg._target_}"
        value = cfg[key]
        new = [0.5, 0.9] if key == "betas" else (not value) if isinstance(value, bool) else value * 0.5 or 0.01
        changed = OmegaConf.merge(cfg, {key: new})
        group = instantiate(changed)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
        assert group[key] == (tuple(new) if key == "betas" else new), (option, key)


def test_an_optimizer_argument_the_yaml_omits_is_accepted(capsys):
    cfg = check("train", ["optimizer.amsgrad=true", "optimizer.eps=1e-6"]).cfg
    assert (cfg.optimizer.amsgrad, cfg.optimizer.eps) == (True, 1e-6)
    line = refusal(capsys, "train", ["optimizer.amsgrd=true"])
    assert "unknown key 'optimizer.amsgrd': torch.optim.AdamW takes no argument" in line
    assert "Did you mean optimizer.amsgrad" in line


# ------------------------------------------------------------------------------------------------- trainer
def _trainer_arguments() -> dict[str, inspect.Parameter]:
    import pytorch_lightning as pl

    return dict(inspect.signature(pl.Trainer.__init__).parameters)


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_key_is_a_lightning_trainer_argument(option):
    cfg = compose("train", [f"trainer={option}"]).trainer
    assert cfg._target_ == "pytorch_lightning.Trainer"
    assert not set(cfg) - set(HYDRA_KEYS) - set(EXECUTION_KEYS) - set(_trainer_arguments())


def test_every_trainer_key_reaches_the_trainer(monkeypatch, tmp_path):
    """Each key of trainer/default.yaml, changed, arrives at Trainer.__init__ with its new value."""
    import pytorch_lightning as pl

    from cvlab.engine import build_trainer

    changes = {"accelerator": "cpu", "devices": 2, "max_epochs": 3, "precision": "bf16-mixed",
               "gradient_clip_val": 0.5, "log_every_n_steps": 7, "num_sanity_val_steps": 0,
               "limit_train_batches": 0.5, "limit_val_batches": 3, "limit_test_batches": 0.25, "deterministic": True,
               "enable_checkpointing": False, "enable_progress_bar": False, "benchmark": True}
    defaults = compose("train", []).trainer
    assert set(changes) == set(defaults) - set(HYDRA_KEYS) - set(EXECUTION_KEYS), \
        "a trainer/default.yaml key this test does not change"
    overrides = [f"trainer.{key}={_plain(value)}" for key, value in changes.items()]
    monkeypatch.setattr("cvlab.utils.validate.cuda_devices", lambda: 2)  # trainer.devices=2 is checked here
    cfg = check("train", [*overrides, "logger=none", f"paths.output_dir={tmp_path}"]).cfg
    received = {}
    monkeypatch.setattr(pl.Trainer, "__init__", lambda self, **kwargs: received.update(kwargs))
    build_trainer(cfg)
    assert {key: received[key] for key in changes} == changes
    assert not set(EXECUTION_KEYS) & set(received)  # cvlab's own keys (compile, channels_last) go to the task


def _timer_seconds(trainer) -> float:
    return next(c for c in trainer.callbacks if type(c).__name__ == "Timer")._duration


@pytest.mark.parametrize(("override", "read", "expected"), [
    ("trainer.max_steps=2", lambda trainer: trainer.max_steps, 2),
    ("trainer.limit_train_batches=0.1", lambda trainer: trainer.limit_train_batches, 0.1),
    ("trainer.gradient_clip_val=1", lambda trainer: trainer.gradient_clip_val, 1),
    ("trainer.accumulate_grad_batches=4", lambda trainer: trainer.accumulate_grad_batches, 4),
    ("trainer.max_time=00:00:01:00", _timer_seconds, 60.0),
    ("trainer.detect_anomaly=true", lambda trainer: trainer._detect_anomaly, True),
], ids=lambda value: value if isinstance(value, str) else "")
def test_any_trainer_argument_is_accepted_as_trainer_key(tmp_path, override, read, expected):
    from cvlab.engine import build_trainer

    checked = check("train", [override, "logger=none", f"paths.output_dir={tmp_path}"])
    assert f"++{override}" in checked.overrides or override in checked.overrides
    assert read(build_trainer(checked.cfg)) == expected


def test_max_steps_stops_training_at_that_step(tmp_path):
    from conftest import FAST
    from cvlab.engine import run_train

    cfg = check("train", [*FAST, "trainer.max_steps=1", "~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
                          "trainer.enable_checkpointing=false", f"paths.output_dir={tmp_path}"]).cfg
    _, built = run_train(cfg)
    assert built["trainer"].global_step == 1  # trainer=debug alone runs 2 steps


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.max_stepz=2", "unknown key 'trainer.max_stepz': pytorch_lightning.Trainer takes no argument "
                            "'max_stepz'. Did you mean trainer.max_steps"),
    ("trainer.logger=false", "trainer.logger is not set here: loggers are chosen with logger=NAME"),
    ("trainer.callbacks=[]", "trainer.callbacks is not set here"),
    ("trainer.default_root_dir=/tmp", "trainer.default_root_dir is not set here: it is the run directory"),
    ("+trainer.nonsense=1", "pytorch_lightning.Trainer takes no argument 'nonsense'"),
    ("trainer.max_steps=abc", "trainer.max_steps expects an integer, got 'abc'"),
    ("trainer.precision=17", "trainer.precision expects 64, 32, 16"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches must be a number in [0, 1]"),
    ("trainer.devices=-1", "trainer.devices=-1 on the CPU is a count of processes >= 1"),
])
def test_trainer_keys_are_checked_against_lightning(capsys, monkeypatch, override, expected):
    monkeypatch.setattr("cvlab.utils.validate.cuda_devices", lambda: 0)
    monkeypatch.setattr("cvlab.utils.validate._mps_available", lambda: False)
    line = refusal(capsys, "train", [override])
    assert line is not None and expected in line, line


def test_a_trainer_sweep_reaches_hydra_with_every_choice():
    checked = check("train", ["trainer.max_steps=1,2", "trainer.max_epochs=1,2"])
    assert checked.overrides == ["++trainer.max_steps=1,2", "trainer.max_epochs=1,2"]
    assert (checked.cfg.trainer.max_steps, checked.cfg.trainer.max_epochs) == (1, 1)
