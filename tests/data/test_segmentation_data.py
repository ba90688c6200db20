"""Segmentation data: the shape scenes, a masks folder (palette, greyscale and 0/255 binary PNGs, split folders), VOC's
SegmentationClass layout and COCO polygons / RLE / crowd rendered to class maps, each written here in its real format;
the problems reported by file in one error; the v2 augmentation keeping masks on their pixels; the DataInfo
contract (pixel counts, ignore index, palette) and the evaluation transform for predict."""
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cvlab.data.base import IGNORE_INDEX, SegmentationDataset
from cvlab.data.segmentation import (
    VOC_CLASSES,
    SegmentationDataModule,
    coco_class_map,
    read_mask,
    segmentation_eval_transform,
    segmentation_transforms,
    voc_palette,
)
from cvlab.data.shapes import SHAPE_MASK_CLASSES, ShapesSegmentation, _split_rng, draw_scene
from cvlab.utils.errors import UserError
from segmentation_files import (
    MASK_CLASSES,
    PNG_PALETTE,
    class_map,
    coco_scene,
    colour_image,
    rectangle,
    save_palette_png,
    write_coco_seg,
    write_masks_folder,
    write_voc_seg,
)

SIDE = 16  # every file dataset here: 16 x 16 images, read at image_size 16, so evaluation resizes nothing


def _module(source: str, root=None, **settings) -> SegmentationDataModule:
    settings = {"image_size": SIDE, "batch_size": 4, **settings}
    datamodule = SegmentationDataModule(source, root=None if root is None else str(root), **settings)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def masks_folder(tmp_path_factory):
    """10 images/ + masks/ pairs (palette PNGs), a classes.txt; no split folders."""
    root = tmp_path_factory.mktemp("data") / "masks"
    return root, write_masks_folder(root)


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _expected_counts(maps: dict[str, np.ndarray], names: list[str], num_classes: int) -> list[int]:
    values = np.concatenate([maps[_stem(name)].ravel() for name in names])
    return np.bincount(values[values != IGNORE_INDEX], minlength=num_classes).tolist()


