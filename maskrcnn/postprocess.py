"""Mask pasting: box-sized mask probabilities onto the canvas, and the canvas back to the image.

``paste_masks`` is torchvision's ``paste_masks_in_image``, for all of an image's detections at
once on an accelerator. ``to_original`` maps one image's detections from canvas coordinates
back to the original image: the image was resized by ``scale`` and placed at the canvas's
top-left, so boxes divide by ``scale``. Masks given on the canvas are cropped to the resized
image (``round(h * scale) x round(w * scale)``), resized bilinearly to ``H x W`` and
thresholded; masks given as probabilities over their boxes (``mask_probs``, the model's
``paste_masks=False``) are pasted once, straight into the ``H x W`` image, as torchvision's
eval path pastes them (``paste_in_image``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

# Masks are resized this many at a time, to bound the float memory at the output size.
_MASK_CHUNK = 16
_PASTE_CHUNK = 32


class _Taps(NamedTuple):
    """Per detection and output row (or column): the two source cells and their weights."""

    low: Tensor  # int64 [n, size]
    high: Tensor
    w_low: Tensor  # float32 [n, size], 0 outside the box
    w_high: Tensor


def paste_masks(masks: Tensor, boxes: Tensor, size: tuple[int, int], padding: int = 1) -> Tensor:
    """``masks [N, 1, M, M]`` (probabilities over each box) pasted at ``boxes [N, 4]`` on an
    ``H x W`` image -> ``[N, 1, H, W]`` float32, as torchvision's ``paste_masks_in_image``.

    On an accelerator, ``paste_masks_batched``. On the CPU, torchvision's own loop: reading box
    corners costs nothing there, and it works only inside each box, where the batched paste
    computes every pixel of every detection (slower on CPU, docs/benchmarks.md, "GPU").
    """
    if masks.device.type == "cpu":
        return paste_masks_in_image(masks.float(), boxes, size, padding=padding)
    return paste_masks_batched(masks, boxes, size, padding)


def paste_masks_batched(
    masks: Tensor, boxes: Tensor, size: tuple[int, int], padding: int = 1
) -> Tensor:
    """``paste_masks`` for all of an image's detections at once, with no host sync.

    torchvision resizes and slices one detection at a time, reading each box's corners back to
    the host (several host syncs per detection, up to 100 per image). Here the box corners stay
    on the device: every detection's bilinear weights come from its integer box at once, and the
    resize is two gathers (along columns, then rows: torchvision's ``interpolate`` order, so the
    results agree to float rounding), zero outside each box.
    """
    height, width = size
    if len(masks) == 0:
        return masks.new_zeros((0, 1, height, width), dtype=torch.float32)
    with torch.autocast(masks.device.type, enabled=False):
        padded = F.pad(masks[:, 0].float(), (padding,) * 4)  # [N, P, P]
        cells = padded.shape[-1]
        corners = expand_boxes(boxes.float(), cells / masks.shape[-1]).to(torch.int64)
        out = padded.new_empty((len(masks), 1, height, width))
        for start in range(0, len(masks), _PASTE_CHUNK):
            part = slice(start, start + _PASTE_CHUNK)
            cols = _taps(corners[part, 0], corners[part, 2], width, cells)
            rows = _taps(corners[part, 1], corners[part, 3], height, cells)
            src = padded[part]  # [n, P, P]
            wide = (
                _gather(src, cols.low, 2) * cols.w_low[:, None]
                + _gather(src, cols.high, 2) * cols.w_high[:, None]
            )  # [n, P, W]
            out[part, 0] = (
                _gather(wide, rows.low, 1) * rows.w_low[..., None]
                + _gather(wide, rows.high, 1) * rows.w_high[..., None]
            )
    return out


def _taps(first: Tensor, last: Tensor, size: int, cells: int) -> _Taps:
    """Bilinear taps (``align_corners=False``) of output pixels ``0..size-1`` for boxes spanning
    pixels ``first..last`` (inclusive) resized from ``cells`` source cells, as ATen computes
    them: source ``(i + 0.5) * cells / length - 0.5`` clamped at 0, in float32."""
    pixel = torch.arange(size, device=first.device)
    length = (last - first + 1).clamp(min=1)
    ratio = cells / length.to(torch.float32)
    source = (ratio[:, None] * ((pixel - first[:, None]).to(torch.float32) + 0.5) - 0.5).clamp(
        min=0
    )
    low = source.to(torch.int64).clamp(max=cells - 1)
    w_high = (source - low.to(torch.float32)).clamp(0, 1)
    high = low + (low < cells - 1).to(torch.int64)
    inside = (pixel >= first[:, None]) & (pixel <= last[:, None])
    zero = w_high.new_zeros(())
    w_low = torch.where(inside, 1 - w_high, zero)
    return _Taps(low, high, w_low, torch.where(inside, w_high, zero))


def _gather(src: Tensor, index: Tensor, dim: int) -> Tensor:
    """``src [n, A, B]`` indexed along ``dim`` (1 or 2) by ``index [n, size]``."""
    if dim == 2:
        return src.gather(2, index[:, None, :].expand(-1, src.shape[1], -1))
    return src.gather(1, index[:, :, None].expand(-1, -1, src.shape[2]))


def to_original(
    detection: dict[str, Tensor],
    *,
    scale: float,
    height: int,
    width: int,
    mask_threshold: float = 0.5,
) -> dict[str, Tensor]:
    """``detection`` (boxes, labels, scores, and masks on the canvas ``[N, 1, S, S]`` or
    ``mask_probs [N, 1, M, M]`` over the boxes, or neither) at ``height x width``.

    Returns boxes clipped to the image and masks as uint8 ``[N, height, width]`` (0 or 1).
    """
    if scale <= 0 or height <= 0 or width <= 0:
        raise ValueError(
            f"scale, height and width must be positive, got {scale}, {height}, {width}"
        )
    boxes = detection["boxes"] / scale
    result = {**detection}
    if "mask_probs" in detection:
        result["masks"] = paste_in_image(
            result.pop("mask_probs"), boxes, height=height, width=width, threshold=mask_threshold
        )
    elif "masks" in detection:
        result["masks"] = paste_original(
            detection["masks"], scale=scale, height=height, width=width, threshold=mask_threshold
        )
    # Clipped after the paste: a mask's box may reach past the image, as it may on the canvas.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    result["boxes"] = boxes
    return result


def paste_in_image(
    masks: Tensor, boxes: Tensor, *, height: int, width: int, threshold: float, padding: int = 1
) -> Tensor:
    """Mask probabilities over their boxes ``[N, 1, M, M]`` at ``boxes [N, 4]`` (image pixels)
    -> uint8 masks ``[N, height, width]``: torchvision's ``paste_masks_in_image`` and then
    ``>= threshold``, the same pixels, computed inside each box only (torchvision makes a float
    image per detection).

    The masks are laid out column by column (a transposed view of ``[N, width, height]``),
    the order COCO's RLE encoder reads, so encoding them needs no copy.
    """
    n, cells = len(masks), masks.shape[-1]
    out = torch.zeros((n, width, height), dtype=torch.uint8, device=masks.device).permute(0, 2, 1)
    if n == 0:
        return out
    padded = F.pad(masks[:, 0].float(), (padding,) * 4)
    corners = expand_boxes(boxes.float(), (cells + 2 * padding) / cells).to(torch.int64)
    for mask, pixels, (x1, y1, x2, y2) in zip(out, padded, corners.tolist(), strict=True):
        left, right, top, bottom = max(x1, 0), min(x2 + 1, width), max(y1, 0), min(y2 + 1, height)
        if right <= left or bottom <= top:
            continue  # the box lies outside the image
        size = (max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1))
        resized = F.interpolate(pixels[None, None], size=size, mode="bilinear", align_corners=False)
        inside = resized[0, 0, top - y1 : bottom - y1, left - x1 : right - x1]
        mask[top:bottom, left:right] = inside >= threshold
    return out


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
