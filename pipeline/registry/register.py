"""Register a trained model in MLflow and decide whether it becomes the champion.

Every new version gets the alias ``challenger`` (the newest candidate). The alias ``champion``
moves to it only when its segm AP reaches the floor and beats the current champion's, so
``models:/<name>@champion`` is always the best model seen. Each version carries its eval
figures as tags (``segm_AP``, ``bbox_AP``), which is where the next comparison reads them.
A model fine-tuned from a version of the same name (``init: registry``: the run's
``parent_model_*`` tags) must also beat that parent, when the parent's figure was measured on
the same val shards (same digest of the val dataset input); otherwise the decision says the
parent was not compared (the parent is not evaluated again here).

The version's files hold the ONNX graph too (``artifacts/model.onnx``, ``ONNX_ARTIFACT``), for
serving without PyTorch; without the optional extra ``onnx`` it is left out, with a log line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from PIL import Image

import maskrcnn
import pipeline
from pipeline.inference.detector import read_model_info
from pipeline.inference.onnx import export_detector
from pipeline.registry.lineage import PARENT_VERSION_TAG, version_description
from pipeline.registry.pyfunc import (
    MaskRCNNPyfunc,
    input_example,
    load_detector,
    model_signature,
    use_tracking_uri,
)

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SEGM_TAG, BBOX_TAG = "segm_AP", "bbox_AP"
PARENT_NAME_TAG, PARENT_URI_TAG = "parent_model_name", "parent_model_uri"  # set by train
RUN_METRIC = "eval/segm_AP"  # what evaluate logs; read when a champion lacks the tag
ONNX_ARTIFACT = "onnx"  # the pyfunc artifact key: artifacts/model.onnx in the version's files
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pillow", "pycocotools", "mlflow")


def register(
    *,
    model_path: str | os.PathLike,
    eval_metrics: Mapping[str, Any] | str | os.PathLike,
    run_info: Mapping[str, str] | str | os.PathLike,
    model_name: str,
    min_segm_ap: float,
    out_path: str | os.PathLike,
    tracking_uri: str | None = None,
    categories: list[dict[str, Any]] | None = None,
    onnx: bool = True,
) -> dict[str, Any]:
    """Log the model as a pyfunc to the training run, register a version, set the aliases.

    ``eval_metrics``: evaluate's metrics (dict or metrics.json path); ``run_info``: run.json
    (dict or path) with ``run_id`` and ``tracking_uri``; ``tracking_uri`` overrides the latter.
    ``categories`` ([{id, name, label}]) default to those stored in the model file.
    ``onnx``: store the ONNX export with the version too (needs the optional extra).
    Returns (and writes to ``out_path``) the decision.
    """
    metrics = _read_json(eval_metrics, "eval metrics")
    run = _read_json(run_info, "run info")
    if "run_id" not in run:
        raise ValueError(f"run info {run_info} has no run_id")
    segm_ap, bbox_ap = _figure(metrics, "segm_AP"), _figure(metrics, "bbox_AP")
    _, stored_categories = read_model_info(model_path)  # also: the file exists and is a model
    uri = tracking_uri or run.get("tracking_uri") or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    previous = _champion(client, model_name)
    parent = _parent(client, run["run_id"], model_name)
    promote, reason = decide(
        segm_ap=segm_ap, min_segm_ap=min_segm_ap, champion=previous, parent=parent
    )
    # Inside: the registry resolves the logged model's location through the fluent URI too.
    with use_tracking_uri(uri):
        logged = _log_pyfunc(
            model_path,
            run_id=run["run_id"],
            categories=categories or stored_categories or [],
            onnx=onnx,
        )
        if _registered(client, model_name) is None:
            client.create_registered_model(model_name)
        new = client.create_model_version(
            model_name,
            source=logged.model_uri,
            run_id=run["run_id"],
            model_id=logged.model_id,
            tags={SEGM_TAG: str(segm_ap), BBOX_TAG: str(bbox_ap), "decision": reason},
            description=version_description(
                client, run["run_id"], segm_ap=segm_ap, bbox_ap=bbox_ap, decision=reason
            ),
        )
    client.set_registered_model_alias(model_name, CHALLENGER, new.version)
    if promote:
        client.set_registered_model_alias(model_name, CHAMPION, new.version)
    decision = {
        "model_name": model_name,
        "version": int(new.version),
        "model_uri": f"models:/{model_name}/{new.version}",
        "champion": promote,
        "reason": reason,
        "segm_ap": segm_ap,
        "bbox_ap": bbox_ap,
        "min_segm_ap": min_segm_ap,
        "previous_champion": previous,
        "parent": parent,
        "parent_segm_ap": parent["segm_ap"] if parent else None,
        "run_id": run["run_id"],
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(decision, indent=2) + "\n")
    log.info("%s version %s: %s", model_name, new.version, reason)
    return decision


def decide(
    *,
    segm_ap: float,
    min_segm_ap: float,
    champion: Mapping[str, Any] | None,
    parent: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """(promote, reason): the floor first, then strictly better than the parent the model was
    fine-tuned from (when its figure is on the same val set), then than the champion."""
    if segm_ap < min_segm_ap:
        return False, f"segm AP {segm_ap:.4f} is below the floor {min_segm_ap:.4f}"
    versus_parent = ""
    if parent is not None:
        base = parent.get("segm_ap")
        if not parent.get("same_val_set") or base is None:
            versus_parent = f"; parent version {parent['version']} not compared ({parent['why']})"
        elif segm_ap <= base:
            return False, (
                f"segm AP {segm_ap:.4f} does not beat its parent version {parent['version']} "
                f"({base:.4f}) on the same val set"
            )
        else:
            versus_parent = f"; beats its parent version {parent['version']} ({base:.4f})"
    promote, reason = _versus_champion(segm_ap, min_segm_ap, champion)
    return promote, reason + versus_parent


def _versus_champion(
    segm_ap: float, min_segm_ap: float, champion: Mapping[str, Any] | None
) -> tuple[bool, str]:
    if champion is None:
        return True, f"first model with segm AP {segm_ap:.4f} >= floor {min_segm_ap:.4f}"
    best = champion.get("segm_ap")
    if best is None:
        return True, f"champion version {champion['version']} has no recorded segm AP"
    if segm_ap > best:
        return True, (
            f"segm AP {segm_ap:.4f} beats champion version {champion['version']} ({best:.4f})"
        )
    return False, (
        f"segm AP {segm_ap:.4f} does not beat champion version {champion['version']} ({best:.4f})"
    )


def _parent(client: MlflowClient, run_id: str, name: str) -> dict[str, Any] | None:
    """The version this run was fine-tuned from, when it is a version of ``name``: its segm
    AP (tag, else its run's metric) and whether it was measured on this run's val shards
    (the val dataset inputs of both runs have the same digest)."""
    tags = client.get_run(run_id).data.tags
    if tags.get(PARENT_NAME_TAG) != name or PARENT_VERSION_TAG not in tags:
        return None
    version = client.get_model_version(name, tags[PARENT_VERSION_TAG])
    ours, theirs = _val_digest(client, run_id), _val_digest(client, version.run_id)
    same = ours is not None and ours == theirs
    return {
        "version": int(version.version),
        "uri": tags.get(PARENT_URI_TAG, f"models:/{name}/{version.version}"),
        "run_id": version.run_id,
        "segm_ap": _segm_ap(client, version),
        "same_val_set": same,
        "why": "same val shards"
        if same
        else f"its val shards {theirs or 'unknown'}, ours {ours or 'unknown'}",
    }


def _val_digest(client: MlflowClient, run_id: str | None) -> str | None:
    """The digest of a run's validation dataset input (None: the run logged none)."""
    if not run_id:
        return None
    for dataset_input in client.get_run(run_id).inputs.dataset_inputs:
        if any(
            t.key == MLFLOW_DATASET_CONTEXT and t.value == "validation" for t in dataset_input.tags
        ):
            return dataset_input.dataset.digest
    return None


def _registered(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def _champion(client: MlflowClient, name: str) -> dict[str, Any] | None:
    """The current champion's version, run and segm AP (tag, else its run's metric)."""
    model = _registered(client, name)
    if model is None or CHAMPION not in model.aliases:
        return None
    current = client.get_model_version(name, model.aliases[CHAMPION])
    segm_ap = _segm_ap(client, current)
    return {"version": int(current.version), "segm_ap": segm_ap, "run_id": current.run_id}


def _segm_ap(client: MlflowClient, version: ModelVersion) -> float | None:
    """A version's segm AP: its tag, else its run's metric, else None."""
    if SEGM_TAG in version.tags:
        return float(version.tags[SEGM_TAG])
    if version.run_id:
        return client.get_run(version.run_id).data.metrics.get(RUN_METRIC)
    return None


def _log_pyfunc(
    model_path: str | os.PathLike, *, run_id: str, categories: list, onnx: bool
) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc into run ``run_id`` (as an MLflow 3 logged model linked to the run)."""
    with tempfile.TemporaryDirectory() as tmp:
        categories_path = Path(tmp) / "categories.json"
        categories_path.write_text(json.dumps(categories, indent=1))
        artifacts = {"model": str(model_path), "categories": str(categories_path)}
        onnx_path = _export_onnx(model_path, Path(tmp) / "model.onnx") if onnx else None
        if onnx_path:
            artifacts[ONNX_ARTIFACT] = str(onnx_path)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MaskRCNNPyfunc(),
                artifacts=artifacts,
                code_paths=[str(Path(package.__file__).parent) for package in (maskrcnn, pipeline)],
                signature=model_signature(),
                input_example=input_example(example_image()),
                pip_requirements=_requirements(),
            )
    return info


def _export_onnx(model_path: str | os.PathLike, path: Path) -> Path | None:
    """The model's ONNX file at ``path``, or None (logged) without the optional extra."""
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        log.info("onnx is not installed (the optional extra 'onnx'): no model.onnx registered")
        return None
    return export_detector(load_detector(model_path, device="cpu"), path)


def example_image() -> bytes:
    """A small PNG (a bright square on grey) for the model's input example."""
    pixels = np.full((48, 64, 3), 96, np.uint8)
    pixels[12:36, 20:44] = (230, 80, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _requirements() -> list[str]:
    """Pinned to what is installed here (local version labels such as +cu130 dropped)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _read_json(source: Mapping[str, Any] | str | os.PathLike, what: str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    try:
        return json.loads(Path(source).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: cannot read the {what} ({err})") from err


def _figure(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        raise ValueError(f"eval metrics have no number {key!r} (got {value!r})")
    return float(value)
