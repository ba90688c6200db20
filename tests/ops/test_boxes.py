"""IoU of corresponding boxes."""
import torch
from torchvision.ops import box_iou

from cvlab.ops.boxes import paired_box_iou


def test_paired_box_iou_is_the_diagonal_of_box_iou_and_broadcasts():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 4, 4], [5, 5, 6, 6]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 4, 4], [7, 7, 8, 8]])
    torch.testing.assert_close(paired_box_iou(a, b), torch.tensor([50 / 150, 1.0, 0.0]))
    torch.testing.assert_close(paired_box_iou(a, b), box_iou(a, b).diagonal())
    assert paired_box_iou(a[:, None], b[None]).shape == (3, 3)
    # Degenerate boxes give 0, not NaN.
    assert paired_box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0
