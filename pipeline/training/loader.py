"""Shards -> model-ready batches: decode, pick a training scale, paste on the canvas, optional
flip, fresh RPN sample.

``decode_batch`` is the one place where a batch of shard rows becomes the model's input
(docs/design.md, "Model inputs"). Two ways to feed it: ``iter_batches`` reads shards with plain
pyarrow (tests, benchmarks, single-process use), and ``ray_dataset`` + ``make_collate_fn`` go
through Ray Data's ``iter_torch_batches`` for training. Crowd instances are dropped from the RoI
targets here: preprocessing kept them only to shape the RPN targets.

Multi-scale shards (metadata ``train_scales``) hold one set of RPN targets per scale: each image
gets one scale drawn uniformly each time it is yielded, its stored image and mask crops are
resized to that scale and its boxes scaled. With a single scale nothing is drawn or resized.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor
from torchvision.transforms.v2.functional import resize

from maskrcnn.anchors import anchor_grid
from maskrcnn.box_ops import hflip_boxes
from maskrcnn.config import ModelConfig
from maskrcnn.rpn_targets import RPNTargets, sample_rpn_targets
from pipeline.io import storage
from pipeline.io.images import decode_chw, resized_size
from pipeline.shards.schema import TARGET_COLUMNS, check_compatible, shard_files
from pipeline.training.batch import crop_targets, decode_crop, mask_crop_size, pack_batch
from pipeline.training.scales import draw_scale, rescale_instances

__all__ = [
    "ShardCollateFn",
    "check_compatible",
    "decode_batch",
    "iter_batches",
    "make_collate_fn",
    "ray_dataset",
]

Batch = pa.Table | Mapping[str, Any]
_FIXED4 = ("boxes", "mask_crop_boxes")
_INDEX_LISTS = ("labels", "iscrowd", "target_scales")
_SCALARS = ("image_id", "height", "width", "scale")
# What decode_batch reads: the full-size ``masks`` are left on disk (the crops say the same).
COLUMNS = (*_SCALARS, "image", "mask_crops", *_FIXED4, *_INDEX_LISTS, *TARGET_COLUMNS)


def decode_batch(
    batch: Batch,
    *,
    canvas: int,
    num_anchors: int,
    rpn_batch_size: int = 256,
    positive_fraction: float = 0.5,
    flip_prob: float = 0.0,
    generator: torch.Generator | None = None,
    crop_size: int | None = None,
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Shard rows -> ``images`` uint8 ``[B, 3, S, S]`` and one target dict per image.

    ``batch`` is a pyarrow Table of shard rows, or a dict of columns (numpy arrays as Ray's
    numpy batch format gives them, or lists). Each image is flipped horizontally with
    probability ``flip_prob`` (within its own width, using the stored flipped RPN targets);
    with several stored scales, one is drawn uniformly per image first. The RPN's anchor
    sample is drawn fresh from ``generator``. Masks are full-canvas ``masks``, or with
    ``crop_size`` M, ``mask_crops`` [N, M, M] + ``mask_boxes`` (``pipeline.training.batch``).
    """
    rows = _columns(batch)
    images = np.zeros((len(rows["image"]), 3, canvas, canvas), dtype=np.uint8)
    targets = []
    for i, canvas_image in enumerate(images):
        k, size = draw_scale(
            rows["target_scales"][i],
            stored_scale=rows["scale"][i],
            height=int(rows["height"][i]),
            width=int(rows["width"][i]),
            generator=generator,
        )
        flip = flip_prob > 0 and float(torch.rand((), generator=generator)) < flip_prob
        width = _paste_image(canvas_image, rows["image"][i], flip=flip, size=size)
        keep = ~rows["iscrowd"][i].astype(bool)
        prefix = "rpn_flip_" if flip else "rpn_"
        stored = RPNTargets(
            pos=torch.from_numpy(rows[prefix + "pos"][i][k].astype(np.int64)),
            pos_deltas=torch.from_numpy(np.array(rows[prefix + "pos_deltas"][i][k], np.float32)),
            ignore=torch.from_numpy(rows[prefix + "ignore"][i][k].astype(np.int64)),
        )
        sample = sample_rpn_targets(
            stored,
            num_anchors,
            batch_size=rpn_batch_size,
            positive_fraction=positive_fraction,
            generator=generator,
        )
        crops = [c for c, kept in zip(rows["mask_crops"][i], keep, strict=True) if kept]
        rects, boxes = rows["mask_crop_boxes"][i][keep], rows["boxes"][i][keep]
        if size is not None:
            stored = resized_size(
                int(rows["height"][i]), int(rows["width"][i]), float(rows["scale"][i])
            )
            crops, rects, boxes = rescale_instances(
                crops, rects, boxes, stored=stored, size=size, canvas_masks=crop_size is None
            )
        if crop_size is None:
            masks = {"masks": _canvas_masks(crops, rects, width, canvas, flip=flip)}
        else:
            masks = crop_targets(crops, rects, width, crop_size, flip=flip)
        targets.append(
            {
                "boxes": _boxes(boxes, width, flip=flip),
                "labels": torch.from_numpy(rows["labels"][i][keep].astype(np.int64)),
                **masks,
                "rpn_idx": sample.idx,
                "rpn_labels": sample.labels,
                "rpn_deltas": sample.deltas,
            }
        )
    return torch.from_numpy(images), targets


