"""The built-in synthetic dataset: coloured shapes on textured backgrounds, written as real COCO.

It lets the whole pipeline run offline on a laptop, and it exercises what real data holds:
JPEG and PNG files of varied sizes and aspect ratios, non-contiguous category ids, polygon
segmentations, compressed RLE (rings, which have a hole, and instances that a later shape
partly covers: their visible part is what is annotated), uncompressed-RLE crowd regions
(clusters of small blobs, as COCO stores crowds) and images without instances. Shapes are large
and clear-edged and occlusion is limited, so that a small Mask R-CNN trained from scratch on a
few hundred images learns them. Every image comes from its own generator seeded by (seed,
split, index): the same seed gives byte-identical files.

Two knobs make harder settings for experiments (docs/experiments.md): ``object_scale``, the range
of a shape's size as a fraction of the image's shorter side (uniform; ``(0.05, 0.75)`` spans
about 8 px to most of the image), and ``class_weights``, the relative frequency of each kind in
the train split (``{"star": 0.05}`` makes stars rare). The val split keeps every kind equally
likely, as the test sets of long-tailed benchmarks (ImageNet-LT, CIFAR-LT) are balanced, so that
a rare class's AP is measured on as many instances as the others'. At their defaults the files
are those of earlier versions, byte for byte.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.coco.masks import encode_rle, rasterize_polygons, uncompressed_rle_counts

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
]
_KIND_IDS = {c["name"]: c["id"] for c in CATEGORIES}
_SPLIT_CODES = {"train": 0, "val": 1}
_FILE_PATTERN = re.compile(r"\d{6}\.(jpg|png)")
_OVERLAP_FRACTION = 0.35  # shapes that may be drawn over earlier ones
_MAX_OCCLUDED = 0.3  # an instance keeps at least 70% of its area visible
_PLACEMENT_TRIES = 20
_OBJECT_SCALE = (0.18, 0.42)  # the default size range, as a fraction of the shorter side
_MAX_OBJECT_SCALE = 0.75  # larger shapes do not fit inside the image with their margin
_STRETCH = (0.85, 1.15)  # per-axis stretch of a shape
_REACH = 1.12  # the farthest vertex of an outline, in radii (triangle and star tips)


@dataclass
class _Layer:
    """One drawn instance: its visible mask, and its polygon when it has no hole."""

    category_id: int
    iscrowd: bool
    mask: np.ndarray  # reduced to the visible part as later layers are drawn over it
    polygon: list[float] | None
    occluded: bool = False

    def __post_init__(self):
        self.full_area = int(self.mask.sum())


def write_shapes_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 400,
    n_val: int = 80,
    seed: int = 0,
    min_side: int = 160,
    max_side: int = 320,
    max_instances: int = 6,
    empty_fraction: float = 0.06,
    crowd_fraction: float = 0.1,
    jpeg_quality: int = 90,
    object_scale: tuple[float, float] = _OBJECT_SCALE,
    class_weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write out_dir/images/{train,val}/NNNNNN.{jpg,png} and annotations/instances_{split}.json.

    Returns a summary (paths relative to out_dir, and counts) for logging. Stale image files
    of an earlier run (same naming pattern) in the split folders are removed.
    """
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side} and {max_side}")
    if max_instances < 1 or n_train < 1 or n_val < 1:
        raise ValueError("n_train, n_val and max_instances must be at least 1")
    low, high = object_scale
    if not 0 < low <= high <= _MAX_OBJECT_SCALE:
        raise ValueError(f"need 0 < object_scale[0] <= object_scale[1] <= 0.75, got {object_scale}")
    out_dir = Path(out_dir)
    look = {
        "min_side": min_side,
        "max_side": max_side,
        "max_instances": max_instances,
        "empty_fraction": empty_fraction,
        "crowd_fraction": crowd_fraction,
        "object_scale": (float(low), float(high)),
    }
    train_kinds = _kind_probabilities(class_weights)
    summary: dict[str, Any] = {"categories": CATEGORIES}
    for split, count in (("train", n_train), ("val", n_val)):
        images_dir = out_dir / "images" / split
        images_dir.mkdir(parents=True, exist_ok=True)
        for stale in images_dir.iterdir():
            if _FILE_PATTERN.fullmatch(stale.name):
                stale.unlink()
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            kind_p = train_kinds if split == "train" else None
            pixels, layers = _random_image(rng, kind_p=kind_p, **look)
            image_id, (height, width) = index + 1, pixels.shape[:2]
            file_name = f"{image_id:06d}.{'jpg' if rng.random() < 0.5 else 'png'}"
            (images_dir / file_name).write_bytes(_encode(pixels, file_name, jpeg_quality))
            images.append(
                {"id": image_id, "file_name": file_name, "height": height, "width": width}
            )
            for layer in layers:
                ann = _annotation(layer, height, width)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        dataset = {
            "info": {"description": f"synthetic shapes, seed {seed}, split {split}"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        annotation_file = out_dir / "annotations" / f"instances_{split}.json"
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        annotation_file.write_text(json.dumps(dataset, separators=(",", ":")))
        summary[split] = _split_summary(out_dir, annotation_file, images_dir, dataset)
    return summary


def _kind_probabilities(class_weights: dict[str, float] | None) -> list[float] | None:
    """The probability of each kind (``CATEGORIES`` order) from relative weights by name
    (unnamed kinds weigh 1); None when all are equal, which draws as earlier versions did."""
    weights = dict(class_weights or {})
    unknown = sorted(set(weights) - set(_KIND_IDS))
    if unknown:
        raise ValueError(f"class_weights: unknown categories {unknown} (known: {list(_KIND_IDS)})")
    values = [float(weights.get(name, 1.0)) for name in _KIND_IDS]
    if min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"class_weights must be >= 0 and not all 0, got {class_weights}")
    if len(set(values)) == 1:
        return None
    return [v / sum(values) for v in values]


def _random_image(
    rng: np.random.Generator,
    *,
    min_side: int,
    max_side: int,
    max_instances: int,
    empty_fraction: float,
    crowd_fraction: float,
    object_scale: tuple[float, float],
    kind_p: list[float] | None,
) -> tuple[np.ndarray, list[_Layer]]:
    """An image of random size, its shapes (none on empty_fraction of them) and a crowd;
    ``kind_p``: the probability of each kind (None: equal)."""
    height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    if rng.random() < empty_fraction:
        return _draw_image(rng, height, width, [], object_scale=object_scale)
    count = rng.integers(1, max_instances + 1)
    kinds = [str(rng.choice(list(_KIND_IDS), p=kind_p)) for _ in range(count)]
    if rng.random() < crowd_fraction:
        kinds.insert(0, "crowd")  # drawn first, so shapes may partly cover it
    return _draw_image(rng, height, width, kinds, object_scale=object_scale)


def _draw_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    kinds: list[str],
    *,
    object_scale: tuple[float, float],
) -> tuple[np.ndarray, list[_Layer]]:
    """An image and its instances' visible masks (later layers drawn over earlier ones)."""
    pixels = _background(rng, height, width)
    background = pixels.reshape(-1, 3).mean(axis=0)
    layers: list[_Layer] = []
    for kind in kinds:
        may_overlap = rng.random() < _OVERLAP_FRACTION
        for _ in range(_PLACEMENT_TRIES):
            if kind == "crowd":
                layer = _crowd(rng, height, width)
            else:
                layer = _shape(rng, kind, height, width, object_scale)
            if _placement_allowed(layer.mask, layers, may_overlap):
                break
        else:
            continue  # no room for this shape: leave it out
        for below in layers:
            if (below.mask & layer.mask).any():
                below.mask &= 1 - layer.mask
                below.occluded = True
        _paint(pixels, layer.mask, rng, _shape_colour(rng, background))
        layers.append(layer)
    visible = [layer for layer in layers if layer.mask.any()]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), visible


