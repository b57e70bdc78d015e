"""Writing a split from rows in a test, as preprocess does from its tasks' encoded shards."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.io.storage import Location
from pipeline.shards.writer import SplitWriter, encode_shard


def write_split(
    out_dir: Location,
    table: pa.Table,
    metadata: dict[str, Any],
    *,
    rows_per_shard: int,
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Cut ``table`` into shards of ``rows_per_shard`` rows, write the split; its manifest."""
    with SplitWriter(out_dir, metadata=metadata) as writer:
        for start in range(0, table.num_rows, rows_per_shard):
            shard = table.slice(start, rows_per_shard)
            writer.add_shard(encode_shard(shard, metadata), shard.num_rows)
        return writer.finish(counts)
