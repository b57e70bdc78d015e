"""Preprocess one split: COCO images and annotations -> Parquet shards, on Ray Data.

Ray tasks (one CPU each) decode, resize and encode the images, rasterise the masks and build
the RPN targets; the driver receives their rows in image-id order (Ray Data's preserve_order)
and writes the shards as they fill, so memory holds about one shard, whatever the dataset size,
and the output does not depend on how the work was scheduled.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from PIL import Image

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import ModelConfig
from maskrcnn.rpn_targets import build_rpn_targets

from . import storage
from .coco import DataError, ImageRecord, instance_boxes, instance_masks, load_image, read_coco
from .images import resized_size
from .masks import encode_rle, encode_rles, masks_to_boxes
from .ray_runtime import ensure_ray
from .shard_writer import SplitWriter
from .shards import SCHEMA, rows_to_table, shard_metadata

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("jpeg", "png")
# Images per Ray task: enough to amortise Ray's per-block overhead (8 vs 4: +9-12 % images/s,
# docs/benchmarks.md, "Preprocess"), few enough to balance small splits.
IMAGES_PER_TASK = 8
_SKIP = "skip"  # an extra column of the task output: JSON of a skipped image, else null
_TASK_SCHEMA = SCHEMA.append(pa.field(_SKIP, pa.string()))


def canvas_scale(height: int, width: int, canvas: int) -> float:
    """Canvas pixels per original pixel, as stored (float32): the longer side becomes canvas."""
    return float(np.float32(canvas / max(height, width)))


def preprocess_split(
    *,
    annotation_file: storage.Location,
    images_dir: storage.Location,
    out_dir: storage.Location,
    model_config: ModelConfig,
    image_format: str = "jpeg",
    jpeg_quality: int = 95,
    rows_per_shard: int = 256,
    ray_address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/part-NNNNN.parquet`` and ``out_dir/manifest.json``; returns the manifest.

    The split is named after ``out_dir``. Unusable records are skipped and listed in the
    manifest with their reason; a split left with no image is a DataError. Every location may
    be a local path or a URI (``pipeline.storage``). On a multi-node cluster, Ray workers open
    the image files: ``images_dir`` must be the same path on every node (a shared filesystem)
    or object storage; the driver writes the shards.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    index = read_coco(annotation_file, images_dir)
    out_dir = storage.locate(out_dir)
    metadata = shard_metadata(
        model_config=model_config,
        categories=index.categories,
        annotation_sha256=index.sha256,
        split=out_dir.name if isinstance(out_dir, Path) else out_dir.rsplit("/", 1)[-1],
        image_format=image_format,
    )
    skipped = [_skip_entry(s.file, s.record, s.reason) for s in index.skipped]
    ensure_ray(ray_address)
    encoded = _encoded_dataset(
        index.records,
        model_config=model_config,
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        progress=progress,
    )
    instances = crowd = 0
    with SplitWriter(out_dir, metadata=metadata, rows_per_shard=rows_per_shard) as writer:
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            failed = pc.is_valid(batch[_SKIP])
            skipped += [json.loads(s) for s in batch.filter(failed)[_SKIP].to_pylist()]
            rows = batch.filter(pc.invert(failed)).drop_columns([_SKIP])
            iscrowd = pc.list_flatten(rows["iscrowd"])
            instances += len(iscrowd)
            crowd += pc.sum(iscrowd).as_py() or 0
            writer.add(rows)
        if writer.rows == 0:
            raise DataError(annotation_file, "images", "no usable images: every image was skipped")
        counts = {"images": writer.rows, "instances": instances, "crowd": crowd, "skipped": skipped}
        manifest = writer.finish(counts)
    log.info(
        "%s: %d images, %d instances (%d crowd), %d skipped, %d shards, %.1f MB",
        out_dir,
        writer.rows,
        instances,
        crowd,
        len(skipped),
        len(writer.shards),
        manifest["counts"]["bytes_written"] / 1e6,
    )
    return manifest


def _encoded_dataset(
    records: list[ImageRecord],
    *,
    model_config: ModelConfig,
    image_format: str,
    jpeg_quality: int,
    progress: bool,
) -> ray.data.Dataset:
    """A lazy Ray dataset of encoded rows (plus the skip column), in image-id order."""
    records = sorted(records, key=lambda r: r.image_id)
    items = [{"image_id": r.image_id, "record": pickle.dumps(r)} for r in records]
    blocks = max(1, math.ceil(len(items) / IMAGES_PER_TASK))
    source = ray.data.from_items(items, override_num_blocks=blocks)
    context = source.context  # this dataset's own copy of the DataContext
    context.execution_options.preserve_order = True
    context.enable_progress_bars = progress
    # Per-operator resource reservation keeps half the CPUs back for other operators; with a
    # single map operator it only halves the parallelism on small machines (measured on 2 CPUs:
    # 1.0 task at a time instead of 1.7; docs/benchmarks.md, "Preprocess").
    context.op_resource_reservation_enabled = False
    return source.map_batches(
        encode_batch,
        batch_size=IMAGES_PER_TASK,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={
            "model_config": model_config,
            "image_format": image_format,
            "jpeg_quality": jpeg_quality,
        },
    )


def encode_batch(
    batch: pa.Table, *, model_config: ModelConfig, image_format: str, jpeg_quality: int
) -> pa.Table:
    """Ray task: pickled ImageRecords -> shard rows, with a skip entry for unusable images."""
    torch.set_num_threads(1)
    options = {"model_config": model_config, "image_format": image_format}
    rows, skips = [], []
    for blob in batch["record"].to_pylist():
        record: ImageRecord = pickle.loads(blob)
        try:
            rows.append(encode_record(record, **options, jpeg_quality=jpeg_quality))
            skips.append(None)
        except DataError as error:
            rows.append(_placeholder_row(record))
            skips.append(json.dumps(_skip_entry(error.file, error.record, error.reason)))
    table = rows_to_table(rows)
    return table.append_column(_TASK_SCHEMA.field(_SKIP), pa.array(skips, pa.string()))


def encode_record(
    record: ImageRecord, *, model_config: ModelConfig, image_format: str, jpeg_quality: int
) -> dict[str, Any]:
    """One image's shard row: resized image, masks, boxes and RPN targets (plain and flipped)."""
    pixels = load_image(record)
    scale = canvas_scale(record.height, record.width, model_config.canvas)
    height, width = resized_size(record.height, record.width, scale)
    resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    masks = instance_masks(record, scale=scale)
    boxes = instance_boxes(record, scale=scale)
    iscrowd = np.array([i.iscrowd for i in record.instances], dtype=bool)
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return {
        "image_id": record.image_id,
        "file_name": record.file_name,
        "height": record.height,
        "width": record.width,
        "scale": scale,
        "image": encode_image(resized, image_format=image_format, jpeg_quality=jpeg_quality),
        "boxes": boxes,
        "labels": np.array([i.label for i in record.instances], dtype=np.int32),
        "iscrowd": iscrowd,
        "masks": encode_rles(masks),
        **_mask_crops(masks),
        **_rpn_columns("rpn_", boxes, iscrowd, model_config),
        **_rpn_columns("rpn_flip_", flipped, iscrowd, model_config),
    }


