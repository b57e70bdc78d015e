"""Mask pasting onto the canvas, and detections on the canvas mapped back to the original image."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn import to_original
from maskrcnn.model import MaskRCNN
from maskrcnn.postprocess import paste_in_image, paste_masks, paste_masks_batched

# torchvision's and our paste compute the same bilinear weights in float32, but ATen's kernel
# fuses the source coordinate's multiply-add (one rounding, ours two), so values agree to a few
# float32 ulps (measured: at most 5e-6 on probabilities in [0, 1]), not bit for bit.
PASTE_ATOL = 1e-5

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


def many_boxes(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``n`` boxes centred in a ``height x width`` image, from sub-pixel to 1.5 x the image;
    the first ones fill the image, touch or cross its borders, or have zero area."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
    size = torch.rand(n, 2, generator=gen) ** 2 * torch.tensor([width, height]) * 1.5
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[:7] = torch.tensor(
        [
            [0.0, 0.0, width, height],  # the whole image
            [-5.0, -7.0, width + 5.0, height + 3.0],  # over every border
            [width - 1.0, height - 1.0, width, height],  # the last pixel
            [0.0, 10.0, 12.0, height],  # touching left and bottom
            [10.0, 10.0, 10.2, 10.3],  # sub-pixel
            [3.0, 4.0, 3.0, 4.0],  # zero area
            [width - 20.0, -4.0, width + 30.0, 9.0],  # out at the top right
        ]
    )
    return boxes


@pytest.mark.parametrize(("height", "width"), [(96, 128), (64, 64)])
def test_batched_paste_equals_torchvision(device, height, width):
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(300, 1, 28, 28, generator=gen).to(device)
    boxes = many_boxes(300, height, width).to(device)
    expected = paste_masks_in_image(masks, boxes, (height, width))
    got = paste_masks_batched(masks, boxes, (height, width))
    assert got.shape == expected.shape == (300, 1, height, width)
    assert got.dtype == torch.float32 and got.device == masks.device
    assert (expected > 0).sum() > 100_000  # the boxes do paste a lot
    torch.testing.assert_close(got, expected, rtol=0, atol=PASTE_ATOL)
    torch.testing.assert_close(
        paste_masks(masks, boxes, (height, width)), expected, rtol=0, atol=PASTE_ATOL
    )


def test_batched_paste_of_no_detections(device):
    for paste in (paste_masks, paste_masks_batched):
        none = torch.zeros(0, 1, 28, 28, device=device)
        assert paste(none, torch.zeros(0, 4, device=device), (40, 50)).shape == (0, 1, 40, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_batched_paste_does_not_sync_with_the_host():
    masks = torch.rand(100, 1, 28, 28, device="cuda")
    boxes = many_boxes(100, 128, 128).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        paste_masks_batched(masks, boxes, (128, 128))
        paste_masks(masks, boxes, (128, 128))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Inside, past the left and bottom edges, past the top and right, under a pixel, outside.
BOXES = [
    [3.2, 4.7, 40.1, 30.9],
    [-6.0, 10.0, 20.0, 55.0],
    [30.0, -3.0, 70.0, 20.0],
    [10.0, 10.0, 10.5, 10.5],
    [80.0, 80.0, 90.0, 90.0],
]


def test_box_probabilities_pasted_in_the_image_are_torchvisions_paste_thresholded():
    masks = torch.rand(len(BOXES), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor(BOXES)
    want = (paste_masks_in_image(masks, boxes, (50, 64))[:, 0] >= 0.5).to(torch.uint8)
    got = paste_in_image(masks, boxes, height=50, width=64, threshold=0.5)
    assert got.dtype == torch.uint8 and torch.equal(got, want) and got[:4].any()
    # Column by column, as COCO's RLE encoder reads masks: [H, W, N] is Fortran-ordered.
    assert got.numpy().transpose(1, 2, 0).flags.f_contiguous
    empty = paste_in_image(masks[:0], boxes[:0], height=50, width=64, threshold=0.5)
    assert empty.shape == (0, 50, 64)


def test_the_model_gives_box_probabilities_that_paste_to_its_canvas_masks(small_config):
    torch.manual_seed(0)
    model = MaskRCNN(small_config(canvas=64)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        on_canvas, over_boxes = model(images), model(images, paste_masks=False)
    assert sum(len(d["boxes"]) for d in on_canvas) > 0
    for canvas, boxed in zip(on_canvas, over_boxes, strict=True):
        assert "masks" not in boxed and torch.equal(canvas["boxes"], boxed["boxes"])
        pasted = paste_masks(boxed["mask_probs"], boxed["boxes"], (64, 64))
        torch.testing.assert_close(pasted, canvas["masks"], rtol=0, atol=0)


def test_box_probabilities_and_canvas_masks_map_back_to_the_same_masks():
    """Both forms of the same masks reach the same original-size masks: the canvas masks by a
    resize of the canvas, the box probabilities by one paste at the original size, to within
    the canvas's resampling (measured IoU 0.90 for a blob 10 canvas pixels wide, 0.97-0.98 for
    those of 23-40)."""
    grid = (torch.arange(28) + 0.5) / 28 - 0.5
    blob = (1 - 4 * (grid[:, None] ** 2 + grid[None, :] ** 2)).clamp(0, 1)[None, None]
    boxes = torch.tensor(
        [[3.0, 4.0, 40.0, 30.0], [20.0, 10.0, 30.0, 50.0], [40.0, 40.0, 63.0, 63.0]]
    )
    common = {"labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    probs = blob.expand(3, -1, -1, -1)
    canvas = {"boxes": boxes, "masks": paste_masks(probs, boxes, (64, 64)), **common}
    boxed = {"boxes": boxes, "mask_probs": probs, **common}
    a = to_original(canvas, scale=0.5, height=128, width=120)
    b = to_original(boxed, scale=0.5, height=128, width=120)
    assert "mask_probs" not in b and b["masks"].shape == a["masks"].shape == (3, 128, 120)
    torch.testing.assert_close(b["boxes"], a["boxes"])
    ious = [
        float((x & y).sum() / (x | y).sum()) for x, y in zip(a["masks"], b["masks"], strict=True)
    ]
    assert min(int(m.sum()) for m in a["masks"]) > 500
    assert min(ious) > 0.88 and sum(ious) / len(ious) > 0.93, ious