def _paste_image(
    canvas_image: np.ndarray, data: bytes, *, flip: bool, size: tuple[int, int] | None = None
) -> int:
    """Decode an encoded image into the top-left of ``canvas_image`` [3, S, S]; its width.
    ``size`` (height, width) resizes it first (bilinear, antialiased, as preprocess resizes).

    ``decode_chw`` is the decoder evaluation and serving use too, channels-first as pasted.
    """
    decoded = decode_chw(data)
    if size is not None and tuple(decoded.shape[1:]) != size:
        # Channels-last as decoded (no copy), torch's fast uint8 path: the same pixels.
        decoded = resize(decoded[None].contiguous(memory_format=torch.channels_last), list(size))[0]
    pixels = decoded.numpy()
    height, width = pixels.shape[1:]
    if height > canvas_image.shape[1] or width > canvas_image.shape[2]:
        raise ValueError(f"a {height}x{width} image does not fit the canvas {canvas_image.shape}")
    canvas_image[:, :height, :width] = pixels[:, :, ::-1] if flip else pixels
    return width


def _boxes(boxes: np.ndarray, width: int, *, flip: bool) -> Tensor:
    """float32 [N, 4] boxes, mirrored about the image's own width when flipped."""
    boxes = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    return hflip_boxes(boxes, width) if flip else boxes


def _canvas_masks(
    crops: list[bytes | np.ndarray], rects: np.ndarray, width: int, canvas: int, *, flip: bool
) -> Tensor:
    """``[N, S, S]`` masks from the crops (RLE, or pixels already decoded), each pasted at its
    rectangle (mirrored about the image width when flipped). Only the crops are decoded: far
    less than N full masks."""
    out = np.zeros((len(crops), canvas, canvas), dtype=np.uint8)
    for mask, crop, (x1, y1, x2, y2) in zip(out, crops, rects, strict=True):
        if x2 <= x1:
            continue  # the instance vanished at this size
        pixels = decode_crop(crop, (x1, y1, x2, y2))
        if flip:
            mask[y1:y2, width - x2 : width - x1] = pixels[:, ::-1]
        else:
            mask[y1:y2, x1:x2] = pixels
    return torch.from_numpy(out)


def _columns(batch: Batch) -> dict[str, list[Any]]:
    """Per-row values of each column: numpy arrays for numbers, bytes for images and masks."""
    if isinstance(batch, pa.Table):
        return _arrow_columns(batch)
    rows: dict[str, list[Any]] = {
        "image": list(batch["image"]),
        "mask_crops": [list(m) for m in batch["mask_crops"]],
    }
    for name in _SCALARS:
        rows[name] = list(batch[name])
    for name in _FIXED4:
        rows[name] = [_fixed4(v) for v in batch[name]]
    for name in _INDEX_LISTS:
        rows[name] = [np.asarray(v) for v in batch[name]]
    for name in TARGET_COLUMNS:
        per_scale = _fixed4 if name.endswith("deltas") else np.asarray
        rows[name] = [[per_scale(s) for s in v] for v in batch[name]]
    return rows


def _fixed4(value: Any) -> np.ndarray:
    if len(value) == 0:
        return np.zeros((0, 4), np.float32)
    return np.stack([np.asarray(v) for v in value])


def _arrow_columns(table: pa.Table) -> dict[str, list[Any]]:
    """Split Arrow list columns by their offsets: no per-element Python objects."""
    rows: dict[str, list[Any]] = {
        "image": table["image"].to_pylist(),
        "mask_crops": table["mask_crops"].to_pylist(),
    }
    for name in _SCALARS:
        rows[name] = table[name].to_numpy().tolist()
    for name in (*_FIXED4, *_INDEX_LISTS):
        rows[name] = _split_list(table[name].combine_chunks(), fixed4=name in _FIXED4)
    for name in TARGET_COLUMNS:
        column = table[name].combine_chunks()
        inner = _split_list(column.flatten(), fixed4=name.endswith("deltas"))
        outer = _rebased_offsets(column)
        rows[name] = [inner[a:b] for a, b in itertools.pairwise(outer)]
    return rows


def _rebased_offsets(column: pa.ListArray) -> np.ndarray:
    """A list array's offsets from 0 (a sliced array's offsets point into its parent)."""
    offsets = column.offsets.to_numpy()
    return offsets - offsets[0]


def _split_list(column: pa.ListArray, *, fixed4: bool) -> list[np.ndarray]:
    """A list column's per-row numpy arrays ([n, 4] for fixed-size-4 items) by its offsets."""
    values = column.flatten()
    if fixed4:
        flat = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
    else:
        flat = values.to_numpy(zero_copy_only=False)
    return [flat[a:b] for a, b in itertools.pairwise(_rebased_offsets(column))]


