"""`cvlab predict ckpt=PATH source=DIR|FILE [conf=0.25] [top_k=5]`: run a checkpoint, or a model.onnx that
`cvlab export` wrote (through onnxruntime, read with its sidecar json), on image files; write a drawn copy of every
image and ``predictions.json`` into <run>/predict/<time>/.

What is drawn and saved is the task's (:meth:`~cvlab.tasks.base.BaseTask.predict_images`, through the runner
:func:`~cvlab.engine.export.open_runner` gives, so a checkpoint and its export share it): detection draws the boxes
scoring above ``conf`` and saves them in the COCO results format, ``[{"image_id", "category_id", "bbox": [x, y, w,
h] in original pixels, "score"}, ...]``; classification labels each image with its best class and saves the
``top_k`` classes with their probabilities; segmentation draws the predicted class mask over each image, writes it
as a palette PNG of class indices at the image's own size into ``masks/``, and saves each class's share of the
pixels. ``image_id`` is the file name's number (COCO's ``000000397133.jpg`` -> 397133) or the file's position in
the sorted list, unless the task knows better (a COCO-trained detector whose json is still readable uses the json's
ids, so the file can be scored with pycocotools against it).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

import cvlab.utils.config  # noqa: F401  (registers the config resolvers)
from cvlab.engine import (
    inference_device,
    open_runner,
    output_dir,
    quiet_lightning,
    run_guarded,
    say_run_dir,
    write_json,
)
from cvlab.utils.console import console, metrics_table
from cvlab.utils.errors import UserError
from cvlab.utils.images import IMAGE_EXTENSIONS


def find_images(source: Path) -> tuple[list[Path], Path]:
    """The image files of ``source`` (a file, or a folder searched recursively, sorted) and the folder that names
    are relative to."""
    if source.is_file():
        return [source], source.parent
    if not source.is_dir():
        raise UserError(f"source {str(source)!r} is neither an image file nor a folder")
    paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    return paths, source


def output_names(paths: list[Path], root: Path) -> list[Path]:
    """Where each drawn copy goes, relative to the output folder: the source's relative path as a PNG."""
    relative = [p.relative_to(root) for p in paths]
    names = [r.with_suffix(".png") for r in relative]
    if len(set(names)) < len(names):  # a.jpg beside a.png: keep whole names
        names = [r.with_name(r.name + ".png") for r in relative]
    return names


def image_ids(paths: list[Path]) -> dict[Path, int]:
    """Each file's id: the number its name is (COCO's 000000397133.jpg -> 397133), else its position."""
    return {path: int(path.stem) if path.stem.isdigit() else position for position, path in enumerate(paths)}


def run_predict(cfg: DictConfig) -> tuple[dict, dict]:
    quiet_lightning()
    runner = open_runner(Path(str(cfg.ckpt)).expanduser(), inference_device(str(cfg.device)))
    paths, root = find_images(Path(str(cfg.source)).expanduser())
    if not 0 <= cfg.conf < 1:
        raise UserError(f"conf is a score threshold in [0, 1), got {cfg.conf}")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    say_run_dir(out, "start")
    settings = {"conf": cfg.conf, "top_k": cfg.top_k, "root": root, "image_ids": image_ids(paths)}
    predictions, counts, counted, title = runner.predict_images(paths, output_names(paths, root), out, settings)
    write_json(out / "predictions.json", predictions)
    console.print(metrics_table(dict(sorted(Counter(counts).items(), key=str)), title=title,
                                columns=("class", counted)))
    say_run_dir(out, "end")
    return {"images": len(paths), "predictions": len(predictions)}, {"runner": runner, "predictions": predictions}


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig):
    return run_guarded(run_predict, cfg)


if __name__ == "__main__":
    main()
