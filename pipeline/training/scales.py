"""Multi-scale training from shards: draw one of the stored scales per image and carry its
instances (boxes and mask crops) from the stored image size to that scale's size.

The image itself is resized where it is pasted (``pipeline.training.loader``); the RPN targets
need nothing here, as preprocess stored them per scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.io.images import resized_size
from pipeline.training.batch import decode_crop

__all__ = ["draw_scale", "rescale_instances"]

Size = tuple[int, int]  # (height, width)


def draw_scale(
    scales: Sequence[float],
    *,
    stored_scale: float,
    height: int,
    width: int,
    generator: torch.Generator | None,
) -> tuple[int, Size | None]:
    """The drawn scale's index and the image size there (None: the stored image's size), for
    an original ``height`` x ``width`` image. A single stored scale draws nothing, so the
    default stream is the single-scale one."""
    k = 0 if len(scales) == 1 else int(torch.randint(len(scales), (), generator=generator))
    if float(scales[k]) == float(stored_scale):
        return k, None
    return k, resized_size(height, width, float(scales[k]))


def rescale_instances(
    crops: Sequence[bytes],
    rects: np.ndarray,
    boxes: np.ndarray,
    *,
    stored: Size,
    size: Size,
    canvas_masks: bool,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Stored RLE mask crops, their rectangles and the boxes at image size ``stored`` -> the
    decoded crops, rectangles and boxes at ``size``.

    With ``canvas_masks`` each crop is resampled to its new rectangle (to be pasted as is);
    otherwise the crops keep their stored pixels, which ``fit_crop`` resamples once, to M x M.
    """
    pixels = [decode_crop(crop, rect) for crop, rect in zip(crops, rects, strict=True)]
    scaled = _scaled_rects(rects, stored, size)
    if canvas_masks:
        pixels = [_nearest(p, r) for p, r in zip(pixels, scaled, strict=True)]
    return pixels, scaled, _scaled_boxes(boxes, stored, size)


def _scaled_boxes(boxes: np.ndarray, stored: Size, size: Size) -> np.ndarray:
    """Boxes at another image size, per axis as preprocess scales them (reader.instance_boxes),
    so that they are the boxes that scale's stored targets were matched to."""
    factors = np.array([size[1] / stored[1], size[0] / stored[0]] * 2)
    return (boxes.astype(np.float64) * factors).astype(np.float32)


def _scaled_rects(rects: np.ndarray, stored: Size, size: Size) -> np.ndarray:
    """Crop rectangles at another image size: corners scaled and rounded, a non-empty
    rectangle keeping at least a pixel, an empty one staying empty."""
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    qx, qy = size[1] / stored[1], size[0] / stored[0]
    x1 = np.minimum(np.round(rects[:, 0] * qx), size[1] - 1)
    y1 = np.minimum(np.round(rects[:, 1] * qy), size[0] - 1)
    x2 = np.minimum(np.maximum(x1 + 1, np.round(rects[:, 2] * qx)), size[1])
    y2 = np.minimum(np.maximum(y1 + 1, np.round(rects[:, 3] * qy)), size[0])
    scaled = np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)
    scaled[rects[:, 2] <= rects[:, 0]] = 0
    return scaled


def _nearest(pixels: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """A crop's pixels resampled (nearest neighbour) to the size of canvas rectangle ``rect``."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1:
        return pixels
    h, w = pixels.shape
    ys = ((np.arange(y2 - y1) + 0.5) * h / (y2 - y1)).astype(np.int64)
    xs = ((np.arange(x2 - x1) + 0.5) * w / (x2 - x1)).astype(np.int64)
    return pixels[np.ix_(ys, xs)]
