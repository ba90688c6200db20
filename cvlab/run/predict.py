"""`cvlab predict ckpt=PATH source=DIR|FILE [conf=0.25]`: run a checkpoint on image files; write a drawn copy of
every image and ``predictions.json`` into <run>/predict/<time>/.

Detection: each image is letterboxed to the model's input size (as in validation), detected, and the boxes are
mapped back to the original pixels (:func:`~cvlab.data.detection.unletterbox_boxes`). Boxes scoring above ``conf``
are drawn (``torchvision.utils.draw_bounding_boxes``) and saved in the COCO results format:
``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]``, ``bbox`` in original image
pixels. Ids follow the checkpoint's data where it can: for a model trained on a COCO folder whose validation json is
still readable, ``category_id`` is the json's category id and ``image_id`` the json's id of a listed file name, so the
file can be scored with pycocotools against that json. Otherwise ``category_id`` is the class index, and ``image_id``
the file name's number (COCO's ``000000397133.jpg`` -> 397133) or the file's position in the sorted list.

Classification: each image goes through the checkpoint's own evaluation preprocessing (rebuilt from its data
config); ``predictions.json`` holds the ``top_k`` classes with their probabilities per image, and the drawn copy is
the image (enlarged if small) labelled with its best class.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import hydra
import PIL.Image
import torch
from omegaconf import DictConfig, OmegaConf

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.run.common import output_dir, quiet_lightning, run_guarded, say_run_dir, write_json
from cvlab.utils.console import console, metrics_table
from cvlab.utils.errors import UserError

# Box colours by class index (cycled), chosen to stay apart on photos and on the grey letterbox.
_PALETTE = [(255, 56, 56), (44, 153, 168), (255, 157, 151), (72, 249, 10), (146, 204, 23), (61, 219, 134),
            (255, 178, 29), (26, 147, 52), (0, 212, 187), (207, 210, 49), (132, 56, 255), (255, 55, 199)]
# Classification copies are enlarged to at least this short side so the label is readable (8x8 digits...).
_MIN_DRAWN_SIDE = 160


def find_images(source: Path) -> tuple[list[Path], Path]:
    """The image files of ``source`` (a file, or a folder searched recursively, sorted) and the folder that names
    are relative to."""
    from cvlab.data.detection import IMAGE_SUFFIXES

    if source.is_file():
        return [source], source.parent
    if not source.is_dir():
        raise UserError(f"source {str(source)!r} is neither an image file nor a folder")
    paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {source}")
    return paths, source


def _output_names(paths: list[Path], root: Path) -> list[Path]:
    """Where each drawn copy goes, relative to the output folder: the source's relative path as a PNG."""
    relative = [p.relative_to(root) for p in paths]
    names = [r.with_suffix(".png") for r in relative]
    if len(set(names)) < len(names):  # a.jpg beside a.png: keep whole names
        names = [r.with_name(r.name + ".png") for r in relative]
    return names


def _coco_ids(data_cfg: dict, class_names: list[str]) -> tuple[list[int] | None, dict[str, int]]:
    """(category id of each class, image id of each file name) from the validation json of a COCO-folder checkpoint;
    (None, {}) when the data was not COCO or its json is gone or names other classes."""
    if data_cfg.get("source") != "coco" or not data_cfg.get("root"):
        return None, {}
    split = data_cfg.get("val_split") or "val2017"
    ann_file = Path(data_cfg["root"]).expanduser() / "annotations" / f"instances_{split}.json"
    try:
        data = json.loads(ann_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])  # CocoDataset's label order
        image_ids = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}
    if [c["name"] for c in categories] != list(class_names):
        return None, {}
    return [int(c["id"]) for c in categories], image_ids


def _image_id(path: Path, position: int, known: dict[str, int]) -> int:
    if path.name in known:
        return known[path.name]
    return int(path.stem) if path.stem.isdigit() else position


