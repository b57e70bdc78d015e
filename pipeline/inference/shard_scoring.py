"""Detections for preprocessed shard rows in this process: the path shared by evaluation
during training and the evaluate stage when it runs without an actor pool.

The shards already hold each image resized onto the canvas, so a row only needs its JPEG or PNG
decoded (``decode_rgb``, the decoder of training and of the actor pool) before the Detector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.coco.cocoeval import to_coco_results
from pipeline.inference.detector import Detector
from pipeline.io import storage
from pipeline.io.images import decode_rgb
from pipeline.shards.schema import shard_files

ROW_COLUMNS = ["image_id", "file_name", "height", "width", "scale", "image"]


def iter_rows(split_dir: storage.Location, manifest: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A split's rows (``ROW_COLUMNS``), one shard file in memory at a time."""
    filesystem, paths = shard_files(split_dir, manifest=manifest)
    for path in paths:
        yield from pq.read_table(path, columns=ROW_COLUMNS, filesystem=filesystem).to_pylist()


def detect_rows(
    detector: Detector,
    rows: Sequence[Mapping[str, Any]],
    *,
    images: Sequence[np.ndarray] | None = None,
    score_threshold: float = 0.0,
) -> list[list[dict[str, Any]]]:
    """Each row's COCO results; ``images``: the rows' decoded pixels if at hand."""
    pixels = images if images is not None else [decode_rgb(row["image"]) for row in rows]
    detections = detector.detect_resized(
        pixels,
        scales=[float(row["scale"]) for row in rows],
        sizes=[(int(row["height"]), int(row["width"])) for row in rows],
        score_threshold=score_threshold,
    )
    return [
        to_coco_results(int(row["image_id"]), detection, detector.category_ids)
        for row, detection in zip(rows, detections, strict=True)
    ]


def batched(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
