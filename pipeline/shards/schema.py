"""The Parquet shard format (a contract: see ARCHITECTURE.md, "Shard format").

One row per image: the resized image, its instances at the resized size, and its RPN anchor
targets (plain and for the horizontally flipped image) at each training scale of the split
(metadata ``train_scales``: the image is stored once, only the small target lists repeat).
This module owns the schema, the metadata every shard carries, building Arrow tables from
per-image rows, reading a finished split, and checking that shards fit a model configuration
(``writer`` writes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from maskrcnn.anchors import anchor_config_hash, anchor_signature
from maskrcnn.config import ModelConfig, RPNConfig
from pipeline.io import storage

FORMAT_VERSION = 2
METADATA_KEY = b"maskrcnn"
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"

_BOXES = pa.list_(pa.list_(pa.float32(), 4))
_INDICES = pa.list_(pa.int32())
# One entry per training scale (metadata ``train_scales``, in order).
_SCALED_BOXES = pa.list_(_BOXES)
_SCALED_INDICES = pa.list_(_INDICES)

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("scale", pa.float32()),
        ("image", pa.binary()),
        ("boxes", _BOXES),
        ("labels", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.bool_())),
        ("masks", pa.list_(pa.binary())),
        # The RPN targets, one list per training scale, of that scale's image top-left on the
        # canvas.
        ("rpn_pos", _SCALED_INDICES),
        ("rpn_pos_deltas", _SCALED_BOXES),
        ("rpn_ignore", _SCALED_INDICES),
        # Targets for the horizontally flipped image (docs/design.md: stored, not permuted).
        ("rpn_flip_pos", _SCALED_INDICES),
        ("rpn_flip_pos_deltas", _SCALED_BOXES),
        ("rpn_flip_ignore", _SCALED_INDICES),
        # Canvas pixels per original pixel at each training scale (like ``scale``): the image
        # at scale k is the stored one resized to round(h * s_k) x round(w * s_k).
        ("target_scales", pa.list_(pa.float32())),
        # Each mask cropped to its pixel rectangle (x1, y1, x2, y2 at the resized size) as
        # compressed RLE: the loader decodes and pastes only the crop, several times faster
        # than the full-size ``masks`` (docs/benchmarks.md, "Loader").
        ("mask_crop_boxes", pa.list_(pa.list_(pa.int32(), 4))),
        ("mask_crops", pa.list_(pa.binary())),
    ]
)
_FIXED4_COLUMNS = {"boxes": np.float32, "mask_crop_boxes": np.int32}
_NUMERIC_LIST_COLUMNS = {"labels": np.int32, "iscrowd": np.bool_, "target_scales": np.float32}
TARGET_COLUMNS = (
    "rpn_pos",
    "rpn_pos_deltas",
    "rpn_ignore",
    "rpn_flip_pos",
    "rpn_flip_pos_deltas",
    "rpn_flip_ignore",
)


def matching_params(rpn: RPNConfig) -> dict[str, float]:
    """The RPN settings that stored targets depend on (besides the anchors)."""
    return {
        "fg_iou_thresh": rpn.fg_iou_thresh,
        "bg_iou_thresh": rpn.bg_iou_thresh,
        "crowd_ioa_thresh": rpn.crowd_ioa_thresh,
    }


def model_anchor_hash(config: ModelConfig) -> str:
    """The hash of the anchors and matching a model expects its shards to be built with."""
    return anchor_config_hash(config.canvas, config.anchors, matching=matching_params(config.rpn))


def shard_metadata(
    *,
    model_config: ModelConfig,
    categories: Sequence[dict[str, Any]],
    annotation_sha256: str,
    split: str,
    image_format: str,
    train_scales: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """The JSON metadata stored in every shard of a split and in its manifest."""
    signature = anchor_signature(model_config.canvas, model_config.anchors)
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "canvas": model_config.canvas,
        "anchors": signature,
        "matching": matching_params(model_config.rpn),
        "anchor_config_hash": model_anchor_hash(model_config),
        "num_anchors": signature["num_anchors"],
        "categories": [
            {"id": int(c["id"]), "name": str(c["name"]), "label": int(c["label"])}
            for c in categories
        ],
        "annotation_sha256": annotation_sha256,
        "image_format": image_format,
        "train_scales": [float(r) for r in train_scales],
    }


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """An Arrow table in ``SCHEMA`` from per-image dicts of plain values and numpy arrays.

    Array columns are built from offsets and flat numpy values, not Python lists, so that
    thousands of anchor indices per image cost a copy, not a Python loop.
    """
    columns = []
    for field in SCHEMA:
        values = [row[field.name] for row in rows]
        if field.name in TARGET_COLUMNS:
            width = 4 if field.name.endswith("deltas") else None
            dtype = np.float32 if width else np.int32
            columns.append(_scaled_list_array(values, dtype, width=width))
        elif field.name in _FIXED4_COLUMNS:
            columns.append(_list_array(values, _FIXED4_COLUMNS[field.name], width=4))
        elif field.name in _NUMERIC_LIST_COLUMNS:
            columns.append(_list_array(values, _NUMERIC_LIST_COLUMNS[field.name]))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _list_array(values: Sequence[Any], dtype: type, *, width: int | None = None) -> pa.Array:
    arrays = [np.asarray(v, dtype=dtype).reshape(-1, width or 1) for v in values]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).reshape(-1) if arrays else np.zeros(0, dtype)
    items = pa.array(flat)
    if width is not None:
        items = pa.FixedSizeListArray.from_arrays(items, width)
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def _scaled_list_array(
    values: Sequence[Sequence[Any]], dtype: type, *, width: int | None = None
) -> pa.Array:
    """A list (one entry per scale) of lists per row, from per-row lists of numpy arrays."""
    inner = _list_array([v for row in values for v in row], dtype, width=width)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in values], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def read_manifest(split_dir: storage.Location) -> dict[str, Any]:
    """The manifest of a finished split (a path or a URI); ValueError when it holds none.

    The manifest is written after every part, so its presence means the split is whole.
    """
    try:
        return storage.read_json(storage.join(split_dir, MANIFEST))
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(
            f"{split_dir}: no {MANIFEST}, so not a finished preprocess output "
            "(run the preprocess stage for this split)"
        ) from None


def shard_files(
    split_dir: storage.Location, *, manifest: Mapping[str, Any] | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    """A finished split's filesystem and its parts' paths on it, in order: what
    ``pyarrow.parquet`` and ``ray.data.read_parquet`` read from any storage (``filesystem=``),
    including fsspec-only protocols that they cannot resolve from a URI.

    The filesystem is resolved once per split (on S3 each resolution looks up the region).
    ``manifest`` is the split's manifest when the caller has already read it.
    """
    if manifest is None:
        manifest = read_manifest(split_dir)
    names = [shard["file"] for shard in manifest["shards"]]
    fs, root = storage.filesystem(split_dir)
    paths = [f"{root.rstrip('/')}/{name}" for name in names]
    found = fs.get_file_info(paths)
    missing = [
        storage.join(split_dir, name)
        for name, info in zip(names, found, strict=True)
        if info.type != pafs.FileType.File
    ]
    if missing:
        raise ValueError(f"{split_dir}: shards listed in {MANIFEST} are missing: {missing[:3]}")
    return fs, paths


def check_compatible(
    source: storage.Location | dict[str, Any],
    model_config: ModelConfig,
    *,
    train_scales: Sequence[float] | None = None,
) -> dict:
    """The shards' metadata, or ValueError when they were built for other anchors or matching,
    or (when ``train_scales`` is given) with targets for other training scales.

    ``source`` is a split directory (its manifest is read) or metadata already read.
    """
    where = "shards" if isinstance(source, dict) else f"shards in {source}"
    metadata = source if isinstance(source, dict) else read_manifest(source)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} have format version {version}; this code reads version {FORMAT_VERSION}: "
            "run the preprocess stage again"
        )
    expected = model_anchor_hash(model_config)
    built_for = (metadata.get("canvas"), metadata.get("anchor_config_hash"))
    if built_for != (model_config.canvas, expected):
        raise ValueError(
            f"{where} were built for canvas {metadata.get('canvas')} with anchor config hash "
            f"{metadata.get('anchor_config_hash')}, but the model has canvas {model_config.canvas} "
            f"and anchor config hash {expected}: run the preprocess stage with the model's "
            "canvas, anchors and RPN thresholds"
        )
    stored = metadata.get("train_scales")
    if train_scales is not None and stored != [float(r) for r in train_scales]:
        raise ValueError(
            f"{where} hold RPN targets for train_scales {stored}, but the training asks for "
            f"{[float(r) for r in train_scales]}: run the preprocess stage with "
            "preprocess.train_scales set as the training wants"
        )
    return metadata
