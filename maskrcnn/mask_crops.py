"""Mask targets from per-instance crops instead of full-canvas masks.

A full-canvas target costs S x S bytes per instance (1 MB at S = 1024) and is grown to float32
before RoIAlign; the mask head only ever reads the gt mask inside a proposal. So a target may
instead carry ``mask_crops`` [N, M, M] (0/1) and ``mask_boxes`` [N, 4] float (the canvas box the
crop covers: crop pixel (i, j) is the cell ``[x1 + j*w/M, x1 + (j+1)*w/M)`` and likewise in y).
``fit_crop`` makes one from a mask's pixels; ``crop_mask_targets`` maps each proposal into its gt
crop's frame and RoIAligns the crop there, which is what RoIAlign on the canvas mask samples.

Equal to the canvas targets exactly when a crop holds its pixels unresampled (M - 2 = the
crop's size); a resampled crop differs at the edges by the resampling (tests/maskrcnn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# RoIAlign samples per bin along each axis in the crop's frame: a crop of 2x the target's
# resolution is then read about once per crop pixel (the canvas form's adaptive count is
# ceil(box side / target size), which only costs more on a crop of a few pixels per bin).
CROP_SAMPLING_RATIO = 2


def fit_crop(pixels: Tensor, rect: tuple[int, int, int, int], size: int) -> tuple[Tensor, Tensor]:
    """A mask's pixels [h, w] at canvas rectangle ``rect`` (x1, y1, x2, y2) -> an M x M crop
    (nearest neighbour to M - 2, then a zero border, so that RoIAlign past the crop's edge reads
    zeros as it would on the canvas) and the canvas box it covers."""
    x1, y1, x2, y2 = (float(v) for v in rect)
    inner = size - 2
    if x2 <= x1 or y2 <= y1 or pixels.numel() == 0:
        return torch.zeros((size, size), dtype=torch.uint8), torch.tensor([x1, y1, x1 + 1, y1 + 1])
    resized = F.interpolate(pixels[None, None].float(), size=(inner, inner), mode="nearest")
    crop = F.pad(resized[0, 0], (1, 1, 1, 1)).to(torch.uint8)
    px, py = (x2 - x1) / inner, (y2 - y1) / inner
    return crop, torch.tensor([x1 - px, y1 - py, x2 + px, y2 + py], dtype=torch.float32)


def crop_mask_targets(
    crops: Tensor, crop_boxes: Tensor, proposals: Tensor, matched: Tensor, size: int
) -> Tensor:
    """One image's positives' targets [P, size, size] in float32, from their gt crops.

    RoIAlign (aligned=False) reads canvas pixel k's value at coordinate k, so a canvas point
    y is the crop point ``(y + 0.5 - box_y1) * M / box_h - 0.5``; that map is affine, so mapping
    the proposal's corners maps every sample point."""
    m = crops.shape[-1]
    boxes = crop_boxes[matched].float()
    scale = m / (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    proposals = proposals.float()
    low = (proposals[:, :2] + 0.5 - boxes[:, :2]) * scale - 0.5
    high = (proposals[:, 2:] + 0.5 - boxes[:, :2]) * scale - 0.5
    rois = torch.cat([matched[:, None].to(low.dtype), low, high], dim=1)
    pooled = roi_align(crops[:, None].float(), rois, (size, size), 1.0, CROP_SAMPLING_RATIO)
    return pooled[:, 0]
