"""Shard rows, atomic writes, whole-split replacement and the compatibility check (no Ray)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from split_writing import write_split

from maskrcnn.config import ModelConfig, RPNConfig
from pipeline.coco.reader import read_coco
from pipeline.io import storage
from pipeline.shards import schema as shards
from pipeline.shards import writer as shard_writer
from pipeline.shards.preprocess import encode_record
from pipeline.shards.schema import (
    MANIFEST,
    SCHEMA,
    check_compatible,
    read_manifest,
    rows_to_table,
    shard_files,
    shard_metadata,
)
from pipeline.shards.writer import encode_shard, write_shard

CONFIG = ModelConfig(num_classes=6, canvas=128)


def _parts(split_dir) -> list[str]:
    """A finished split's part paths, in order, as pyarrow sees them on their filesystem."""
    return shard_files(split_dir)[1]


def _stored_metadata(path, filesystem=None) -> dict:
    """The ``maskrcnn`` JSON metadata in one Parquet shard's key-value metadata."""
    metadata = pq.read_schema(path, filesystem=filesystem).metadata or {}
    return json.loads(metadata[shards.METADATA_KEY])


@pytest.fixture(scope="module")
def shapes_rows(shapes_dataset):
    """Encoded rows of the synthetic train split, and its COCO index."""
    root, summary = shapes_dataset
    split = summary["train"]
    index = read_coco(root / split["annotation_file"], root / split["images_dir"])
    rows = [
        encode_record(r, model_config=CONFIG, image_format="png", jpeg_quality=95)
        for r in index.records
    ]
    return rows, index


def _metadata(index) -> dict:
    return shard_metadata(
        model_config=CONFIG,
        categories=index.categories,
        annotation_sha256=index.sha256,
        split="train",
        image_format="png",
    )


def _write_split(out_dir, rows, index, *, rows_per_shard=5) -> dict:
    return write_split(
        out_dir,
        rows_to_table(rows),
        _metadata(index),
        rows_per_shard=rows_per_shard,
        counts={"images": len(rows)},
    )


def test_rows_round_trip_through_arrow_with_the_contract_types(shapes_rows):
    rows, _ = shapes_rows
    table = rows_to_table(rows)
    assert table.schema == SCHEMA
    back = table.to_pylist()
    for row, stored in zip(rows, back, strict=True):
        assert stored["image_id"] == row["image_id"] and stored["image"] == row["image"]
        np.testing.assert_array_equal(np.array(stored["boxes"]).reshape(-1, 4), row["boxes"])
        # One entry per training scale (here the default, [1.0]).
        assert len(stored["rpn_ignore"]) == len(stored["target_scales"]) == 1
        np.testing.assert_array_equal(stored["rpn_ignore"][0], row["rpn_ignore"][0])
        np.testing.assert_array_equal(
            np.array(stored["rpn_flip_pos_deltas"][0]).reshape(-1, 4),
            row["rpn_flip_pos_deltas"][0],
        )
        assert stored["masks"] == row["masks"]
        assert stored["iscrowd"] == row["iscrowd"].tolist()
    assert any(len(r["rpn_ignore"][0]) for r in rows) and any(len(r["boxes"]) == 0 for r in rows)


def test_split_is_cut_into_ordered_shards_with_metadata(tmp_path, shapes_rows):
    rows, index = shapes_rows
    manifest = _write_split(tmp_path / "train", rows, index, rows_per_shard=5)
    paths = _parts(tmp_path / "train")
    assert paths == [str(tmp_path / "train" / f"part-{i:05d}.parquet") for i in range(4)]
    assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 5, 1]
    ids = [i for p in paths for i in pq.read_table(p, columns=["image_id"])["image_id"].to_pylist()]
    assert ids == [r["image_id"] for r in rows]
    assert all(_stored_metadata(p) == _metadata(index) for p in paths)
    assert manifest == read_manifest(tmp_path / "train")
    assert manifest["counts"]["bytes_written"] == sum(os.path.getsize(p) for p in paths)


