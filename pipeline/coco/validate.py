"""Checks of one COCO annotation against its image: the geometry half of reading COCO.

``check_annotation`` returns the annotation's box (x1, y1, x2, y2, clipped to the image) and its
segmentation (polygons clipped to the image, or a checked RLE), or raises ``Rejected`` with a
reason that the reader records as a counted skip. Pure functions of plain data, so each bad case
is easy to test on its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.coco.masks import compressed_rle_counts

Box = tuple[float, float, float, float]
Segmentation = list[list[float]] | dict[str, Any]


class Rejected(Exception):
    """An annotation that cannot be used; ``reason`` says why, for the skip list."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_annotation(ann: dict[str, Any], height: int, width: int) -> tuple[Box, Segmentation]:
    """The clipped box and checked segmentation of ``ann`` on a height x width image."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        segmentation = check_rle(segmentation, height, width)
    elif isinstance(segmentation, list) and segmentation:
        segmentation = clip_polygons(segmentation, height, width)
    else:
        raise Rejected("no segmentation (neither polygons nor RLE): a mask is needed to train")
    if ann.get("bbox") is not None:
        return check_box(ann["bbox"], height, width), segmentation
    return segmentation_box(segmentation, height, width), segmentation


def crowd_flag(value: Any) -> bool:
    """COCO's ``iscrowd``: 0 or 1, also as a bool or the strings "0" and "1" (some exporters
    write strings; ``bool("0")`` would be True)."""
    if isinstance(value, int) and value in (0, 1):  # bool is an int
        return bool(value)
    if value in ("0", "1"):
        return value == "1"
    raise Rejected(f"iscrowd must be 0 or 1 (or the string '0' or '1'), got {value!r}")


def check_box(bbox: Any, height: int, width: int) -> Box:
    """A COCO (x, y, w, h) box as (x1, y1, x2, y2) clipped to the image."""
    if not _is_numbers(bbox) or len(bbox) != 4:
        raise Rejected(f"bbox is not 4 finite numbers: {bbox!r:.80}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise Rejected(f"zero-area box (w={w:g}, h={h:g})")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        raise Rejected(f"box {[x, y, w, h]} lies wholly outside the {height}x{width} image")
    return (x1, y1, x2, y2)


def clip_polygons(polygons: list[Any], height: int, width: int) -> list[list[float]]:
    """Polygons clipped to the image; degenerate parts dropped, Rejected when none is left."""
    kept: list[list[float]] = []
    problems: list[str] = []
    for polygon in polygons:
        if not _is_numbers(polygon):
            raise Rejected(f"polygon is not a list of finite numbers: {polygon!r:.80}")
        if len(polygon) % 2:
            raise Rejected(f"polygon has an odd number of coordinates ({len(polygon)})")
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            problems.append(f"polygon with fewer than 3 points ({len(points)})")
        elif polygon_area(points) == 0:
            problems.append("zero-area polygon")
        else:
            clipped = clip_to_rectangle(points, width, height)
            if len(clipped) < 3 or polygon_area(clipped) == 0:
                problems.append(f"polygon lies wholly outside the {height}x{width} image")
            else:
                kept.append(polygon if clipped is points else clipped.ravel().tolist())
    if not kept:
        raise Rejected("; ".join(dict.fromkeys(problems)))
    return kept


def check_rle(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """An RLE whose size is the image's and whose runs cover it exactly, with some foreground."""
    size, counts = rle.get("size"), rle.get("counts")
    if not _is_numbers(size) or [int(v) for v in size] != [height, width]:
        raise Rejected(f"RLE size {size!r:.40} differs from the image's [{height}, {width}]")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise Rejected("uncompressed RLE counts are not non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = compressed_rle_counts(counts)
        except ValueError as error:
            raise Rejected(f"malformed compressed RLE: {error}") from None
    else:
        raise Rejected(f"RLE counts are neither a list nor a string: {type(counts).__name__}")
    if sum(runs) != height * width:
        raise Rejected(f"RLE runs cover {sum(runs)} pixels, not {height}x{width}")
    if sum(runs[1::2]) == 0:
        raise Rejected("zero-area RLE mask")
    return {"size": [height, width], "counts": counts}


def segmentation_box(segmentation: Segmentation, height: int, width: int) -> Box:
    """The box enclosing a checked segmentation (used when an annotation has no bbox)."""
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        return (x, y, x + w, y + h)
    points = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segmentation])
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    return (float(x1), float(y1), float(x2), float(y2))


def polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon of [K, 2] points (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    wrap = x[-1] * y[0] - y[-1] * x[0]  # the closing edge, from the last point to the first
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + wrap) / 2)


def clip_to_rectangle(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon to [0, width] x [0, height].

    Returns ``points`` itself when it lies inside (so unclipped polygons stay byte-identical).
    """
    if (points >= 0).all() and (points <= (width, height)).all():
        return points
    for axis, limit, keep_below in (
        (0, 0.0, False),
        (0, width, True),
        (1, 0.0, False),
        (1, height, True),
    ):
        if len(points) == 0:
            break
        points = _clip_half_plane(points, axis, float(limit), keep_below)
    return points


def _clip_half_plane(points: np.ndarray, axis: int, limit: float, keep_below: bool) -> np.ndarray:
    """Keep the part of a polygon with coordinate ``axis`` <= limit (keep_below) or >= limit."""
    inside = points[:, axis] <= limit if keep_below else points[:, axis] >= limit
    out = []
    for i in range(len(points)):
        j = (i + 1) % len(points)
        if inside[i]:
            out.append(points[i])
        if inside[i] != inside[j]:
            t = (limit - points[i, axis]) / (points[j, axis] - points[i, axis])
            crossing = points[i] + t * (points[j] - points[i])
            crossing[axis] = limit
            out.append(crossing)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def _is_numbers(value: Any) -> bool:
    """A list or tuple of finite real numbers (bools excluded)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
