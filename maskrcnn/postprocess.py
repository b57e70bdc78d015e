"""Map one image's detections from canvas coordinates back to the original image.

The image was resized by ``scale`` and placed at the canvas's top-left, so boxes divide by
``scale`` and each mask's probability map is cropped to the resized image
(``round(h * scale) x round(w * scale)``), resized bilinearly to ``H x W`` and thresholded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Masks are resized this many at a time, to bound the float memory at the original size.
_MASK_CHUNK = 16


def to_original(
    detection: dict[str, Tensor],
    *,
    scale: float,
    height: int,
    width: int,
    mask_threshold: float = 0.5,
) -> dict[str, Tensor]:
    """``detection`` (boxes, labels, scores, optional masks ``[N, 1, S, S]``) at ``height x width``.

    Returns boxes clipped to the image and masks as uint8 ``[N, height, width]`` (0 or 1).
    """
    if scale <= 0 or height <= 0 or width <= 0:
        raise ValueError(
            f"scale, height and width must be positive, got {scale}, {height}, {width}"
        )
    boxes = detection["boxes"] / scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    result = {**detection, "boxes": boxes}
    if "masks" in detection:
        result["masks"] = paste_original(
            detection["masks"], scale=scale, height=height, width=width, threshold=mask_threshold
        )
    return result


def paste_original(
    masks: Tensor, *, scale: float, height: int, width: int, threshold: float
) -> Tensor:
    """Canvas probability maps ``[N, 1, S, S]`` -> uint8 masks ``[N, height, width]``."""
    canvas = masks.shape[-1]
    h = min(canvas, max(1, round(height * scale)))
    w = min(canvas, max(1, round(width * scale)))
    out = torch.empty((len(masks), height, width), dtype=torch.uint8, device=masks.device)
    for start in range(0, len(masks), _MASK_CHUNK):
        region = masks[start : start + _MASK_CHUNK, :, :h, :w].float()
        resized = F.interpolate(region, size=(height, width), mode="bilinear", align_corners=False)
        out[start : start + _MASK_CHUNK] = (resized[:, 0] >= threshold).to(torch.uint8)
    return out
