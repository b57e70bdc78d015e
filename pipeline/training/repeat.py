"""Repeat-factor sampling (LVIS, Gupta et al. 2019): images with rare classes come more often.

f(c) is the fraction of train images holding category c (preprocess counts them once, in the
manifest's ``counts.images_per_label``), r(c) = max(1, sqrt(t / f(c))) for the threshold t, and
an image's factor is the largest r(c) over its (non-crowd) categories, 1 for an image with none.
Each epoch an image comes floor(r) times, plus once more with probability frac(r), so its
expected count is r. The draw is keyed by (seed, epoch, image id): it does not depend on how
rows are split into blocks or tasks.

On Ray Data the repetition is one ``map_batches`` after the block shuffle: the epoch is Ray's
execution index, read through the same ``RandomSeedConfig`` that reseeds the block order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import DataContext, RandomSeedConfig


def label_repeat_factors(
    images_per_label: Mapping[str, int], *, images: int, threshold: float
) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))) per label, f(c) = images holding c / all images."""
    if images < 1:
        raise ValueError("repeat factors need at least one image")
    return {
        int(label): max(1.0, math.sqrt(threshold / (count / images)))
        for label, count in images_per_label.items()
        if count > 0
    }


def image_repeat_factors(
    labels: Sequence[np.ndarray], iscrowd: Sequence[np.ndarray], factors: Mapping[int, float]
) -> np.ndarray:
    """Each image's factor: the largest of its non-crowd labels' factors, 1 when it has none."""
    out = np.ones(len(labels), dtype=np.float64)
    for i, (row_labels, crowd) in enumerate(zip(labels, iscrowd, strict=True)):
        kept = np.asarray(row_labels)[~np.asarray(crowd, dtype=bool)]
        if len(kept):
            out[i] = max(factors.get(int(label), 1.0) for label in kept)
    return out


def repeat_counts(
    image_ids: Sequence[int], factors: np.ndarray, *, seed: int, epoch: int
) -> np.ndarray:
    """How many times each image comes this epoch: floor(r), plus one with probability frac(r)."""
    whole = np.floor(factors)
    draws = np.array(
        [np.random.default_rng([seed, epoch, int(i)]).random() for i in image_ids], dtype=np.float64
    )
    return (whole + (draws < factors - whole)).astype(np.int64)


def repeat_rows(
    table: pa.Table, *, factors: Mapping[int, float], seed: int, epoch: int
) -> pa.Table:
    """The rows of ``table`` (with image_id, labels, iscrowd), each repeated by its draw."""
    image_factors = image_repeat_factors(
        table["labels"].to_pylist(), table["iscrowd"].to_pylist(), factors
    )
    counts = repeat_counts(table["image_id"].to_pylist(), image_factors, seed=seed, epoch=epoch)
    return table.take(np.repeat(np.arange(table.num_rows), counts))


def repeat_dataset(
    dataset: ray.data.Dataset, manifest: Mapping[str, Any], *, threshold: float, seed: int
) -> ray.data.Dataset:
    """``dataset`` with each image repeated by its factor, drawn anew every epoch (execution)."""
    counts = manifest["counts"]
    if "images_per_label" not in counts:
        raise ValueError(
            "the train shards' manifest has no images_per_label (made by an older preprocess): "
            "run the preprocess stage again to use repeat_factor_threshold"
        )
    factors = label_repeat_factors(
        counts["images_per_label"], images=counts["images"], threshold=threshold
    )
    config = RandomSeedConfig(seed=seed, reseed_after_execution=True)
    return dataset.map_batches(
        _repeat_batch,
        batch_size=None,
        batch_format="pyarrow",
        # No CPU of its own (an Arrow take per block): the map runs every epoch while the
        # training workers hold the CPUs, and with one worker per CPU (the demo's layout) a
        # task that asked for a CPU would wait for one forever.
        num_cpus=0,
        fn_args=(config, dataset.context),
        fn_kwargs={"factors": factors, "seed": seed},
    )


def _repeat_batch(
    batch: pa.Table,
    config: RandomSeedConfig,
    context: DataContext,
    *,
    factors: Mapping[int, float],
    seed: int,
) -> pa.Table:
    """Ray task: the batch's rows repeated, keyed by this execution (the epoch)."""
    seed_tuple = config.get_seed_tuple(data_context=context)
    epoch = seed_tuple.execution_idx if seed_tuple is not None else 0
    return repeat_rows(batch, factors=factors, seed=seed, epoch=int(epoch or 0))