def _placement_allowed(mask: np.ndarray, layers: list[_Layer], may_overlap: bool) -> bool:
    """Whether ``mask`` may be drawn: over nothing, or (when it may overlap) leaving every
    earlier instance mostly visible."""
    for layer in layers:
        covered = int((layer.mask & mask).sum())
        if covered and not may_overlap:
            return False
        if int(layer.mask.sum()) - covered < (1 - _MAX_OCCLUDED) * layer.full_area:
            return False
    return True


def _shape(
    rng: np.random.Generator, kind: str, height: int, width: int, scale: tuple[float, float]
) -> _Layer:
    """One shape, a fraction in ``scale`` of the image's shorter side across (by default
    18-42%), fully inside the image: on a small image a large one is capped to what fits."""
    shorter = min(height, width)
    fits = (shorter / 2 - 1) / (_STRETCH[1] * _REACH / 2)  # whatever the stretch drawn next
    size = min(rng.uniform(*scale) * shorter, fits)
    stretch = rng.uniform(*_STRETCH, size=2)
    radius = size / 2
    margin = radius * stretch.max() * _REACH + 1
    centre = rng.uniform((margin, margin), (width - margin, height - margin))
    angle = rng.uniform(0, 2 * np.pi)
    outline = _outline("circle" if kind == "ring" else kind, radius, angle)
    polygon = np.round(outline * stretch + centre, 2).ravel().tolist()
    mask = rasterize_polygons([polygon], height, width)
    if kind == "ring":  # a hole makes it a mask, not a polygon
        hole = np.round(
            _outline("circle", radius * rng.uniform(0.45, 0.6), angle) * stretch + centre, 2
        )
        mask &= 1 - rasterize_polygons([hole.ravel().tolist()], height, width)
        return _Layer(_KIND_IDS[kind], False, mask, None)
    return _Layer(_KIND_IDS[kind], False, mask, polygon)


