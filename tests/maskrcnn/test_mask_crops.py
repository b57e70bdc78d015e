"""Mask targets from crops (``mask_crops`` + ``mask_boxes``) against full-canvas ``masks``."""

from __future__ import annotations

import pytest
import torch

from maskrcnn import MaskRCNN
from maskrcnn.mask_crops import fit_crop
from maskrcnn.roi_heads import mask_targets

S = 128


def _crops(masks: torch.Tensor, boxes: torch.Tensor, size: int | None):
    """Each mask cut at its (integer) box and fitted to ``size`` (None: unresampled, square)."""
    crops, crop_boxes = [], []
    for mask, box in zip(masks, boxes, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box)
        crop, crop_box = fit_crop(mask[y1:y2, x1:x2], (x1, y1, x2, y2), size or x2 - x1 + 2)
        crops.append(crop)
        crop_boxes.append(crop_box)
    return torch.stack(crops), torch.stack(crop_boxes)


def _proposals(boxes: torch.Tensor, per_box: int, jitter: float, seed: int = 0):
    """Proposals around each gt box (shifted and scaled by up to ``jitter`` of its side), all
    inside the canvas; and the gt index of each."""
    gen = torch.Generator().manual_seed(seed)
    matched = torch.arange(len(boxes)).repeat_interleave(per_box)
    base = boxes[matched]
    side = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    noise = (torch.rand(base.shape, generator=gen) * 2 - 1) * jitter * side
    return (base + noise).clamp(0, S - 1), matched


def _ellipse(box: list[float]) -> torch.Tensor:
    x1, y1, x2, y2 = box
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)


def _gt(sides: list[int]):
    boxes = torch.tensor(
        [[4 + 2 * i, 6 + 3 * i, 4 + 2 * i + s, 6 + 3 * i + s] for i, s in enumerate(sides)],
        dtype=torch.float32,
    )
    masks = torch.stack([_ellipse(b.tolist()) for b in boxes])
    return boxes, masks


def test_unresampled_crops_give_the_canvas_mask_targets():
    # Sides in 29..56 px, one for all (unresampled crops share a size): RoIAlign's adaptive
    # sampling on the canvas then takes 2 points per bin for a 28 x 28 target, as the crop form
    # does, so the two are the same up to rounding.
    boxes, masks = _gt([41, 41, 41])
    proposals, matched = _proposals(boxes, per_box=8, jitter=0.08)
    canvas = mask_targets([masks], [proposals], [matched], 28)
    crops = mask_targets([_crops(masks, boxes, None)], [proposals], [matched], 28)
    assert canvas.dtype == crops.dtype == torch.float32
    torch.testing.assert_close(crops, canvas, rtol=0, atol=1e-5)


def test_resampled_crops_give_the_canvas_mask_targets_within_tolerance():
    # Crops of 56 x 56 (twice the target) for instances of 40..110 px: the nearest-neighbour
    # resampling moves edges by under a crop pixel. Stated tolerance: mean |difference| under
    # 0.03 and at least 97% of the binarised (>= 0.5) target pixels the same.
    boxes, masks = _gt([40, 75, 110])
    proposals, matched = _proposals(boxes, per_box=8, jitter=0.1)
    canvas = mask_targets([masks], [proposals], [matched], 28)
    crops = mask_targets([_crops(masks, boxes, 56)], [proposals], [matched], 28)
    assert (crops - canvas).abs().mean() < 0.03
    assert ((crops >= 0.5) == (canvas >= 0.5)).float().mean() >= 0.97


def test_the_model_trains_on_crop_targets_as_on_canvas_masks(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    cropped = []
    for t in targets:
        exact = t["boxes"].round().clamp(0, config.canvas)
        crops, crop_boxes = _crops(t["masks"], exact, 2 * 2 * config.roi.mask_pool_size)
        rest = {k: v for k, v in t.items() if k != "masks"}
        cropped.append({**rest, "mask_crops": crops, "mask_boxes": crop_boxes})
    model = MaskRCNN(config).train()
    torch.manual_seed(0)
    canvas = model(images, targets)
    torch.manual_seed(0)
    crops = model(images, cropped)
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness"):
        torch.testing.assert_close(crops[name], canvas[name])
    torch.testing.assert_close(crops["loss_mask"], canvas["loss_mask"], rtol=0.05, atol=0.01)


def test_a_crop_target_needs_its_boxes(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    n = len(targets[0]["boxes"])
    rest = {k: v for k, v in targets[0].items() if k != "masks"}
    bad = [{**rest, "mask_crops": torch.zeros(n, 56, 56, dtype=torch.uint8)}, targets[1]]
    with pytest.raises(ValueError, match=r"target 0 lacks \['mask_boxes'\]"):
        MaskRCNN(config).train()(images, bad)
