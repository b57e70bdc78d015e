"""Which Ray run directory a training run uses, and the MLflow run that goes with it.

Ray Train resumes whatever run directory ``<storage>/<name>`` it is pointed at. The directory
name is ``<run_name>-<recipe hash>``: rerunning the same recipe under the same run name (after a
crash, a stop, or with more steps) resumes it, while a changed recipe (another learning rate,
another model) starts a fresh run instead of silently continuing the old one; this is what
``dvc repro`` after a params change needs. Beside Ray's files we keep ``maskrcnn_run.json``:
the recipe in full, and the MLflow run id, so that a resumed run logs into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from maskrcnn.config import ModelConfig
from pipeline.config.settings import RESUMABLE_CHANGES, TrainSettings
from pipeline.io import storage
from pipeline.registry.tracking import RunRef, open_or_create_run

MANIFEST = "maskrcnn_run.json"


def recipe(settings: TrainSettings, model_config: ModelConfig) -> dict[str, Any]:
    """The settings that define what is trained: all but those a resume may change."""
    train = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"train": train, "model": model_config.to_dict()}))


def ray_run_name(settings: TrainSettings, model_config: ModelConfig) -> str:
    """``<run_name>-<8 hex digits of the recipe's hash>``."""
    text = json.dumps(recipe(settings, model_config), sort_keys=True)
    return f"{settings.run_name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def ray_run_dir(settings: TrainSettings, model_config: ModelConfig) -> str:
    """``<storage_path>/<ray_run_name>``: the Ray run directory of this recipe."""
    return storage.join(settings.storage_path, ray_run_name(settings, model_config))


def open_run_for(
    *,
    settings: TrainSettings,
    model_config: ModelConfig,
    tracking_uri: str,
    experiment: str,
    project_root: Path,
) -> RunRef:
    """The MLflow run of this Ray run: the recorded one when resuming, else a new one."""
    where = ray_run_dir(settings, model_config)
    manifest_path = storage.join(where, MANIFEST)
    try:
        manifest = storage.read_json(manifest_path)
    except storage.NotFound:
        manifest = {}
    run = open_or_create_run(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=settings.run_name,
        project_root=project_root,
        run_id=manifest.get("mlflow_run_id"),
        tags={"ray.run_dir": where},
    )
    manifest = {"recipe": recipe(settings, model_config), "mlflow_run_id": run.run_id}
    storage.write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return run
