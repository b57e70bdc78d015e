"""Writing a split's shards: each part atomically, the split directory replaced as a whole.

A reader, or a run that dies half-way, never sees a partial ``part-*.parquet`` or a split that
mixes parts of two runs: parts are written under a temporary name, fsynced and renamed, into a
hidden scratch directory that replaces the split only once its manifest is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .shards import MANIFEST, METADATA_KEY, PART_GLOB, SCHEMA

log = logging.getLogger(__name__)

# Row groups of this many images let readers stream a shard in small pieces.
ROW_GROUP_ROWS = 64
# Encoded images do not compress: storing them plain saves CPU when writing and reading.
_COMPRESSION = {field.name: "none" if field.name == "image" else "zstd" for field in SCHEMA}


def write_shard(table: pa.Table, path: Path, metadata: dict[str, Any]) -> int:
    """Write ``table`` to ``path`` atomically (temporary name, fsync, rename); returns its bytes.

    A reader, or a run that dies half-way, never sees a partial ``part-*.parquet``.
    """
    table = table.replace_schema_metadata({METADATA_KEY: _json_bytes(metadata)})
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as sink:
            pq.write_table(
                table,
                sink,
                row_group_size=ROW_GROUP_ROWS,
                compression=_COMPRESSION,
                use_dictionary=["file_name"],
            )
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


class SplitWriter:
    """Writes a split's shards in order and replaces the split directory as a whole.

    Parts go to a hidden scratch directory beside ``out_dir``; ``finish`` writes the manifest
    (last) and swaps the scratch directory in, so readers see the old split or the new one,
    never a mix. On an error the scratch directory is removed and ``out_dir`` is untouched.
    """

    def __init__(self, out_dir: str | Path, *, metadata: dict[str, Any], rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.metadata = metadata
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict[str, Any]] = []
        self.rows = 0  # rows added so far
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        _check_replaceable(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_scratch_dirs(self.out_dir)
        self.work_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex}"
        self.work_dir.mkdir()

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, table: pa.Table) -> None:
        """Append rows (in ``SCHEMA``), writing every full shard as soon as it is complete."""
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        # One contiguous chunk per column: the file layout does not depend on how rows arrived.
        shard = pending.slice(0, rows).combine_chunks()
        rest = pending.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        name = part_name(len(self.shards))
        size = write_shard(shard, self.work_dir / name, self.metadata)
        self.shards.append({"file": name, "rows": rows, "bytes": size})
        log.info("wrote %s (%d images, %.1f MB)", name, rows, size / 1e6)

    def finish(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Write the last shard and the manifest, swap the split in; returns the manifest.

        ``counts`` (images, instances, skipped, ...) go into the manifest with the bytes written.
        """
        if self._pending_rows:
            self._flush(self._pending_rows)
        written = sum(s["bytes"] for s in self.shards)
        counts = {**counts, "shards": len(self.shards), "bytes_written": written}
        manifest = {**self.metadata, "counts": counts, "shards": self.shards}
        write_json_atomic(self.work_dir / MANIFEST, manifest)
        old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex}"
        if self.out_dir.exists():
            os.replace(self.out_dir, old)
        os.replace(self.work_dir, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything preprocess did not write."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"shards directory {out_dir} exists and is not a directory")
    foreign = [
        p.name
        for p in out_dir.iterdir()
        if not (p.match(PART_GLOB) or p.name == MANIFEST or ".tmp-" in p.name)
    ]
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