def _crowd(rng: np.random.Generator, height: int, width: int) -> _Layer:
    """A crowd region: a cluster of 6-14 small blobs of one kind, annotated as one region."""
    kind = str(rng.choice(["circle", "square", "triangle", "star"]))
    extent = rng.uniform(0.25, 0.35) * min(height, width)
    corner = rng.uniform((4, 4), (width - extent - 4, height - extent - 4))
    blobs = []
    for _ in range(int(rng.integers(6, 15))):
        radius = rng.uniform(3.5, 6.5)
        centre = corner + rng.uniform(radius, extent - radius, size=2)
        outline = _outline(kind, radius, rng.uniform(0, 2 * np.pi))
        blobs.append(np.round(outline + centre, 2).ravel().tolist())
    mask = rasterize_polygons(blobs, height, width)
    return _Layer(_KIND_IDS[kind], True, mask, None)


def _outline(kind: str, radius: float, angle: float) -> np.ndarray:
    """[K, 2] vertices of a shape centred on (0, 0) and turned by ``angle``."""
    if kind == "circle":
        turns = angle + np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = np.full(32, radius)
    elif kind == "square":
        turns = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, radius * 1.1)  # a half-side of 0.78 radius
    elif kind == "triangle":
        turns = angle + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, radius * 1.12)
    elif kind == "star":
        turns = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2, radius * 0.48, radius * 1.12)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.stack([radii * np.cos(turns), radii * np.sin(turns)], axis=1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dull gradient with pixel noise and, on half of the images, faint stripes."""
    start, end = rng.uniform(50, 190, size=(2, 3))
    direction = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = (xs * np.cos(direction) + ys * np.sin(direction)) / max(height, width)
    t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    pixels = start + t[..., None] * (end - start)
    if rng.random() < 0.5:
        period, tilt = rng.uniform(6, 20), rng.uniform(0, np.pi)
        phase = (xs * np.cos(tilt) + ys * np.sin(tilt)) * (2 * np.pi / period)
        pixels += (rng.uniform(6, 14) * np.sin(phase))[..., None]
    pixels = pixels.astype(np.float32)
    pixels += rng.uniform(3, 10) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return pixels


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour that stands out from the background's mean colour."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        colour[rng.integers(3)] = rng.uniform(200, 255)  # at least one strong channel
        if np.abs(colour - background).sum() > 150:
            break
    return colour


def _paint(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator, colour: np.ndarray):
    """Fill a mask with a solid colour, stripes of two shades, or noisy colour."""
    ys, xs = np.nonzero(mask)
    texture = rng.choice(["solid", "solid", "stripes", "noise"])
    values = np.broadcast_to(colour, (len(ys), 3)).astype(np.float32)
    if texture == "stripes":
        period, tilt = rng.uniform(5, 14), rng.uniform(0, np.pi)
        band = np.sin((xs * np.cos(tilt) + ys * np.sin(tilt)) * (2 * np.pi / period)) > 0
        values = np.where(band[:, None], values, values * 0.6)
    elif texture == "noise":
        values = values + rng.normal(0, 18, size=values.shape)
    pixels[ys, xs] = values


def _annotation(layer: _Layer, height: int, width: int) -> dict[str, Any]:
    """COCO fields of a layer: polygon when wholly visible, else RLE of its visible part."""
    ys, xs = np.nonzero(layer.mask)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if layer.iscrowd:  # uncompressed RLE, as COCO stores crowd regions
        segmentation: Any = {"counts": uncompressed_rle_counts(layer.mask), "size": [height, width]}
    elif layer.polygon is not None and not layer.occluded:
        segmentation = [layer.polygon]
    else:
        segmentation = {"counts": encode_rle(layer.mask).decode("ascii"), "size": [height, width]}
    return {
        "category_id": layer.category_id,
        "iscrowd": int(layer.iscrowd),
        "area": float(layer.mask.sum()),
        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        "segmentation": segmentation,
    }


def _encode(pixels: np.ndarray, file_name: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    if file_name.endswith(".jpg"):
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _split_summary(out_dir: Path, annotation_file: Path, images_dir: Path, dataset: dict) -> dict:
    anns = dataset["annotations"]
    with_instances = {a["image_id"] for a in anns}
    return {
        "annotation_file": annotation_file.relative_to(out_dir).as_posix(),
        "images_dir": images_dir.relative_to(out_dir).as_posix(),
        "images": len(dataset["images"]),
        "empty_images": len(dataset["images"]) - len(with_instances),
        "instances": len(anns),
        "crowd": sum(a["iscrowd"] for a in anns),
        "polygons": sum(isinstance(a["segmentation"], list) for a in anns),
        "rle": sum(isinstance(a["segmentation"], dict) for a in anns),
        "png": sum(i["file_name"].endswith(".png") for i in dataset["images"]),
        "jpeg": sum(i["file_name"].endswith(".jpg") for i in dataset["images"]),
    }
