"""Detections on the canvas mapped back to the original image."""

from __future__ import annotations

import pytest
import torch

from maskrcnn import to_original

CANVAS = 64


def detection(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    n = len(masks)
    return {
        "boxes": torch.tensor([[8.0, 16.0, 24.0, 48.0], [0.0, 0.0, 64.0, 64.0]])[:n],
        "labels": torch.tensor([1, 2])[:n],
        "scores": torch.tensor([0.9, 0.8])[:n],
        "masks": masks,
    }


def test_boxes_are_divided_by_scale_and_clipped_to_the_image():
    # A 100 x 50 (H x W) image resized by 0.64 fills rows 0..64 and columns 0..32 of the canvas.
    masks = torch.zeros(2, 1, CANVAS, CANVAS)
    out = to_original(detection(masks), scale=0.64, height=100, width=50)
    expected = torch.tensor([[12.5, 25.0, 37.5, 75.0], [0.0, 0.0, 50.0, 100.0]])
    torch.testing.assert_close(out["boxes"], expected)
    assert torch.equal(out["labels"], torch.tensor([1, 2]))
    assert torch.equal(out["scores"], torch.tensor([0.9, 0.8]))


def test_masks_are_pasted_at_the_original_size_without_the_padding():
    masks = torch.zeros(1, 1, CANVAS, CANVAS)
    masks[0, 0, 16:48, 8:24] = 1.0  # inside the resized image
    masks[0, 0, :, 40:] = 1.0  # canvas padding: must not leak into the image
    out = to_original(detection(masks), scale=0.64, height=100, width=50)
    mask = out["masks"]
    assert mask.shape == (1, 100, 50) and mask.dtype == torch.uint8
    expected = torch.zeros(100, 50, dtype=torch.uint8)
    expected[25:75, 12:38] = 1
    differs = mask[0] != expected
    # Bilinear resizing moves the edge by at most one original pixel.
    rows, cols = differs.nonzero(as_tuple=True)
    assert differs.sum() <= 2 * (50 + 26)
    assert all(
        r in (24, 25, 74, 75) or c in (11, 12, 37, 38)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    )
    assert mask[0, :, 40:].sum() == 0


def test_mask_threshold():
    masks = torch.full((1, 1, CANVAS, CANVAS), 0.4)
    assert to_original(detection(masks), scale=1.0, height=64, width=64)["masks"].sum() == 0
    low = to_original(detection(masks), scale=1.0, height=64, width=64, mask_threshold=0.3)
    assert int(low["masks"].sum()) == 64 * 64


def test_no_detections():
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, CANVAS, CANVAS),
    }
    out = to_original(empty, scale=0.5, height=120, width=90)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 120, 90)


def test_bad_scale_is_refused():
    with pytest.raises(ValueError, match="scale, height and width must be positive"):
        to_original(detection(torch.zeros(1, 1, CANVAS, CANVAS)), scale=0.0, height=10, width=10)
