"""Instance masks: COCO RLE encoding, polygon rasterisation, resizing and boxes.

A mask here is a 2-D uint8 array of 0/1. COCO RLE runs down the columns (Fortran order),
alternating background and foreground and starting with background; its compressed form is the
ASCII string pycocotools writes. pycocotools does the work; this module keeps its quirks in
one place (a 2-point polygon read as a box, uninitialised memory when RLE counts fall short).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

Polygons = Sequence[Sequence[float]]


def encode_rle(mask: np.ndarray) -> bytes:
    """COCO compressed RLE ``counts`` of one HxW mask (any non-zero value is foreground)."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle wants one HxW mask, got shape {mask.shape}")
    return mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))["counts"]


def encode_rles(masks: np.ndarray) -> list[bytes]:
    """``encode_rle`` of each mask of an [N, H, W] stack, in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"encode_rles wants an [N, H, W] stack, got shape {masks.shape}")
    if len(masks) == 0:
        return []
    stacked = np.asfortranarray((masks != 0).transpose(1, 2, 0), dtype=np.uint8)
    return [rle["counts"] for rle in mask_utils.encode(stacked)]


def uncompressed_rle_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE ``counts`` of one HxW mask: column-major runs, background first."""
    flat = (mask != 0).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def decode_rle(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """The HxW uint8 mask of COCO compressed RLE ``counts``; ValueError if they do not fit."""
    total = sum(compressed_rle_counts(counts))
    if total != height * width:
        raise ValueError(f"RLE counts cover {total} pixels, not {height}x{width}")
    rle = {"size": [height, width], "counts": counts}
    return mask_utils.decode(rle)


def compressed_rle_counts(counts: bytes | str) -> list[int]:
    """The run lengths in a compressed RLE string (pycocotools' ``rleFrString``, vectorised).

    Used to check that the runs cover exactly the image before pycocotools decodes them: when
    they fall short, pycocotools leaves the rest of the mask uninitialised. Each run is a
    little-endian group of 5-bit digits (bit 0x20: more digits follow; 0x10 on the last: the
    value is negative); from the fourth run on, each value is stored as the difference to the
    run two before it.
    """
    data = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    digits = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    bad = np.flatnonzero((digits < 0) | (digits >= 64))
    if len(bad):
        first = int(bad[0])
        if data[first] >= 0x80:
            raise ValueError(f"compressed RLE holds a non-ASCII character at byte {first}")
        char = chr(data[first])
        raise ValueError(f"compressed RLE holds an invalid character {char!r} at byte {first}")
    if len(digits) == 0:
        return []
    more = (digits & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed RLE ends in the middle of a run")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RUN_DIGITS:
        raise ValueError("compressed RLE holds a run longer than any image")
    shift = 5 * (np.arange(len(digits)) - np.repeat(starts, lengths))
    values = np.add.reduceat((digits & 0x1F) << shift, starts)
    negative = (digits[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run i (i >= 3) = stored value + run i - 2
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        raise ValueError("compressed RLE holds a negative run length")
    return runs.tolist()


# 12 digits hold 60 bits: far beyond any image's pixel count, and safe from int64 overflow.
_MAX_RUN_DIGITS = 12


def rasterize_polygons(
    polygons: Polygons, height: int, width: int, *, sx: float = 1.0, sy: float = 1.0
) -> np.ndarray:
    """The HxW mask covered by the union of polygons, their x scaled by sx and y by sy.

    Rasterising the scaled polygon at the target size is exact: no resampling of a mask.
    Each polygon must have at least 3 points (pycocotools reads a 2-point polygon as a box).
    """
    scaled = []
    for polygon in polygons:
        coords = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * (sx, sy)
        if len(coords) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(coords)}")
        scaled.append(coords.ravel().tolist())
    if not scaled:
        return np.zeros((height, width), np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(scaled, height, width))
    return mask_utils.decode(rle)


def segmentation_rle(segmentation: Polygons | dict[str, Any], height: int, width: int) -> dict:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as compressed RLE."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": [height, width], "counts": segmentation["counts"]}
    return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in segmentation], height, width))


def decode_segmentation(
    segmentation: Polygons | dict[str, Any], height: int, width: int
) -> np.ndarray:
    """The HxW mask of a COCO segmentation (validated beforehand: see coco_validate)."""
    if isinstance(segmentation, dict):
        return mask_utils.decode(segmentation_rle(segmentation, height, width))
    return rasterize_polygons(segmentation, height, width)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a mask with bilinear (area-weighted when shrinking) weights, then threshold at 0.5."""
    if mask.shape == (height, width):
        return mask.astype(np.uint8, copy=False)
    image = Image.fromarray((mask != 0).astype(np.uint8) * 255)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return (resized >= 128).astype(np.uint8)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 [N, 4] boxes (x1, y1, x2, y2) enclosing each mask's pixels, in pixel edges.

    A pixel (row r, column c) covers [c, c + 1) x [r, r + 1), so a one-pixel mask at (0, 0)
    has box (0, 0, 1, 1), as COCO's ``toBbox``. An empty mask gives a zero box.
    """
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes
