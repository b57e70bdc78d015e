"""The run plan: what a training run resolves to, computed once before it starts.

Ray Train resumes whatever run directory ``<storage>/<name>`` it is pointed at. The directory
name is ``<run_name>-<recipe hash>``: rerunning the same recipe under the same run name (after a
crash, a stop, or with more steps) resumes it, while a changed recipe (another learning rate,
another model, other train data) starts a fresh run instead of silently continuing the old one;
this is what ``dvc repro`` after a params change needs. Beside Ray's files we keep
``maskrcnn_run.json``: the recipe in full, and the MLflow run id, so that a resumed run logs
into the same MLflow run.

``plan_run`` resolves the paths, reads the train split's manifest and hashes the recipe, once;
``open_run`` finds or creates the MLflow run of the plan. With ``init: registry`` the plan also
resolves the parent model once, on the driver: the alias to a version (the version, not the
alias, is part of the recipe: another parent is another run directory) and its weights. The
trainer and the outputs read the plan and recompute none of it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from maskrcnn.checkpoints import read_model_state
from maskrcnn.config import ModelConfig
from pipeline.config.settings import RESUMABLE_CHANGES, TrackingSettings, TrainSettings
from pipeline.io import storage
from pipeline.registry.lineage import PARENT_VERSION_TAG
from pipeline.registry.pyfunc import download_model_files
from pipeline.registry.register import PARENT_NAME_TAG, PARENT_URI_TAG
from pipeline.registry.tracking import (
    RunRef,
    check_server,
    open_or_create_run,
    resolve_tracking_uri,
)
from pipeline.shards.schema import read_manifest
from pipeline.training.schedule import in_steps

MANIFEST = "maskrcnn_run.json"
# What of the train split's manifest names the data trained on: the annotations, how the images
# are stored, the scales whose targets it holds.
DATA_KEYS = ("annotation_sha256", "image_format", "train_scales")


@dataclass(frozen=True, kw_only=True)
class ParentModel:
    """The registered model version a fine-tuning starts from, with its weights in memory."""

    name: str
    version: int
    uri: str  # models:/<name>/<version>
    requested: str  # weights_path as given (an alias, or the same URI)
    run_id: str | None
    categories: tuple[Mapping[str, Any], ...]
    state_dict: Mapping[str, torch.Tensor] = field(repr=False, compare=False)

    def same_classes(self, categories: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the new data's classes are the parent's (same names under the same labels):
        only then do the class-specific predictor layers keep the parent's weights."""
        return _labels(self.categories) == _labels(categories)

    def tags(self) -> dict[str, str]:
        """What the run records about its parent (MLflow tags)."""
        return {
            PARENT_NAME_TAG: self.name,
            PARENT_VERSION_TAG: str(self.version),
            PARENT_URI_TAG: self.uri,
        }


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
    parent: ParentModel | None = None  # init: registry

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
    tracking_uri = resolve_tracking_uri(tracking.uri, project_root=project_root)
    parent = None
    if settings.init == "registry":
        parent = resolve_parent(settings.weights_path or "", tracking_uri=tracking_uri)
    manifest = read_manifest(train_dir) if train_manifest is None else train_manifest
    spec = recipe(settings, model_config, parent=parent, train_manifest=manifest)
    return RunPlan(
        settings=in_steps(settings, manifest),  # epochs -> steps, once (the recipe keeps epochs)
        model_config=model_config,
        shards_dir=str(shards_dir),
        train_dir=train_dir,
        train_manifest=manifest,
        recipe=spec,
        recipe_hash=recipe_hash(spec),
        tracking_uri=tracking_uri,
        experiment=tracking.experiment,
        project_root=Path(project_root),
        parent=parent,
    )


def resolve_parent(weights_path: str, *, tracking_uri: str) -> ParentModel:
    """Download a registered model version (alias resolved) and read its weights; the
    downloaded files are removed again, the weights stay in memory for the workers."""
    check_server(tracking_uri)  # a down server fails at once instead of after MLflow's retries
    with tempfile.TemporaryDirectory(prefix="maskrcnn-parent-") as tmp:
        files = download_model_files(weights_path, tracking_uri=tracking_uri, dst_dir=tmp)
        state = read_model_state(files.model_file)
    if files.name is None or files.version is None:
        raise ValueError(f"weights_path {weights_path!r} is not a registered model version")
    return ParentModel(
        name=files.name,
        version=files.version,
        uri=files.uri,
        requested=weights_path,
        run_id=files.run_id,
        categories=tuple(files.categories or ()),
        state_dict=state,
    )


def recipe(
    settings: TrainSettings,
    model_config: ModelConfig,
    *,
    parent: ParentModel | None = None,
    train_manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that define what is trained: all but those a resume may change, and the
    train data (``DATA_KEYS`` of its manifest), so that ``dvc repro`` after new data or other
    training scales trains again instead of rewriting the finished run's model. A parent
    model enters as its version (``models:/<name>/<n>``), not as the alias asked for."""
    train = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}
    if parent is not None:
        train["weights_path"] = parent.uri
    data = {k: (train_manifest or {}).get(k) for k in DATA_KEYS}
    return json.loads(json.dumps({"train": train, "model": model_config.to_dict(), "data": data}))


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


def _labels(categories: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    return sorted((int(c["label"]), str(c["name"])) for c in categories)
