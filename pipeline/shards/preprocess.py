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
from collections import Counter
from collections.abc import Sequence
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
from pipeline.io.console import ImageProgress
from pipeline.io.images import canvas_scale, resized_size
from pipeline.io.ray_runtime import ensure_ray
from pipeline.shards.schema import TARGET_COLUMNS, rows_to_table, shard_metadata
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
    train_scales: tuple[float, ...] = (1.0,),
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

    ``train_scales`` (factors in (0, 1]) apply to the split named ``train``: its rows hold the
    RPN targets of the image resized so its longer side is round(r * canvas), for each r.
    Every other split keeps the canvas scale only (``[1.0]``). ``progress``: a bar on a
    terminal, else a line every few seconds (``pipeline.io.console``); False: neither.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    index = read_coco(annotation_file, images_dir)
    out_dir = storage.locate(out_dir)
    split = out_dir.name if isinstance(out_dir, Path) else out_dir.rsplit("/", 1)[-1]
    scales = _split_scales(split, train_scales, model_config.canvas)
    metadata = shard_metadata(
        model_config=model_config,
        categories=index.categories,
        annotation_sha256=index.sha256,
        split=split,
        image_format=image_format,
        train_scales=scales,
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
    )
    instances = crowd = 0
    label_images: Counter[str] = Counter()
    target_bytes = np.zeros(len(scales), dtype=np.int64)
    meter = ImageProgress(f"preprocess {split}", total=len(records), enabled=progress)
    with SplitWriter(out_dir, metadata=metadata) as writer, meter:
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in batch.to_pylist():
                task_skipped = json.loads(shard["skipped"])
                skipped += task_skipped
                instances += shard["instances"]
                crowd += shard["crowd"]
                label_images.update(json.loads(shard["label_images"]))
                target_bytes += json.loads(shard["target_bytes"])
                if shard["rows"]:
                    writer.add_shard(shard["parquet"], shard["rows"])
                meter.add(shard["rows"] + len(task_skipped))
        if writer.rows == 0:
            raise DataError(annotation_file, "images", "no usable images: every image was skipped")
        counts = {
            "images": writer.rows,
            "instances": instances,
            "crowd": crowd,
            "skipped": skipped,
            # Images holding each label (non-crowd): the category frequencies of repeat-factor
            # sampling (pipeline.training.loader.repeat_factors).
            "images_per_label": dict(sorted(label_images.items(), key=lambda kv: int(kv[0]))),
            # Uncompressed bytes of the RPN target lists (plain and flipped) per image, at each
            # training scale: what a scale costs in storage (docs/benchmarks.md).
            "target_bytes_per_image": [round(b / writer.rows, 1) for b in target_bytes.tolist()],
        }
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
    groups: list[list[ImageRecord]], *, encode: dict[str, Any]
) -> ray.data.Dataset:
    """A lazy Ray dataset of encoded shards (one row each: Parquet bytes and counts), in order."""
    items = [{"records": pickle.dumps(group)} for group in groups]
    source = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    context = source.context  # this dataset's own copy of the DataContext
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # ours instead (ImageProgress): one bar, or lines
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
                    train_scales=metadata["train_scales"],
                )
            )
        except DataError as error:
            skipped.append(_skip_entry(error.file, error.record, error.reason))
    iscrowd = [flag for row in rows for flag in row["iscrowd"]]
    label_images = Counter(
        str(label) for row in rows for label in set(row["labels"][~row["iscrowd"]].tolist())
    )
    target_bytes = [  # as stored: int32 indices, float32 deltas
        sum(row[name][k].size * 4 for row in rows for name in TARGET_COLUMNS)
        for k in range(len(metadata["train_scales"]))
    ]
    shard = {
        "parquet": encode_shard(rows_to_table(rows), metadata) if rows else b"",
        "rows": len(rows),
        "instances": len(iscrowd),
        "crowd": int(sum(iscrowd)),
        "skipped": json.dumps(skipped),
        "label_images": json.dumps(label_images),
        "target_bytes": json.dumps(target_bytes),
    }
    return pa.Table.from_pylist([shard], schema=_SHARD_TASK_SCHEMA)


_SHARD_TASK_SCHEMA = pa.schema(
    [
        ("parquet", pa.large_binary()),  # a shard may exceed the 2 GiB of a plain binary
        ("rows", pa.int64()),
        ("instances", pa.int64()),
        ("crowd", pa.int64()),
        ("skipped", pa.string()),
        ("label_images", pa.string()),
        ("target_bytes", pa.string()),
    ]
)


def encode_record(
    record: ImageRecord,
    *,
    model_config: ModelConfig,
    image_format: str,
    jpeg_quality: int,
    train_scales: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """One image's shard row: resized image, masks, boxes and RPN targets (plain and flipped)
    at each training scale."""
    pixels = load_image(record)
    scale = canvas_scale(record.height, record.width, model_config.canvas)
    height, width = resized_size(record.height, record.width, scale)
    resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    masks = instance_masks(record, scale=scale)
    boxes = instance_boxes(record, scale=scale)
    iscrowd = np.array([i.iscrowd for i in record.instances], dtype=bool)
    target_scales = [
        canvas_scale(record.height, record.width, round(r * model_config.canvas))
        for r in train_scales
    ]
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
        "target_scales": np.array(target_scales, dtype=np.float32),
        **_scaled_rpn_columns(record, target_scales, iscrowd, model_config),
    }


def _split_scales(split: str, train_scales: Sequence[float], canvas: int) -> tuple[float, ...]:
    """The training scales a split stores targets for: the train split's, [1.0] for others."""
    scales = tuple(float(r) for r in train_scales)
    if not scales or len(set(scales)) != len(scales) or not all(0 < r <= 1 for r in scales):
        raise ValueError(f"train_scales must be distinct factors in (0, 1], got {list(scales)}")
    if any(round(r * canvas) < 1 for r in scales):
        raise ValueError(f"train_scales {list(scales)} make an empty image on canvas {canvas}")
    return scales if split == "train" else (1.0,)


def _scaled_rpn_columns(
    record: ImageRecord,
    target_scales: Sequence[float],
    iscrowd: np.ndarray,
    model_config: ModelConfig,
) -> dict[str, list[np.ndarray]]:
    """Each target column as a list over the scales: the image resized by each pixel scale,
    top-left on the canvas, plain and flipped within its own width."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in TARGET_COLUMNS}
    for scale in target_scales:
        boxes = instance_boxes(record, scale=scale)
        width = resized_size(record.height, record.width, scale)[1]
        flipped = hflip_boxes(torch.from_numpy(boxes), width).numpy()
        for prefix, b in (("rpn_", boxes), ("rpn_flip_", flipped)):
            for name, value in _rpn_columns(prefix, b, iscrowd, model_config).items():
                columns[name].append(value)
    return columns


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
