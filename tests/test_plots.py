"""The PNGs a run directory gets: their layout."""
from PIL import Image

from cvlab.utils.plots import plot_curves


def test_curves_png_wraps_ten_metric_families_into_rows_of_five(tmp_path):
    """A detection results.csv has ten families (loss, 4 loss terms, 4 mAP figures, lr): a 5 × 2 grid of panels."""
    keys = ["train/loss", "train/loss_box", "train/loss_cls", "train/loss_noobj", "train/loss_obj", "val/map",
            "val/map_50", "val/map_75", "val/mar_100"]
    lines = ["epoch,lr," + ",".join(keys)] + [f"{e},0.001," + ",".join(["0.5"] * len(keys)) for e in range(3)]
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    plot_curves(tmp_path / "results.csv", tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (2000, 640)  # 5 panels of 4 in × 2 rows of 3.2 in, 100 dpi
