"""Where a run came from, in the form the MLflow UI shows: its code and its data.

The code is the git commit of the project checkout (the runs table's Source and Version
columns); the data are the shard splits as MLflow dataset inputs (the Dataset column), each
with a digest of its manifest, so that two runs on the same shards show the same digest and
a model version can name the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from pipeline.io import storage
from pipeline.shards.schema import read_manifest

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 10
DIGEST_CHARS = 16  # the tracking store keeps at most 36
SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"))
PARENT_VERSION_TAG = "parent_model_version"  # on a fine-tuning run: the version it started from
PROFILE_COUNTS = ("images", "instances", "crowd", "shards", "bytes_written")


@dataclass(frozen=True, kw_only=True)
class ShardInput:
    """A finished split of shards, as one dataset input of a run."""

    location: str  # the split directory, absolute path or URI
    manifest: Mapping[str, Any]
    context: str  # MLflow's dataset context: "training", "validation"

    @property
    def name(self) -> str:
        """``<shards dir name>/<split>``, e.g. ``shards/train``."""
        parts = self.location.rstrip("/").rsplit("/", 2)
        return "/".join(parts[-2:])

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    def to_mlflow(self) -> DatasetInput:
        counts = self.manifest.get("counts", {})
        profile = {k: counts[k] for k in PROFILE_COUNTS if k in counts}
        profile["categories"] = len(self.manifest.get("categories", []))
        profile["canvas"] = self.manifest.get("canvas")
        dataset = Dataset(
            name=self.name,
            digest=self.digest,
            source_type=_source_type(self.location),
            source=json.dumps({"uri": self.location}),
            profile=json.dumps(profile),
        )
        return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, self.context)])


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The first hex digits of the SHA-256 of the manifest's JSON (keys sorted): it names the
    annotation file's hash, the anchors and every part's row count and size."""
    text = json.dumps(manifest, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def shard_inputs(
    shards_dir: storage.Location, *, known: Mapping[str, Mapping[str, Any]] | None = None
) -> list[ShardInput]:
    """The train and val splits under ``shards_dir`` that have a manifest; ``known``: the
    manifests the caller already read, by split name. A split not built yet is left out."""
    root = storage.absolute(shards_dir)
    found = []
    for split, context in SPLIT_CONTEXTS:
        location = storage.join(root, split)
        manifest = (known or {}).get(split)
        if manifest is None:
            try:
                manifest = read_manifest(location)
            except ValueError:
                log.info("no %s shards in %s: not logged as a dataset input", split, location)
                continue
        found.append(ShardInput(location=location, manifest=manifest, context=context))
    return found


def log_shard_inputs(client: MlflowClient, run_id: str, inputs: Sequence[ShardInput]) -> None:
    """Log the splits as the run's dataset inputs (logging the same one again is a no-op)."""
    if inputs:
        client.log_inputs(run_id, datasets=[shard.to_mlflow() for shard in inputs])


def version_description(
    client: MlflowClient, run_id: str, *, segm_ap: float, bbox_ap: float, decision: str
) -> str:
    """A model version's description (Markdown, shown on its page): its figures, the training
    run, the data digests and, when the run has a ``parent_model_version`` tag (a fine-tuning),
    the version it started from."""
    run = client.get_run(run_id)
    data = [
        f"`{item.dataset.name}` ({_context(item)}) digest `{item.dataset.digest}`"
        for item in run.inputs.dataset_inputs
    ]
    lines = [
        f"- **segm AP** {segm_ap:.4f}, **bbox AP** {bbox_ap:.4f} (COCO AP@[.50:.95] on val)",
        f"- **training run** `{run.info.run_name}` (`{run_id}`)",
        f"- **data** {'; '.join(data) if data else 'not recorded'}",
    ]
    parent = run.data.tags.get(PARENT_VERSION_TAG)
    if parent:
        lines.append(f"- **parent version** {parent} (fine-tuned from it)")
    lines.append(f"- **decision** {decision}")
    return "\n".join(lines) + "\n"


def _context(item: DatasetInput) -> str:
    return next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), "input")


def source_tags(project_root: Path, *, entry_point: str | None = None) -> dict[str, str]:
    """``mlflow.source.*`` tags: the entry point (default: this process's script, relative to
    the project when inside it) and, in a git checkout, the commit of ``HEAD``."""
    tags = {
        MLFLOW_SOURCE_NAME: entry_point or _entry_point(Path(project_root)),
        MLFLOW_SOURCE_TYPE: "LOCAL",
    }
    commit = git_commit(Path(project_root))
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def git_commit(directory: Path) -> str | None:
    """``git rev-parse HEAD`` in ``directory``; None when it is no git checkout, git is not
    installed or does not answer (a run is never refused for want of git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("no git commit for %s: %s", directory, err)
        return None
    commit = done.stdout.strip()
    if done.returncode != 0 or len(commit) != 40:
        return None
    return commit


def _entry_point(project_root: Path) -> str:
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None:
        return "python"
    try:
        return str(script.relative_to(project_root.resolve()))
    except ValueError:
        return str(script)


def _source_type(location: str) -> str:
    """MLflow's names: ``local`` for a path or ``file://``, else the URI scheme (s3, gs, ...)."""
    scheme = urlparse(location).scheme
    return "local" if scheme in ("", "file") or len(scheme) == 1 else scheme