def iter_batches(
    split_dir: storage.Location,
    *,
    batch_size: int,
    model_config: ModelConfig,
    shuffle: bool = False,
    seed: int = 0,
    flip_prob: float = 0.0,
    drop_last: bool = False,
    train_scales: tuple[float, ...] | None = None,
    crop_size: int | None = None,
) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
    """Model-ready batches from a split's shards, without Ray; one shard in memory at a time.

    ``shuffle`` permutes the shard order and the rows within each shard (by ``seed``).
    ``split_dir`` is a local path or a URI. ``train_scales``, when given, must be the scales
    the shards hold targets for (else ValueError). ``crop_size``: as in ``decode_batch``.
    """
    metadata = check_compatible(split_dir, model_config, train_scales=train_scales)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    filesystem, paths = shard_files(split_dir, manifest=metadata)
    if shuffle:
        paths = [paths[i] for i in rng.permutation(len(paths))]
    decode = {
        "canvas": model_config.canvas,
        "num_anchors": metadata["num_anchors"],
        "rpn_batch_size": model_config.rpn.batch_size_per_image,
        "positive_fraction": model_config.rpn.positive_fraction,
        "flip_prob": flip_prob,
        "generator": generator,
        "crop_size": crop_size,
    }
    pending: pa.Table | None = None
    for path in paths:
        table = pq.read_table(path, columns=list(COLUMNS), filesystem=filesystem)
        if shuffle:
            table = table.take(rng.permutation(table.num_rows))
        pending = table if pending is None else pa.concat_tables([pending, table])
        while pending.num_rows >= batch_size:
            yield decode_batch(pending.slice(0, batch_size), **decode)
            pending = pending.slice(batch_size)
    if pending is not None and pending.num_rows and not drop_last:
        yield decode_batch(pending, **decode)


def ray_dataset(
    split_dir: storage.Location,
    *,
    model_config: ModelConfig | None = None,
    manifest: Mapping[str, Any] | None = None,
    train_scales: tuple[float, ...] | None = None,
) -> ray.data.Dataset:
    """A Ray dataset over a split's shards (after checking them against ``model_config`` and,
    when given, the ``train_scales`` the training asks for).

    ``split_dir`` must be a location every node reads: a shared path or an object store URI.
    ``manifest`` is the split's manifest when the caller has already read it.
    """
    if model_config is not None:
        source = dict(manifest) if manifest is not None else split_dir
        manifest = check_compatible(source, model_config, train_scales=train_scales)
    filesystem, paths = shard_files(split_dir, manifest=manifest)
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=list(COLUMNS))


class ShardCollateFn(ArrowBatchCollateFn):
    """``iter_torch_batches(collate_fn=...)``: Arrow rows -> one dict of tensors on the CPU
    (``pipeline.training.batch``: mask crops, pinned when ``pin_memory``).

    Picklable, so Ray can ship it to train workers; give each worker its own ``seed`` (e.g.
    base seed + rank). Every call draws from a generator seeded by (seed, call number), so the
    collate is safe in Ray's prefetch threads and repeatable for a given batch order.
    """

    def __init__(
        self,
        *,
        canvas: int,
        num_anchors: int,
        rpn_batch_size: int,
        positive_fraction: float,
        flip_prob: float,
        seed: int,
        crop_size: int,
        pin_memory: bool = False,
    ):
        self.decode = {
            "canvas": canvas,
            "num_anchors": num_anchors,
            "rpn_batch_size": rpn_batch_size,
            "positive_fraction": positive_fraction,
            "flip_prob": flip_prob,
            "crop_size": crop_size,
        }
        self.seed = seed
        self.pin_memory = pin_memory
        self._calls = itertools.count()

    def __call__(self, batch: pa.Table) -> dict[str, Tensor]:
        state = np.random.SeedSequence([self.seed, next(self._calls)]).generate_state(1)
        generator = torch.Generator().manual_seed(int(state[0]))
        images, targets = decode_batch(batch, generator=generator, **self.decode)
        return pack_batch(images, targets, pin_memory=self.pin_memory)

    def __getstate__(self) -> dict[str, Any]:
        return {"decode": self.decode, "seed": self.seed, "pin_memory": self.pin_memory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._calls = itertools.count()


def make_collate_fn(
    model_config: ModelConfig, *, flip_prob: float = 0.0, seed: int = 0, pin_memory: bool = False
) -> ShardCollateFn:
    """The collate function for a model configuration (anchor count from its canvas, crop size
    from its mask head); ``pin_memory`` when the batches go to a CUDA device."""
    return ShardCollateFn(
        canvas=model_config.canvas,
        num_anchors=anchor_grid(model_config.canvas, model_config.anchors).num_anchors,
        rpn_batch_size=model_config.rpn.batch_size_per_image,
        positive_fraction=model_config.rpn.positive_fraction,
        flip_prob=flip_prob,
        seed=seed,
        crop_size=mask_crop_size(model_config),
        pin_memory=pin_memory,
    )