# --------------------------------------------------------------------------------------------------- shapes_seg
def test_shapes_seg_are_the_scenes_class_maps_with_pixel_counts():
    dataset = ShapesSegmentation("val", n=6, size=48, seed=3)
    scene = draw_scene(_split_rng(3, "val", 4), 48, n_objects=(1, 4), min_size=12, max_size=24)
    image, mask = dataset.load(4)
    assert torch.equal(image, torch.from_numpy(np.array(scene.image)).permute(2, 0, 1))
    assert torch.equal(mask, torch.from_numpy(scene.mask))
    assert dataset.class_names == SHAPE_MASK_CLASSES == ("background", "circle", "square", "triangle", "diamond",
                                                         "cross")
    # Overlaps: a scene's mask holds the visible part of each object, so its classes are those of the scene.
    assert set(np.unique(scene.mask).tolist()) <= {0, *(scene.labels + 1).tolist()}

    datamodule = _module("shapes_seg", image_size=32, train_size=12, val_size=5, seed=1)
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (12, 5, 5)
    info = datamodule.info
    counts = torch.bincount(datamodule.train_set.masks.flatten().long(), minlength=6).tolist()
    assert (info.num_classes, info.class_names, info.in_chans, info.image_size) == (6, SHAPE_MASK_CLASSES, 3, 32)
    assert info.class_counts == tuple(counts) and sum(counts) == 12 * 32 * 32
    assert info.ignore_index == 255 and info.palette == voc_palette(6)
    assert datamodule.split_files() == {}
    images, masks = next(iter(datamodule.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    assert torch.equal(masks, datamodule.val_set.masks[:4].long())  # evaluation changes nothing at the drawn size
    assert not torch.equal(datamodule.test_set.masks, datamodule.val_set.masks)  # splits are drawn apart


def test_shapes_seg_n_objects_and_sizes_take_effect():
    one = _module("shapes_seg", train_size=10, val_size=2, test_size=3, n_objects=[1, 1], image_size=32)
    many = _module("shapes_seg", train_size=10, val_size=2, test_size=3, n_objects=[3, 3], image_size=32)
    assert (len(one.train_set), len(one.val_set), len(one.test_set)) == (10, 2, 3)
    classes_per_scene = [len(torch.unique(mask)) for mask in one.train_set.masks]
    assert max(classes_per_scene) == 2  # background + the one shape
    assert max(len(torch.unique(mask)) for mask in many.train_set.masks) > 2


# --------------------------------------------------------------------------------------------------- transforms
class _ColourCoded(SegmentationDataset):
    """One 32 x 24 image whose pixels have their class's colour; ``ignore``: a corner ignored."""

    def __init__(self, transforms, ignore: bool = True):
        super().__init__(["a", "b", "c", "d"], transforms)
        values = np.zeros((24, 32), dtype=np.uint8)
        values[3:15, 4:20] = 1
        values[10:22, 14:30] = 2
        values[0:6, 24:32] = 3
        if ignore:
            values[20:24, 0:6] = IGNORE_INDEX
        self.values = values

    def __len__(self) -> int:
        return 1

    def load(self, index):
        return F.pil_to_tensor(colour_image(self.values)), torch.from_numpy(self.values)


def _aligned(image: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """How well the mask matches the classes the image shows (each pixel's nearest class colour): the share of
    agreeing inner pixels (two pixels or more from another class or an ignored pixel, where no interpolation blurs
    the colours; the border's pixels have unseen neighbours, so they are not inner), and how many inner pixels
    there are."""
    colours = torch.tensor(PNG_PALETTE, dtype=torch.float32)
    shown = ((image * 255).permute(1, 2, 0)[..., None, :] - colours).abs().sum(-1).argmin(-1)
    padded = torch.nn.functional.pad(mask.float(), (2, 2, 2, 2), value=-1)
    windows = padded.unfold(0, 5, 1).unfold(1, 5, 1).reshape(*mask.shape, 25)
    inner = (windows == mask[..., None]).all(-1) & (mask != IGNORE_INDEX)
    return float((shown[inner] == mask[inner]).float().mean()), int(inner.sum())


def test_augmented_masks_stay_on_their_pixels():
    torch.manual_seed(0)
    dataset = _ColourCoded(segmentation_transforms(24, train=True, hflip=0.5, scale=(0.5, 2.0), color_jitter=0.0))
    drawn, inner_pixels = set(), 0
    for _ in range(24):
        image, mask = dataset[0]
        assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}  # nearest: no value between two classes
        agreement, inner = _aligned(image, mask)
        assert agreement == 1.0
        inner_pixels += inner
        drawn.add(mask.numpy().tobytes())
    assert len(drawn) == 24  # every draw another flip, zoom and crop
    assert inner_pixels > 24 * 100  # of 24 x 576: the check saw most of the objects


def test_masks_are_resized_at_the_pixel_centres():
    """Shrinking by 3 keeps each block's centre pixel (v2's legacy nearest would keep its top-left one)."""
    values = torch.arange(36 * 36, dtype=torch.int32).reshape(36, 36) % 251
    image = tv_tensors.Image(torch.zeros(3, 36, 36, dtype=torch.uint8))
    _, mask = segmentation_transforms(12, train=False)(image, tv_tensors.Mask(values.to(torch.uint8)))
    assert torch.equal(mask, values[1::3, 1::3].to(torch.uint8))
    torch.manual_seed(0)
    _, mask = segmentation_transforms(12, train=True, hflip=0, scale=(1 / 3, 1 / 3), color_jitter=0)(
        tv_tensors.Image(torch.zeros(3, 12, 12, dtype=torch.uint8)), tv_tensors.Mask(values[:12, :12].to(torch.uint8)))
    kept = mask[mask != IGNORE_INDEX].reshape(4, 4)  # 12 -> 4 pixels, padded back to 12
    assert torch.equal(kept, values[1:12:3, 1:12:3].to(torch.uint8))


def test_hflip_flips_image_and_mask_together():
    evaluation = _ColourCoded(segmentation_transforms(24, train=False))[0]
    flip = _ColourCoded(segmentation_transforms(24, train=True, hflip=1.0, scale=(1, 1), color_jitter=0))[0]
    keep = _ColourCoded(segmentation_transforms(24, train=True, hflip=0.0, scale=(1, 1), color_jitter=0))[0]
    assert torch.equal(flip[0], evaluation[0].flip(-1)) and torch.equal(flip[1], evaluation[1].flip(-1))
    assert torch.equal(keep[0], evaluation[0]) and torch.equal(keep[1], evaluation[1])


def test_scale_jitter_pads_with_ignore_and_crops_when_larger():
    torch.manual_seed(1)
    small = _ColourCoded(segmentation_transforms(24, train=True, hflip=0, scale=(0.5, 0.5), color_jitter=0),
                         ignore=False)
    image, mask = small[0]
    # Resized to 12 x 12, padded back to 24 x 24: the padding is ignored in the mask and black in the image.
    padding = mask.eq(IGNORE_INDEX)
    assert int(padding.sum()) == 24 * 24 - 12 * 12 and float(image[:, padding].abs().sum()) == 0
    rows, columns = (~padding).nonzero().unbind(1)
    assert (int(rows.max() - rows.min()), int(columns.max() - columns.min())) == (11, 11)
    large = _ColourCoded(segmentation_transforms(24, train=True, hflip=0, scale=(2, 2), color_jitter=0))
    centres = F.InterpolationMode.NEAREST_EXACT
    evaluation = F.resize(torch.from_numpy(large.values)[None], [24, 24], interpolation=centres)
    doubled = F.resize(evaluation, [48, 48], interpolation=centres)[0]
    _, mask = large[0]
    offsets = [(top, left) for top in range(25) for left in range(25)
               if torch.equal(doubled[top:top + 24, left:left + 24], mask)]
    assert offsets  # a 24 x 24 window of the mask at twice the size


def test_color_jitter_changes_images_only():
    torch.manual_seed(2)
    evaluation = _ColourCoded(segmentation_transforms(24, train=False))[0]
    jittered = _ColourCoded(segmentation_transforms(24, train=True, hflip=0, scale=(1, 1), color_jitter=0.8))[0]
    assert torch.equal(jittered[1], evaluation[1])
    assert (jittered[0] - evaluation[0]).abs().max() > 0.05


def test_eval_transform_is_the_evaluation_pipeline_of_one_image(masks_folder):
    root, _ = masks_folder
    datamodule = _module("masks", root, image_size=10)
    transform = segmentation_eval_transform(10)
    path = root / datamodule.split_files()["val"][0]
    image, _ = datamodule.val_set[0]
    pixels = F.pil_to_tensor(Image.open(path).convert("RGB"))
    out = transform(pixels)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 10, 10)
    assert torch.equal(out, image)
    assert torch.equal(transform(Image.open(path).convert("RGB")), image)  # a PIL image too


# --------------------------------------------------------------------------------------------------- masks folder
def test_masks_folder_reads_palette_pngs_and_cuts_splits(masks_folder, caplog):
    root, maps = masks_folder
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = _module("masks", root, val_fraction=0.2, test_fraction=0.3, seed=5)
    files = datamodule.split_files()
    assert [len(files[split]) for split in ("train", "val", "test")] == [5, 2, 3]
    assert sorted(sum(files.values(), [])) == sorted(f"images/img{k}.png" for k in range(10))
    assert "images/ and masks/ without split folders, no splits: cut val (20 %) and test (30 %) from the 10 images, " \
           "seed 5" in caplog.text
    info = datamodule.info
    assert info.class_names == MASK_CLASSES and info.num_classes == 4
    assert info.palette == tuple(PNG_PALETTE)  # the PNGs' own palette
    assert info.class_counts == tuple(_expected_counts(maps, files["train"], 4)) and info.ignore_index == 255
    for position, name in enumerate(files["test"]):
        image, mask = datamodule.test_set[position]
        assert torch.equal(mask, torch.from_numpy(maps[_stem(name)]).long())
        assert torch.equal((image * 255).round().byte(), F.pil_to_tensor(colour_image(maps[_stem(name)])))
    other = _module("masks", root, val_fraction=0.2, test_fraction=0.3, seed=6)
    assert other.split_files() != files


def test_masks_folder_class_names_and_num_classes(tmp_path, masks_folder, caplog):
    root, _ = masks_folder
    with pytest.raises(UserError, match=r"data.class_names=\['x', 'y'\] but .*classes.txt lists"):
        _module("masks", root, class_names=["x", "y"])
    with pytest.raises(UserError, match="data.num_classes=5 but the data has 4 classes"):
        _module("masks", root, num_classes=5)
    # Greyscale masks, no classes.txt: the number of classes is the largest value + 1 unless given.
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in range(4):
        Image.fromarray(np.full((SIDE, SIDE, 3), 40 * k, dtype=np.uint8)).save(tmp_path / "images" / f"{k}.jpg")
        Image.fromarray(class_map(k), mode="L").save(tmp_path / "masks" / f"{k}.png")
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        inferred = _module("masks", tmp_path, val_fraction=0.25, test_fraction=0.25)
    assert inferred.info.num_classes == 4 and inferred.info.class_names == ("class_0", "class_1", "class_2",
                                                                            "class_3")
    assert "4 classes, from the largest class value in the masks (3)" in caplog.text
    assert inferred.info.palette == voc_palette(4)  # greyscale masks carry no palette
    assert _module("masks", tmp_path, num_classes=6, val_fraction=0.25, test_fraction=0.25).info.num_classes == 6
    named = _module("masks", tmp_path, class_names=["bg", "a", "b", "c", "d"], val_fraction=0.25, test_fraction=0.25)
    assert named.info.class_names == ("bg", "a", "b", "c", "d")
    with pytest.raises(UserError, match=r"2 mask\(s\) with class values out of range.*class value\(s\) 3 but the "
                                        r"data has 3 classes"):
        _module("masks", tmp_path, num_classes=3, val_fraction=0.25, test_fraction=0.25)


def test_binary_masks_stored_as_0_255_are_read_as_0_1(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in range(5):
        values = np.zeros((SIDE, SIDE), dtype=np.uint8)
        values[k: k + 6, 2:12] = 255
        Image.fromarray(np.full((SIDE, SIDE, 3), 100, dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        Image.fromarray(values, mode="L").save(tmp_path / "masks" / f"{k}.png")
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = _module("masks", tmp_path, val_fraction=0.2, test_fraction=0.2, augment=False)
    assert "every mask holds only 0 and 255: a binary mask saved to be seen, read as 0 (background) and 1" \
           in caplog.text
    assert datamodule.binary and datamodule.info.num_classes == 2
    assert datamodule.info.class_counts == (3 * (SIDE * SIDE - 60), 3 * 60)  # 10 x 6 foreground pixels a mask
    for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        _, mask = dataset[0]
        assert mask.unique().tolist() == [0, 1] and int(mask.sum()) == 60


def test_masks_split_folders_and_their_names(tmp_path):
    for split, count in (("training", 6), ("validation", 2), ("testing", 3)):
        for folder in ("images", "masks"):
            (tmp_path / folder / split).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8)).save(tmp_path / "images" / split / f"{k}.png")
            save_palette_png(class_map(k), tmp_path / "masks" / split / f"{k}.png")
    # No images/train/: one pool of all the pairs below images/.
    assert sum(map(len, _module("masks", tmp_path, val_fraction=0.2, test_fraction=0.2).split_files().values())) == 11
    shipped = _module("masks", tmp_path, train_split="training", val_split="validation", test_split="testing")
    assert [len(names) for names in shipped.split_files().values()] == [6, 2, 3]
    with pytest.raises(UserError, match=r"data.val_split=valid: no images/valid/ in .* \(its folders: testing, "
                                        r"training, validation\)"):
        _module("masks", tmp_path, train_split="training", val_split="valid")
    datamodule = _module("masks", tmp_path, train_split="training", val_split="validation", test_fraction=0.2)
    files = datamodule.split_files()
    assert [len(files[split]) for split in ("train", "val", "test")] == [4, 2, 2]  # test: ceil(0.2 x 6) of training
    assert files["val"] == ["images/validation/0.png", "images/validation/1.png"]
    assert all(name.startswith("images/training/") for name in files["train"] + files["test"])


def test_bad_masks_are_reported_by_file_in_one_error(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    picture = Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8))
    for stem in ("good", "small", "value", "nomask", "jpeg", "colour"):
        picture.save(images / f"{stem}.png")
    save_palette_png(np.ones((SIDE, SIDE)), masks / "good.png")
    save_palette_png(np.ones((12, SIDE)), masks / "small.png")                      # 16 x 12, not 16 x 16
    values = np.ones((SIDE, SIDE), dtype=np.uint8)
    values[0, 0], values[1, 1] = 7, IGNORE_INDEX                                # 7 >= 2 classes; 255 is fine
    save_palette_png(values, masks / "value.png")
    Image.fromarray(np.ones((SIDE, SIDE), dtype=np.uint8)).save(masks / "jpeg.jpg")
    colours = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    colours[..., 0] = 200
    Image.fromarray(colours).save(masks / "colour.png")                         # one RGB colour per class
    save_palette_png(np.ones((SIDE, SIDE)), masks / "orphan.png")
    with pytest.raises(UserError) as error:
        _module("masks", tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"masks: 6 problem(s) with the files in {tmp_path}: ")
    for expected in ("1 image(s) without a mask: images/nomask.png",
                     "1 mask(s) without an image: masks/orphan.png",
                     "1 mask(s) whose size differs from the image's: masks/small.png (mask 16x12, image 16x16)",
                     "1 mask(s) with class values out of range: masks/value.png (class value(s) 7 but the data has 2 "
                     "classes",
                     "1 JPEG mask(s) (lossy compression blurs the class values at the edges: save masks as PNG): "
                     "masks/jpeg.jpg",
                     "1 image(s) or mask(s) that cannot be read: images/colour.png (mask"):
        assert expected in message, expected
    assert "is a colour image (mode RGB)" in message


def test_masks_of_background_only_or_16_bit_values_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in range(4):
        Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        Image.fromarray(np.zeros((SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "masks" / f"{k}.png")
    with pytest.raises(UserError, match="every mask in .* is 0 \\(background\\): nothing to segment"):
        _module("masks", tmp_path, val_fraction=0.25, test_fraction=0.25)
    Image.fromarray(np.full((SIDE, SIDE), 300, dtype=np.uint16)).save(tmp_path / "masks" / "3.png")
    with pytest.raises(UserError, match=r"1 mask\(s\) with class values out of range: masks/3.png \(values "
                                        r"300..300: class indices are 0..254, 255 ignored\)"):
        _module("masks", tmp_path, val_fraction=0.25, test_fraction=0.25)


def test_max_image_pixels_refuses_larger_files(masks_folder):
    root, _ = masks_folder
    with pytest.raises(UserError, match=r"10 image\(s\) or mask\(s\) that cannot be read: images/img0.png \(image "
                                        r"has 16x16 = 256 pixels, more than the 100 allowed"):
        _module("masks", root, max_image_pixels=100)
    assert len(_module("masks", root, max_image_pixels=256).train_set) == 6


def test_read_mask_modes(tmp_path):
    values = np.array([[0, 1, 2], [255, 3, 0]], dtype=np.uint8)
    save_palette_png(values, tmp_path / "p.png")
    Image.fromarray(values, mode="L").save(tmp_path / "l.png")
    Image.fromarray(values.astype(np.uint16) * 100).save(tmp_path / "i16.png")  # 16-bit: classes, not scaled
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(values > 0).save(tmp_path / "one_bit.png")
    read, palette = read_mask(tmp_path / "p.png")
    assert read.tolist() == values.tolist() and palette[:12] == [v for colour in PNG_PALETTE for v in colour]
    assert read_mask(tmp_path / "l.png")[0].tolist() == values.tolist() and read_mask(tmp_path / "l.png")[1] is None
    assert read_mask(tmp_path / "i16.png")[0].tolist() == (values.astype(int) * 100).tolist()
    assert read_mask(tmp_path / "grey_rgb.png")[0].tolist() == values.tolist()
    assert read_mask(tmp_path / "one_bit.png")[0].tolist() == (values > 0).astype(int).tolist()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    with pytest.raises(UserError, match="cannot read mask .*broken.png"):
        read_mask(tmp_path / "broken.png")


# --------------------------------------------------------------------------------------------------- VOC
@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory):
    """VOCdevkit/VOC2012 with 8 segmented images (train: 6, val: 2), VOC palette PNGs with 255 borders, and a
    test.txt listing an image without a mask (as VOC2012's test images are)."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    maps = write_voc_seg(root)
    return root, maps


def test_voc_seg_reads_segmentation_class_and_cuts_test_from_train(voc_folder, caplog):
    root, maps = voc_folder
    with caplog.at_level(logging.INFO, logger="cvlab.data.base"):
        datamodule = _module("voc_seg", root)
    files = datamodule.split_files()
    assert files["val"] == ["VOC2012/JPEGImages/2007_6.jpg", "VOC2012/JPEGImages/2007_7.jpg"]  # the official val
    assert len(files["train"]) == 5 and len(files["test"]) == 1  # ceil(0.15 x 6) of train
    assert sorted(files["train"] + files["test"]) == [f"VOC2012/JPEGImages/2007_{k}.jpg" for k in range(6)]
    assert "test.txt lists no image with a mask" in caplog.text
    assert "no test split in the files: cut test (15 %) from the 6 train images" in caplog.text
    info = datamodule.info
    assert info.class_names == VOC_CLASSES and info.num_classes == 21 and info.palette == voc_palette(21)
    assert info.palette[15] == (192, 128, 128)
    assert info.class_counts == tuple(_expected_counts(maps, files["train"], 21))
    _, mask = datamodule.val_set[1]
    assert torch.equal(mask, torch.from_numpy(maps["2007_7"]).long())  # 255 stays: ignored
    assert set(mask.unique().tolist()) == {0, 15, 20, 255}
    assert _module("voc_seg", root / "VOC2012").split_files() == {
        split: [name.removeprefix("VOC2012/") for name in names] for split, names in files.items()}


def test_voc_seg_refuses_list_entries_that_leave_the_folder(voc_folder, tmp_path):
    root, _ = voc_folder
    voc = tmp_path / "VOC2012"
    voc.mkdir()
    for folder in ("JPEGImages", "SegmentationClass"):
        (voc / folder).symlink_to(root / "VOC2012" / folder)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_0\n../../../etc/passwd\n2007_9\n")
    with pytest.raises(UserError) as error:
        _module("voc_seg", tmp_path)
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "1 file name(s) that leave the data root: VOC2012/ImageSets/Segmentation/train.txt: " \
           "'../../../etc/passwd'" in message
    assert "1 image(s) without a mask: VOC2012/JPEGImages/2007_9.jpg (listed in" in message


# --------------------------------------------------------------------------------------------------- COCO
def test_coco_class_map_renders_polygons_rle_and_crowd():
    annotations, expected = coco_scene(14, 18)  # not square: height and width in their places
    label = {3: 1, 7: 2}
    objects = [(label[a["category_id"]], a["segmentation"], bool(a["iscrowd"])) for a in annotations]
    assert np.array_equal(coco_class_map(objects, 14, 18), expected)
    with pytest.raises(ValueError, match="RLE size"):
        coco_class_map([(1, {"size": [5, 5], "counts": [25]}, False)], 14, 18)
    with pytest.raises(ValueError, match="at least 3"):
        coco_class_map([(1, [[0, 0, 4, 4]], False)], 14, 18)  # pycocotools would read 4 numbers as a box


def test_coco_seg_export_renders_masks_with_counts(tmp_path):
    scene, expected = coco_scene(SIDE, SIDE)
    images = [{"id": 10 + k, "file_name": f"{k}.png", "width": SIDE, "height": SIDE} for k in range(4)]
    annotations = [{**a, "id": 100 * k + a["id"], "image_id": 10 + k} for k in (0, 2) for a in scene]
    write_coco_seg(tmp_path, "annotations/instances_default.json", images, annotations)
    datamodule = _module("coco_seg", tmp_path, val_fraction=0.25, test_fraction=0.25)
    info = datamodule.info
    assert info.class_names == ("background", "cat", "dog") and info.num_classes == 3
    assert info.palette == voc_palette(3) and info.ignore_index == 255
    files = datamodule.split_files()
    maps = {"0": expected, "2": expected, "1": np.zeros_like(expected), "3": np.zeros_like(expected)}
    assert info.class_counts == tuple(_expected_counts(maps, files["train"], 3))
    for dataset, split in ((datamodule.train_set, "train"), (datamodule.val_set, "val")):
        for position, name in enumerate(files[split]):
            assert torch.equal(dataset.load(position)[1], torch.from_numpy(maps[_stem(name)]))
    assert sorted(sum(files.values(), [])) == [f"images/{k}.png" for k in range(4)]
    # The json named by data.ann; the shipped-splits layout of the detection reader.
    (tmp_path / "annotations" / "other.json").write_text((tmp_path / "annotations" / "instances_default.json")
                                                         .read_text())
    with pytest.raises(UserError, match="holds 2 COCO json files"):
        _module("coco_seg", tmp_path)
    chosen = _module("coco_seg", tmp_path, ann="annotations/other.json", val_fraction=0.25, test_fraction=0.25)
    assert chosen.info.class_counts == info.class_counts


def test_coco_seg_shipped_splits(tmp_path):
    scene, _ = coco_scene(SIDE, SIDE)
    for split, first in (("train2017", 0), ("val2017", 5)):
        images = [{"id": first + k, "file_name": f"{split}_{k}.png", "width": SIDE, "height": SIDE} for k in range(5)]
        write_coco_seg(tmp_path, f"annotations/instances_{split}.json", images,
                    [{**a, "id": 10 * first + a["id"], "image_id": first} for a in scene])
    files = _module("coco_seg", tmp_path, test_fraction=0.2).split_files()
    assert files["val"] == [f"images/val2017_{k}.png" for k in range(5)]
    assert len(files["train"]) == 4 and len(files["test"]) == 1


def test_bad_coco_annotations_are_reported_and_duplicate_ids_refused(tmp_path):
    scene, _ = coco_scene(SIDE, SIDE)
    images = [{"id": 1, "file_name": "a.png", "width": SIDE, "height": SIDE},
              {"id": 2, "file_name": "b.png", "width": SIDE, "height": SIDE}]
    write_coco_seg(tmp_path, "instances.json", images, [{**scene[0], "image_id": 1}])
    data = json.loads((tmp_path / "instances.json").read_text())
    data["images"] += [{"id": 3, "file_name": "../outside.png"}, {"id": 4, "file_name": "missing.png"},
                       {"id": 5, "file_name": "a.png", "width": 20, "height": SIDE}]
    data["annotations"] += [{"id": 7, "image_id": 2, "category_id": 99, "segmentation": [rectangle(0, 0, 4, 4)]},
                            {"id": 8, "image_id": 42, "category_id": 3, "segmentation": [rectangle(0, 0, 4, 4)]},
                            {"id": 9, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4]},
                            {"id": 10, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 4, 2]]}]
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as error:
        _module("coco_seg", tmp_path)
    message = str(error.value)
    assert "\n" not in message and "7 problem(s)" in message, message
    for expected in ("1 file name(s) that leave the data root: instances.json image ../outside.png: file name "
                     "'../outside.png' leaves the data root, refused",
                     "4 annotation(s) without a usable segmentation, image or category: instances.json annotation 7 "
                     "(unknown category id 99), instances.json annotation 8 (image id 42 is not in 'images'), "
                     "instances.json annotation 9 (no 'segmentation' (polygons or RLE)), ...",
                     "1 mask(s) without an image: images/missing.png",
                     "1 mask(s) whose size differs from the image's: images/a.png (the json says 20x16, the image "
                     "is 16x16)"):
        assert expected in message, expected
    data["images"].append({"id": 1, "file_name": "b.png"})
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="image id 1 is used twice"):
        _module("coco_seg", tmp_path)


# --------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("settings", "expected"), [
    ({"source": "cityscapes"}, "unknown segmentation data source 'cityscapes'"),
    ({"source": "masks"}, "needs data.root"),
    ({"source": "voc_seg", "class_names": ["a", "b"]}, "data.class_names names the classes of a masks folder"),
    ({"source": "voc_seg", "num_classes": 20}, "voc_seg: data.num_classes=20 but the data has 21 classes"),
    ({"num_classes": 5}, "shapes_seg: data.num_classes=5 but the data has 6 classes"),
    ({"source": "masks", "num_classes": 300}, "data.num_classes must be an integer in [2, 255]"),
    ({"ann": "x.json"}, "data.ann names a COCO json"),
    ({"scale": [2.0, 1.0]}, "the minimum comes first"),
    ({"hflip": 2}, "data.hflip is a probability"),
    ({"max_image_pixels": 10}, "shapes_seg draws its images"),
    ({"n_objects": [0, 2]}, "data.n_objects must be an integer in [1, 16]"),
])
def test_settings_are_checked_before_reading(settings, expected, tmp_path):
    settings = {"source": "shapes_seg", **settings}
    if settings["source"] != "shapes_seg" and "needs" not in expected:
        settings["root"] = str(tmp_path)
    with pytest.raises(UserError, match=re.escape(expected)):
        SegmentationDataModule(**settings)


def test_augment_false_trains_on_the_evaluation_pipeline():
    plain = _module("shapes_seg", train_size=4, val_size=2, augment=False, hflip=1.0, image_size=24)
    for index in range(4):
        image, mask = plain.train_set[index]
        assert torch.equal(mask, plain.train_set.masks[index].long())
        assert torch.equal((image * 255).round().byte(), plain.train_set.images[index])


@pytest.mark.parametrize("option", ["shapes_seg", "masks", "voc_seg", "coco_seg"])
def test_options_compose_and_build(option, masks_folder, voc_folder, tmp_path):
    from hydra.utils import instantiate

    from cvlab.utils.config import compose

    scene, _ = coco_scene(SIDE, SIDE)
    write_coco_seg(tmp_path, "annotations/instances_train2017.json",
                [{"id": k, "file_name": f"{k}.png", "width": SIDE, "height": SIDE} for k in range(8)],
                [{**a, "image_id": 0} for a in scene])
    roots = {"masks": masks_folder[0], "voc_seg": voc_folder[0], "coco_seg": tmp_path}
    overrides = [f"data={option}", "data.num_workers=0", f"data.image_size={SIDE}"]
    overrides += [f"data.root={roots[option]}"] if option in roots else ["data.train_size=4", "data.val_size=2"]
    cfg = compose("train", overrides)
    datamodule = instantiate(cfg.data, sampler=None)
    datamodule.setup()
    assert datamodule.name == option and datamodule.info.ignore_index == IGNORE_INDEX
    assert datamodule.info.num_classes == {"shapes_seg": 6, "masks": 4, "voc_seg": 21, "coco_seg": 3}[option]
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape[1:] == (3, SIDE, SIDE) and masks.shape[1:] == (SIDE, SIDE) and masks.dtype == torch.int64