def _open_image(path: Path, mode: str) -> PIL.Image.Image:
    """The image at ``path`` converted to ``mode`` (``RGB``, ``L``), or a UserError naming the unreadable file."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except OSError as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def predict_detection(task, paths: list[Path], root: Path, out: Path, conf: float,
                      device: torch.device) -> tuple[list[dict], Counter]:
    """Draws every image's detections; returns them in the COCO results format (see the module docstring) and
    the number of boxes per class name."""
    from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype, to_pil_image
    from torchvision.utils import draw_bounding_boxes

    from cvlab.data.detection import Letterbox, unletterbox_boxes

    info = task.hparams.data_info
    size, class_names = info["image_size"], info["class_names"]
    category_ids, known_ids = _coco_ids(task.hparams.data or {}, class_names)
    model = task.model.to(device).eval()
    if hasattr(model, "postprocess"):  # thresholding before NMS is faster; the filter below is the rule
        model.postprocess.conf_thresh = conf
    letterbox = Letterbox(size)
    results, counts = [], Counter()
    for position, (path, name) in enumerate(zip(paths, _output_names(paths, root))):
        pixels = pil_to_tensor(_open_image(path, "RGB"))
        height, width = pixels.shape[-2:]
        batch = to_dtype(letterbox(pixels), torch.float32, scale=True)[None].to(device)
        with torch.inference_mode():
            detections = model(batch)[0]
        keep = detections["scores"] > conf
        boxes = unletterbox_boxes(detections["boxes"][keep].float().cpu(), height, width, size)
        scores, labels = detections["scores"][keep].cpu(), detections["labels"][keep].cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).round(decimals=2)
        inside = (xywh[:, 2:] > 0).all(1)  # a box wholly in the letterbox padding has no pixels of the image
        boxes, xywh, scores, labels = boxes[inside], xywh[inside], scores[inside], labels[inside]
        image_id = _image_id(path, position, known_ids)
        counts.update(class_names[k] for k in labels)
        for bbox, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": category_ids[label] if category_ids else label,
                            "bbox": [round(v, 2) for v in bbox], "score": round(score, 5)})
        if len(boxes):
            pixels = draw_bounding_boxes(pixels, boxes, [f"{class_names[k]} {s:.2f}" for k, s in zip(labels, scores)],
                                         colors=[_PALETTE[int(k) % len(_PALETTE)] for k in labels],
                                         width=max(1, min(height, width) // 200))
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        to_pil_image(pixels).save(out / name)
    return results, counts


def _classification_transform(task):
    """The checkpoint's evaluation preprocessing, rebuilt from its data config."""
    from hydra.utils import instantiate

    data_cfg = task.hparams.data or {}
    try:
        datamodule = instantiate(OmegaConf.create(data_cfg))
        datamodule.setup()
    except (UserError, OSError, RuntimeError) as error:
        raise UserError(f"cannot rebuild the preprocessing of data {data_cfg.get('name')!r} the checkpoint was "
                        f"trained on ({error}); it is needed to prepare the images") from None
    return datamodule.split.val.transform


def _labelled_copy(image: PIL.Image.Image, text: str) -> PIL.Image.Image:
    from PIL import ImageDraw

    image = image.convert("RGB")
    factor = max(1, -(-_MIN_DRAWN_SIDE // min(image.size)))
    image = image.resize((image.width * factor, image.height * factor), PIL.Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))
    return image


def predict_classification(task, paths: list[Path], root: Path, out: Path, top_k: int,
                           device: torch.device) -> tuple[list[dict], Counter]:
    """Top-k classes per image and a labelled copy of each; returns the predictions and the count of each best
    class."""
    info = task.hparams.data_info
    class_names, mode = info["class_names"], "L" if info["in_chans"] == 1 else "RGB"
    transform = _classification_transform(task)
    model = task.model.to(device).eval()
    k = min(top_k, len(class_names))
    results = []
    for position, (path, name) in enumerate(zip(paths, _output_names(paths, root))):
        image = _open_image(path, mode)
        with torch.inference_mode():
            probabilities = model(transform(image)[None].to(device)).softmax(-1)[0].cpu()
        best = probabilities.topk(k)
        ranked = [{"label": int(label), "class": class_names[label], "probability": round(float(p), 5)}
                  for p, label in zip(best.values, best.indices)]
        results.append({"image_id": _image_id(path, position, {}), "file_name": str(path.relative_to(root)),
                        "top_k": ranked})
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        _labelled_copy(image, f"{ranked[0]['class']} {ranked[0]['probability']:.2f}").save(out / name)
    return results, Counter(r["top_k"][0]["class"] for r in results)


def run_predict(cfg: DictConfig) -> tuple[dict, dict]:
    from cvlab.run.eval import restore_task
    from cvlab.tasks.classification import ClassificationTask
    from cvlab.tasks.detection import DetectionTask

    quiet_lightning()
    task = restore_task(Path(str(cfg.ckpt)).expanduser())
    paths, root = find_images(Path(str(cfg.source)).expanduser())
    if not 0 <= cfg.conf < 1:
        raise UserError(f"conf is a score threshold in [0, 1), got {cfg.conf}")
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    say_run_dir(out, "start")
    if isinstance(task, DetectionTask):
        predictions, counts = predict_detection(task, paths, root, out, cfg.conf, device)
        title, counted = f"boxes scoring above {cfg.conf} in {len(paths)} image(s)", "boxes"
    elif isinstance(task, ClassificationTask):
        predictions, counts = predict_classification(task, paths, root, out, cfg.top_k, device)
        title, counted = f"best class of {len(paths)} image(s)", "images"
    else:
        raise UserError(f"predict supports detection and classification checkpoints, not {type(task).__name__}")
    write_json(out / "predictions.json", predictions)
    console.print(metrics_table(dict(sorted(counts.items(), key=str)), title=title, columns=("class", counted)))
    say_run_dir(out, "end")
    return {"images": len(paths), "predictions": len(predictions)}, {"task": task, "predictions": predictions}


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig):
    return run_guarded(run_predict, cfg)


if __name__ == "__main__":
    main()
