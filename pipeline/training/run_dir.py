"""The run plan: what a training run resolves to, computed once before it starts.

Ray Train resumes whatever run directory ``<storage>/<name>`` it is pointed at. The directory
name is ``<run_name>-<recipe hash>``: rerunning the same recipe under the same run name (after a
crash, a stop, or with more steps) resumes it, while a changed recipe (another learning rate,
another model) starts a fresh run instead of silently continuing the old one; this is what
``dvc repro`` after a params change needs. Beside Ray's files we keep ``maskrcnn_run.json``:
the recipe in full, and the MLflow run id, so that a resumed run logs into the same MLflow run.

``plan_run`` resolves the paths, reads the train split's manifest and hashes the recipe, once;
``open_run`` finds or creates the MLflow run of the plan. The trainer and the outputs read the
plan and recompute none of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from maskrcnn.config import ModelConfig
from pipeline.config.settings import RESUMABLE_CHANGES, TrackingSettings, TrainSettings
from pipeline.io import storage
from pipeline.registry.tracking import RunRef, open_or_create_run, resolve_tracking_uri
from pipeline.shards.schema import read_manifest

MANIFEST = "maskrcnn_run.json"


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """A training run, resolved. ``settings.storage_path``, ``train_dir`` and ``tracking_uri``
    are absolute (Ray workers run in other directories, on a cluster on other machines)."""

    settings: TrainSettings
    model_config: ModelConfig
    shards_dir: str  # as given: what MLflow records
    train_dir: str
    train_manifest: Mapping[str, Any]
    recipe: Mapping[str, Any]
    recipe_hash: str
    tracking_uri: str
    experiment: str
    project_root: Path

    @property
    def name(self) -> str:
        """The Ray run name: ``<run_name>-<recipe hash>``."""
        return f"{self.settings.run_name}-{self.recipe_hash}"

    @property
    def directory(self) -> str:
        """The Ray run directory: ``<storage_path>/<name>``."""
        return storage.join(self.settings.storage_path, self.name)


def plan_run(
    *,
    settings: TrainSettings,
    model_config: ModelConfig,
    shards_dir: storage.Location,
    tracking: TrackingSettings,
    project_root: Path,
    train_manifest: Mapping[str, Any] | None = None,
) -> RunPlan:
    """Resolve a run; relative paths are taken from ``project_root``. ``train_manifest``: the
    train split's manifest when the caller has read it (else it is read here)."""
    settings = replace(
        settings, storage_path=storage.absolute(settings.storage_path, root=project_root)
    )
    train_dir = storage.join(storage.absolute(shards_dir), "train")
    spec = recipe(settings, model_config)
    return RunPlan(
        settings=settings,
        model_config=model_config,
        shards_dir=str(shards_dir),
        train_dir=train_dir,
        train_manifest=read_manifest(train_dir) if train_manifest is None else train_manifest,
        recipe=spec,
        recipe_hash=recipe_hash(spec),
        tracking_uri=resolve_tracking_uri(tracking.uri, project_root=project_root),
        experiment=tracking.experiment,
        project_root=Path(project_root),
    )


def recipe(settings: TrainSettings, model_config: ModelConfig) -> dict[str, Any]:
    """The settings that define what is trained: all but those a resume may change."""
    train = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"train": train, "model": model_config.to_dict()}))


def recipe_hash(spec: Mapping[str, Any]) -> str:
    """8 hex digits of the recipe's SHA-256 (its JSON text, keys sorted)."""
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def open_run(plan: RunPlan) -> RunRef:
    """The MLflow run of the plan's Ray run: the recorded one when resuming, else a new one
    (recorded in ``<run directory>/maskrcnn_run.json`` with the recipe)."""
    manifest_path = storage.join(plan.directory, MANIFEST)
    try:
        manifest = storage.read_json(manifest_path)
    except storage.NotFound:
        manifest = {}
    run = open_or_create_run(
        tracking_uri=plan.tracking_uri,
        experiment=plan.experiment,
        run_name=plan.settings.run_name,
        project_root=plan.project_root,
        run_id=manifest.get("mlflow_run_id"),
        tags={"ray.run_dir": plan.directory},
    )
    manifest = {"recipe": plan.recipe, "mlflow_run_id": run.run_id}
    storage.write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return run