def test_a_failed_shard_write_leaves_no_part_file(tmp_path, shapes_rows, monkeypatch):
    rows, index = shapes_rows

    data = encode_shard(rows_to_table(rows[:2]), _metadata(index))

    def fsync_fails(fileno):
        raise OSError("disk full")

    monkeypatch.setattr(shard_writer.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        write_shard(data, tmp_path / "part-00000.parquet")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_split_keeps_the_previous_one_whole(tmp_path, shapes_rows, monkeypatch):
    rows, index = shapes_rows
    out = tmp_path / "train"
    before = _write_split(out, rows, index)
    original = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def fail_on_third_shard(data, path):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(data, path)

    real_write = shard_writer.write_shard
    monkeypatch.setattr(shard_writer, "write_shard", fail_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _write_split(out, rows[::-1], index)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no scratch directory left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == original
    assert read_manifest(out) == before


def test_a_new_run_replaces_every_part_of_the_old_split(tmp_path, shapes_rows):
    rows, index = shapes_rows
    out = tmp_path / "train"
    _write_split(out, rows, index, rows_per_shard=2)  # 8 parts
    _write_split(out, rows[:3], index, rows_per_shard=2)  # 2 parts
    names = sorted(p.name for p in out.iterdir())
    assert names == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    assert sum(pq.read_metadata(p).num_rows for p in _parts(out)) == 3


def test_refuses_to_replace_a_directory_with_foreign_files(tmp_path, shapes_rows):
    rows, index = shapes_rows
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"refusing to replace .*notes\.txt"):
        _write_split(tmp_path / "train", rows, index)
    assert (tmp_path / "train" / "notes.txt").read_text() == "mine"


def test_compatibility_names_the_directory_and_both_anchor_configs(tmp_path, shapes_rows):
    rows, index = shapes_rows
    out = tmp_path / "train"
    _write_split(out, rows[:2], index)
    assert check_compatible(out, CONFIG)["canvas"] == 128
    other_canvas = ModelConfig(num_classes=6, canvas=192)
    with pytest.raises(ValueError, match=r"train.*canvas 128.*canvas 192") as error:
        check_compatible(out, other_canvas)
    built = read_manifest(out)["anchor_config_hash"]
    assert built in str(error.value) and shards.model_anchor_hash(other_canvas) in str(error.value)
    other_matching = ModelConfig(num_classes=6, canvas=128, rpn=RPNConfig(fg_iou_thresh=0.6))
    with pytest.raises(ValueError, match="anchor config hash"):
        check_compatible(out, other_matching)


def test_unfinished_or_old_format_splits_are_refused(tmp_path, shapes_rows):
    rows, index = shapes_rows
    with pytest.raises(ValueError, match="no manifest.json"):
        check_compatible(tmp_path, CONFIG)
    out = tmp_path / "train"
    _write_split(out, rows[:2], index)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(ValueError, match="format version 0"):
        check_compatible(out, CONFIG)


def test_a_split_on_object_storage_is_uploaded_with_its_manifest_last(
    tmp_path, shapes_rows, memory_dir, memory_writes, monkeypatch
):
    rows, index = shapes_rows
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local scratch goes
    location = f"{memory_dir}/shards/train"
    manifest = _write_split(location, rows, index, rows_per_shard=5)
    parts = [f"part-{i:05d}.parquet" for i in range(4)]
    assert memory_writes == [("write", name) for name in [*parts, MANIFEST]]
    assert read_manifest(location) == manifest
    fs, paths = shard_files(location)
    _, root = storage.filesystem(location)
    assert paths == [f"{root}/{name}" for name in parts]
    assert _stored_metadata(paths[0], fs) == _metadata(index)
    ids = [i for p in paths for i in pq.read_table(p, filesystem=fs)["image_id"].to_pylist()]
    assert ids == [r["image_id"] for r in rows]
    assert list(tmp_path.iterdir()) == []  # the local scratch directory is gone


def test_replacing_a_split_on_object_storage_hides_the_old_one_first(
    shapes_rows, memory_dir, memory_writes
):
    rows, index = shapes_rows
    _write_split(memory_dir, rows, index, rows_per_shard=2)  # 8 parts
    memory_writes.clear()
    _write_split(memory_dir, rows[:3], index, rows_per_shard=2)  # 2 parts
    new, stale = ["part-00000.parquet", "part-00001.parquet"], range(2, 8)
    assert memory_writes == [
        ("delete", MANIFEST),
        *[("write", name) for name in [*new, MANIFEST]],
        *[("delete", f"part-{i:05d}.parquet") for i in stale],
    ]
    fs, root = storage.filesystem(memory_dir)
    listed = fs.get_file_info(pafs.FileSelector(root))
    assert sorted(info.base_name for info in listed) == [MANIFEST, *new]
    assert read_manifest(memory_dir)["counts"]["images"] == 3


def test_object_storage_keeps_the_old_split_when_a_run_fails_or_finds_foreign_files(
    shapes_rows, memory_dir, monkeypatch
):
    rows, index = shapes_rows
    before = _write_split(memory_dir, rows[:4], index)

    def fail(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shard_writer, "write_shard", fail)
        with pytest.raises(KeyboardInterrupt):
            _write_split(memory_dir, rows, index)
    assert read_manifest(memory_dir) == before
    storage.write_bytes(f"{memory_dir}/notes.txt", b"mine")
    with pytest.raises(ValueError, match=r"refusing to replace .*notes\.txt"):
        _write_split(memory_dir, rows, index)
    assert storage.read_bytes(f"{memory_dir}/notes.txt") == b"mine"
    with pytest.raises(ValueError, match="no manifest.json"):
        read_manifest(f"{memory_dir}/absent")


def test_a_file_uri_is_the_local_directory(tmp_path, shapes_rows, monkeypatch):
    rows, index = shapes_rows
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "shards" / "train"
    manifest = _write_split(out.as_uri(), rows, index)
    assert read_manifest(out) == manifest == read_manifest(out.as_uri())
    (fs_uri, from_uri), (fs_path, from_path) = shard_files(out.as_uri()), shard_files(out)
    assert isinstance(fs_uri, pafs.LocalFileSystem) and isinstance(fs_path, pafs.LocalFileSystem)
    assert from_uri == from_path == [str(out / f"part-{i:05d}.parquet") for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no ./file: directory
    assert sorted(p.name for p in out.parent.iterdir()) == ["train"]  # renamed into place
