"""Writing a split's shards: each part atomically, the split directory replaced as a whole.

A reader, or a run that dies half-way, never sees a partial ``part-*.parquet`` or a split that
mixes parts of two runs: parts are written under a temporary name, fsynced and renamed, into a
hidden scratch directory that replaces the split only once its manifest is written.

The split may also go to object storage (``s3://``, ``gs://``, any fsspec URI), which has no
atomic rename: there the split is written the same way in a local temporary directory, then
uploaded with its manifest last, the old manifest removed first. A reader, which needs the
manifest, sees the old split, no split, or the new one, never a mix. A ``file://`` URI is a
local path and gets the renames.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io import storage
from pipeline.shards.schema import MANIFEST, METADATA_KEY, PART_GLOB, SCHEMA

log = logging.getLogger(__name__)

# Row groups of this many images let readers stream a shard in small pieces.
ROW_GROUP_ROWS = 64
# Encoded images do not compress: storing them plain saves CPU when writing and reading.
_COMPRESSION = {field.name: "none" if field.name == "image" else "zstd" for field in SCHEMA}


def encode_shard(table: pa.Table, metadata: dict[str, Any]) -> bytes:
    """A shard's Parquet file, in memory, with the split's metadata in its schema.

    Ray tasks encode their own shards (the CPU work), so that the driver only writes bytes.
    """
    # One contiguous chunk per column: the file layout does not depend on how rows arrived.
    table = table.combine_chunks().replace_schema_metadata({METADATA_KEY: _json_bytes(metadata)})
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression=_COMPRESSION,
        use_dictionary=["file_name"],
    )
    return sink.getvalue().to_pybytes()


def write_shard(data: bytes, path: Path) -> int:
    """Write a shard's bytes to ``path`` atomically (temporary name, fsync, rename); its size.

    A reader, or a run that dies half-way, never sees a partial ``part-*.parquet``.
    """
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


class SplitWriter:
    """Writes a split's shards in order and replaces the split directory as a whole.

    Each shard comes encoded (``encode_shard``: preprocess's Ray tasks encode their own) and
    becomes the next ``part-NNNNN.parquet``.

    ``out_dir`` is a local path (or ``file://`` URI) or an object storage URI. Parts go to a
    scratch directory; ``finish`` writes the manifest (last) and publishes the split, so readers
    see the old split or the new one, never a mix. On an error the scratch directory is
    removed and ``out_dir`` is untouched.
    """

    def __init__(self, out_dir: storage.Location, *, metadata: dict[str, Any]):
        self.out_dir = storage.locate(out_dir)
        self.metadata = metadata
        self.shards: list[dict[str, Any]] = []
        if isinstance(self.out_dir, Path):
            self._target: _LocalSplit | _RemoteSplit = _LocalSplit(self.out_dir)
        else:
            self._target = _RemoteSplit(self.out_dir)
        self.work_dir = self._target.work_dir

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return sum(shard["rows"] for shard in self.shards)

    def add_shard(self, data: bytes, rows: int) -> None:
        """Write an encoded shard of ``rows`` rows as the next part."""
        name = part_name(len(self.shards))
        size = write_shard(data, self.work_dir / name)
        self.shards.append({"file": name, "rows": rows, "bytes": size})
        log.info("wrote %s (%d images, %.1f MB)", name, rows, size / 1e6)

    def finish(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest, publish the split; returns the manifest.

        ``counts`` (images, instances, skipped, ...) go into the manifest with the bytes written.
        """
        written = sum(s["bytes"] for s in self.shards)
        counts = {**counts, "shards": len(self.shards), "bytes_written": written}
        manifest = {**self.metadata, "counts": counts, "shards": self.shards}
        write_json_atomic(self.work_dir / MANIFEST, manifest)
        self._target.publish()
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


class _LocalSplit:
    """A split directory on a local or mounted (NFS) filesystem: built in a hidden scratch
    directory beside it and swapped in by renames, which are atomic."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"shards directory {out_dir} exists and is not a directory")
        if out_dir.is_dir():
            _check_replaceable(out_dir, (p.name for p in out_dir.iterdir()))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_scratch_dirs(out_dir)
        self.work_dir = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex}"
        self.work_dir.mkdir()

    def publish(self) -> None:
        old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex}"
        if self.out_dir.exists():
            os.replace(self.out_dir, old)
        os.replace(self.work_dir, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)


class _RemoteSplit:
    """A split on object storage, which has no rename: built in a local temporary directory
    (it needs room for the split), then uploaded with the manifest last.

    The old manifest is deleted before the upload and its stale parts after it, so a reader
    finds the old split, no split (a clear error: run preprocess), or the new one.
    """

    def __init__(self, location: str):
        self.location = location
        self.fs, root = storage.filesystem(location)
        self.root = root.rstrip("/")
        _check_replaceable(location, self._names())
        self.work_dir = Path(tempfile.mkdtemp(prefix="maskrcnn-split-"))

    def _names(self) -> list[str]:
        """The names directly under the split's location ([] when there is none yet)."""
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise ValueError(f"shards directory {self.location} exists and is not a directory")
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    def publish(self) -> None:
        before = self._names()
        if MANIFEST in before:
            self.fs.delete_file(f"{self.root}/{MANIFEST}")
        written = storage.upload_dir(self.work_dir, self.location, last=[MANIFEST])
        new = {w.rsplit("/", 1)[1] for w in written}
        for name in before:
            if name not in new and _ours(name):
                self.fs.delete_file(f"{self.root}/{name}")
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _ours(name: str) -> bool:
    """A file that preprocess writes into a split directory."""
    return fnmatch(name, PART_GLOB) or name == MANIFEST or ".tmp-" in name


def _check_replaceable(out_dir: Path | str, names: Iterable[str]) -> None:
    """Refuse to replace a directory that holds anything preprocess did not write."""
    foreign = [name for name in names if not _ours(name)]
    if foreign:
        raise ValueError(
            f"refusing to replace {out_dir}: it holds files that preprocess did not write "
            f"({sorted(foreign)[:5]}); choose an empty or new shards directory"
        )


def _remove_scratch_dirs(out_dir: Path) -> None:
    """Scratch directories that a killed run of this split left behind."""
    for pattern in (f".{out_dir.name}.partial-*", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            log.warning("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(_json_bytes(data, indent=2) + b"\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_bytes(data: dict[str, Any], *, indent: int | None = None) -> bytes:
    return json.dumps(data, sort_keys=True, indent=indent).encode()


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"
