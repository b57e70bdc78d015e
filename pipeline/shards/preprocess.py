"""Preprocess one split: COCO images and annotations -> Parquet shards, on Ray Data.

The images, in image-id order, are cut into shards of ``rows_per_shard``. One Ray task (one
CPU) per shard decodes, resizes and encodes its images, rasterises the masks, builds the RPN
targets and encodes the shard's Parquet file; the driver receives the files in order (Ray
Data's preserve_order) and only writes them. So the driver does not limit how many nodes can
work (docs/benchmarks.md, "Preprocess"), memory holds a few shards whatever the dataset size,
and the output does not depend on how the work was scheduled.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from maskrcnn.anchors import anchor_grid
from maskrcnn.box_ops import hflip_boxes
from maskrcnn.config import ModelConfig
from maskrcnn.rpn_targets import build_rpn_targets
from pipeline.coco.masks import encode_rle, encode_rles, masks_to_boxes
from pipeline.coco.reader import (
    DataError,
    ImageRecord,
    instance_boxes,
    instance_masks,
    load_image,
    read_coco,
)
from pipeline.io import storage
from pipeline.io.images import canvas_scale, resized_size
from pipeline.io.ray_runtime import ensure_ray
from pipeline.shards.schema import rows_to_table, shard_metadata
from pipeline.shards.writer import SplitWriter, encode_shard

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("jpeg", "png")


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
    be a local path or a URI (``pipeline.io.storage``). On a multi-node cluster, Ray workers open
    the image files: ``images_dir`` must be the same path on every node (a shared filesystem)
    or object storage. The tasks encode the shards and the driver writes them, so only the
    driver needs write access to ``out_dir``.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
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
    records = index.records  # sorted by image id
    groups = [records[i : i + rows_per_shard] for i in range(0, len(records), rows_per_shard)]
    log.info("%s: %d images in %d shards, one Ray task each", out_dir, len(records), len(groups))
    ensure_ray(ray_address)
    encoded = _encoded_dataset(
        groups,
        encode={
            "model_config": model_config,
            "image_format": image_format,
            "jpeg_quality": jpeg_quality,
            "metadata": metadata,
        },
        progress=progress,
    )
    instances = crowd = 0
    with SplitWriter(out_dir, metadata=metadata) as writer:
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in batch.to_pylist():
                skipped += json.loads(shard["skipped"])
                instances += shard["instances"]
                crowd += shard["crowd"]
                if shard["rows"]:
                    writer.add_shard(shard["parquet"], shard["rows"])
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
    groups: list[list[ImageRecord]], *, encode: dict[str, Any], progress: bool
) -> ray.data.Dataset:
    """A lazy Ray dataset of encoded shards (one row each: Parquet bytes and counts), in order."""
    items = [{"records": pickle.dumps(group)} for group in groups]
    source = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    context = source.context  # this dataset's own copy of the DataContext
    context.execution_options.preserve_order = True
    context.enable_progress_bars = progress
    # Per-operator resource reservation keeps half the CPUs back for other operators; with a
    # single map operator it only halves the parallelism on small machines (measured on 2 CPUs:
    # 1.0 task at a time instead of 1.7; docs/benchmarks.md, "Preprocess").
    context.op_resource_reservation_enabled = False
    return source.map_batches(
        encode_shard_task, batch_size=1, batch_format="pyarrow", num_cpus=1, fn_kwargs=encode
    )


def encode_shard_task(
    batch: pa.Table,
    *,
    model_config: ModelConfig,
    image_format: str,
    jpeg_quality: int,
    metadata: dict[str, Any],
) -> pa.Table:
    """Ray task: one shard's pickled ImageRecords -> its Parquet bytes, counts and skips."""
    torch.set_num_threads(1)
    records: list[ImageRecord] = pickle.loads(batch["records"][0].as_py())
    rows, skipped = [], []
    for record in records:
        try:
            rows.append(
                encode_record(
                    record,
                    model_config=model_config,
                    image_format=image_format,
                    jpeg_quality=jpeg_quality,
                )
            )
        except DataError as error:
            skipped.append(_skip_entry(error.file, error.record, error.reason))
    iscrowd = [flag for row in rows for flag in row["iscrowd"]]
    shard = {
        "parquet": encode_shard(rows_to_table(rows), metadata) if rows else b"",
        "rows": len(rows),
        "instances": len(iscrowd),
        "crowd": int(sum(iscrowd)),
        "skipped": json.dumps(skipped),
    }
    return pa.Table.from_pylist([shard], schema=_SHARD_TASK_SCHEMA)


_SHARD_TASK_SCHEMA = pa.schema(
    [
        ("parquet", pa.large_binary()),  # a shard may exceed the 2 GiB of a plain binary
        ("rows", pa.int64()),
        ("instances", pa.int64()),
        ("crowd", pa.int64()),
        ("skipped", pa.string()),
    ]
)


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
    flipped = hflip_boxes(torch.from_numpy(boxes), width).numpy()
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


def _skip_entry(file: str | Path, record: Any, reason: str) -> dict[str, Any]:
    return {"file": str(file), "record": str(record), "reason": str(reason)}
