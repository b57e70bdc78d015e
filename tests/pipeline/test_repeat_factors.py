"""Repeat-factor sampling on a deliberately imbalanced split: the rare class comes as often as
its factor says, the draws are fresh each epoch, and the Ray Data stream repeats the same way."""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import ray

from pipeline.training.repeat import (
    image_repeat_factors,
    label_repeat_factors,
    repeat_dataset,
    repeat_rows,
)

RARE, COMMON, CROWDED = 2, 1, 3
THRESHOLD = 0.1


def _split(n: int = 200, rare: int = 10) -> pa.Table:
    """Every image holds the common class; ``rare`` of them the rare one too; the last five only
    a crowd region of class 3 (which must not raise their factor); two hold nothing."""
    rows = []
    for i in range(n):
        labels, crowd = [COMMON], [False]
        if i < rare:
            labels, crowd = [COMMON, RARE], [False, False]
        elif i >= n - 5:
            labels, crowd = [CROWDED], [True]
        elif i >= n - 7:
            labels, crowd = [], []
        rows.append({"image_id": 1000 + i, "labels": labels, "iscrowd": crowd})
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("image_id", pa.int64()),
                ("labels", pa.list_(pa.int32())),
                ("iscrowd", pa.list_(pa.bool_())),
            ]
        ),
    )


def _manifest(table: pa.Table) -> dict:
    per_label: Counter[str] = Counter()
    for labels, crowd in zip(
        table["labels"].to_pylist(), table["iscrowd"].to_pylist(), strict=True
    ):
        per_label.update(
            str(label) for label in {lab for lab, c in zip(labels, crowd, strict=True) if not c}
        )
    return {"counts": {"images": table.num_rows, "images_per_label": dict(per_label)}}


def test_factors_follow_the_lvis_formula():
    table = _split()
    counts = _manifest(table)["counts"]
    factors = label_repeat_factors(counts["images_per_label"], images=200, threshold=THRESHOLD)
    assert factors == {COMMON: 1.0, RARE: pytest.approx(math.sqrt(0.1 / 0.05))}
    per_image = image_repeat_factors(
        table["labels"].to_pylist(), table["iscrowd"].to_pylist(), factors
    )
    assert per_image[:10] == pytest.approx([math.sqrt(2)] * 10)
    assert (per_image[10:] == 1.0).all()  # crowd-only and empty images count once


def test_the_rare_class_comes_as_often_as_its_factor_says():
    table = _split()
    factors = label_repeat_factors(
        _manifest(table)["counts"]["images_per_label"], images=200, threshold=THRESHOLD
    )
    epochs, rare_rows, per_epoch = 60, 0, []
    for epoch in range(epochs):
        out = repeat_rows(table, factors=factors, seed=7, epoch=epoch)
        ids = Counter(out["image_id"].to_pylist())
        assert all(ids[1000 + i] == 1 for i in range(10, 200))  # factor 1: exactly once
        assert all(ids[1000 + i] in (1, 2) for i in range(10))  # floor or ceil of sqrt(2)
        rare = sum(RARE in labels for labels in out["labels"].to_pylist())
        rare_rows += rare
        per_epoch.append(rare)
    # Expected 10 * sqrt(2) per epoch; the extra copy is Bernoulli(0.414): sd of the total
    # sqrt(600 * 0.414 * 0.586) = 12; the bound is five of them.
    assert abs(rare_rows - epochs * 10 * math.sqrt(2)) < 60, rare_rows
    assert len(set(per_epoch)) > 1  # fresh draws every epoch
    again = repeat_rows(table, factors=factors, seed=7, epoch=3)
    assert again.equals(repeat_rows(table, factors=factors, seed=7, epoch=3))


def test_the_draw_does_not_depend_on_how_rows_are_batched():
    table = _split()
    factors = {COMMON: 1.0, RARE: 2.5}
    whole = repeat_rows(table, factors=factors, seed=1, epoch=2)
    parts = [
        repeat_rows(table.slice(s, 37), factors=factors, seed=1, epoch=2) for s in range(0, 200, 37)
    ]
    assert pa.concat_tables(parts)["image_id"].to_pylist() == whole["image_id"].to_pylist()


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_repeats_by_factor_with_new_draws_each_epoch(ray_runtime):
    table = _split()
    source = ray.data.from_arrow(table).repartition(4).materialize()
    dataset = repeat_dataset(source, _manifest(table), threshold=THRESHOLD, seed=3)
    epochs = [Counter(row["image_id"] for row in dataset.take_all()) for _ in range(6)]
    for ids in epochs:
        assert all(ids[1000 + i] == 1 for i in range(10, 200))
        assert all(ids[1000 + i] in (1, 2) for i in range(10))
    rare = [sum(ids[1000 + i] for i in range(10)) for ids in epochs]
    assert len(set(tuple(sorted(e.items())) for e in epochs)) > 1, rare
    # 60 rare-image draws in all, expected 84.9, sd 3.8: a broken repetition (never or
    # always a second copy: 60 or 120) is far outside.
    assert abs(sum(rare) - 60 * math.sqrt(2)) < 20, rare


def test_the_repeat_runs_while_training_workers_hold_every_cpu(ray_runtime):
    """The demo's layout: one training worker per CPU, and each epoch's repeat map runs then."""
    table = _split()
    source = ray.data.from_arrow(table).materialize()
    dataset = repeat_dataset(source, _manifest(table), threshold=THRESHOLD, seed=3)

    @ray.remote(num_cpus=1)
    class Worker:  # defined here: Ray ships it by value (the test module is not importable)
        def ready(self) -> bool:
            return True

    held = [Worker.remote() for _ in range(2)]
    ray.get([h.ready.remote() for h in held])
    rows: list[int] = []
    reader = threading.Thread(target=lambda: rows.append(len(dataset.take_all())), daemon=True)
    reader.start()
    reader.join(timeout=60)
    for holder in held:
        ray.kill(holder)
    assert rows and rows[0] >= table.num_rows, "the repeat map waited for a free CPU"


def test_old_shards_without_label_counts_are_a_clear_error(ray_runtime):
    source = ray.data.from_arrow(_split())
    with pytest.raises(ValueError, match="images_per_label"):
        repeat_dataset(source, {"counts": {"images": 200}}, threshold=0.1, seed=0)
    assert np.isclose(label_repeat_factors({"1": 50}, images=100, threshold=0.5)[1], 1.0)
