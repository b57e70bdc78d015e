"""Fault drills: one documented hook that makes a training worker die at a chosen point, once.

The drill is read from the environment variable ``MASKRCNN_FAULT`` of the worker processes
(only :func:`pipeline.training.loop.train_loop_per_worker` reads it), for example::

    MASKRCNN_FAULT="step=120,rank=1,marker=/tmp/drill,kind=exit"

- ``kind=exit`` (the default): the rank exits right after optimizer step ``step``, before
  that step is logged or checkpointed;
- ``kind=after_checkpoint``: the rank exits right after the checkpoint of ``step`` has been
  reported and registered (``step`` must be a checkpoint step);
- ``kind=checkpoint_write``: the rank dies while its part of the checkpoint of ``step`` is
  being copied to storage, leaving a partial checkpoint directory behind.

The marker file records that the drill fired, so a restarted worker does not fire it again.
A worker sees a variable that its raylet was started with, or the job's runtime environment
(``ray job submit --runtime-env-json '{"env_vars": {"MASKRCNN_FAULT": "..."}}'``,
``ray.init(runtime_env=...)``). It exists for drills and tests; production runs leave it unset.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import ray.train

log = logging.getLogger(__name__)

FAULT_ENV = "MASKRCNN_FAULT"
KINDS = ("exit", "after_checkpoint", "checkpoint_write")


@dataclass(frozen=True, kw_only=True)
class FaultDrill:
    """Rank ``rank`` dies once at ``step``, at the point ``kind`` names."""

    step: int
    rank: int
    marker: Path
    kind: str = "exit"

    @classmethod
    def parse(cls, text: str | None) -> FaultDrill | None:
        """``"step=S,rank=R,marker=PATH[,kind=K]"``; None or empty means no drill."""
        if not text:
            return None
        try:
            fields = dict(item.split("=", 1) for item in text.split(",") if item.strip())
            drill = cls(
                step=int(fields.pop("step")),
                rank=int(fields.pop("rank")),
                marker=Path(fields.pop("marker")),
                kind=fields.pop("kind", "exit"),
            )
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{FAULT_ENV}={text!r}: expected step=S,rank=R,marker=PATH[,kind=K] ({err})"
            ) from err
        if fields or drill.kind not in KINDS:
            raise ValueError(
                f"{FAULT_ENV}={text!r}: unknown keys {sorted(fields)} or kind "
                f"{drill.kind!r} (kinds: {', '.join(KINDS)})"
            )
        return drill

    def due(self, *, kind: str, step: int, rank: int) -> bool:
        return (
            kind == self.kind
            and step == self.step
            and rank == self.rank
            and not self.marker.exists()
        )

    def fire(self, what: str) -> NoReturn:
        """Record the drill in the marker file, then exit at once (no cleanup, like a crash)."""
        self.marker.write_text(f"rank {self.rank}, step {self.step}: {what}\n")
        log.warning("fault drill: rank %d %s at step %d", self.rank, what, self.step)
        os._exit(1)

    def partial_upload(self, checkpoint: ray.train.Checkpoint, name: str) -> NoReturn:
        """A ``checkpoint_upload_fn`` for ``ray.train.report``: copy the first half of one
        file of this rank's part into the checkpoint's storage directory, then die."""
        storage = ray.train.get_context().get_storage()
        destination = storage.build_checkpoint_path_from_name(name)
        fs = storage.storage_filesystem
        fs.create_dir(destination, recursive=True)
        source = sorted(Path(checkpoint.path).iterdir())[0]
        data = source.read_bytes()
        with fs.open_output_stream(f"{destination}/{source.name}") as out:
            out.write(data[: len(data) // 2])
        self.fire(f"died writing {name}/{source.name} ({len(data) // 2} of {len(data)} bytes)")