def _mask_crops(masks: np.ndarray) -> dict[str, Any]:
    """Each mask's pixel rectangle and the RLE of the mask inside it (empty for an empty mask)."""
    rects = masks_to_boxes(masks).astype(np.int32)
    crops = [
        encode_rle(mask[y1:y2, x1:x2]) if x2 > x1 else b""
        for mask, (x1, y1, x2, y2) in zip(masks, rects, strict=True)
    ]
    return {"mask_crop_boxes": rects, "mask_crops": crops}


def _rpn_columns(
    prefix: str, boxes: np.ndarray, iscrowd: np.ndarray, model_config: ModelConfig
) -> dict[str, np.ndarray]:
    grid = anchor_grid(model_config.canvas, model_config.anchors)
    targets = build_rpn_targets(
        grid, torch.from_numpy(boxes), torch.from_numpy(iscrowd), model_config.rpn
    )
    return {
        f"{prefix}pos": targets.pos.numpy(),
        f"{prefix}pos_deltas": targets.pos_deltas.numpy(),
        f"{prefix}ignore": targets.ignore.numpy(),
    }


def encode_image(image: Image.Image, *, image_format: str, jpeg_quality: int) -> bytes:
    """JPEG or PNG bytes with fixed settings, so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=2, optimize=False)
    else:
        image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _placeholder_row(record: ImageRecord) -> dict[str, Any]:
    """The row of a skipped image: it keeps the batch's shape and is dropped by the driver."""
    empty = np.zeros(0)
    row: dict[str, Any] = {name: empty for name in SCHEMA.names}
    row.update(
        image_id=record.image_id,
        file_name=record.file_name,
        height=record.height,
        width=record.width,
        scale=0.0,
        image=b"",
        masks=[],
        mask_crops=[],
    )
    return row


def _skip_entry(file: str | Path, record: Any, reason: str) -> dict[str, Any]:
    return {"file": str(file), "record": str(record), "reason": str(reason)}
