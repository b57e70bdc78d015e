"""The model as an MLflow pyfunc: a DataFrame of encoded images in, one row of detections each out.

Input: a column ``image`` holding each image file's bytes (JPEG, PNG, ...; base64 text is
accepted too, as a REST client sends it). Output: one row per image with ``boxes``
(x1, y1, x2, y2 in the image's own pixels), ``labels``, ``category_ids``, ``category_names``,
``scores`` and ``masks`` (COCO compressed RLE, ``{"size": [h, w], "counts": str}``).
Parameter ``score_threshold`` (default 0.5) drops weaker detections.

The artifacts are the model file and its categories JSON; the ``maskrcnn`` and ``pipeline``
packages travel as code paths, so ``mlflow.pyfunc.load_model`` works in a fresh process.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from pipeline.config.settings import REGISTRY_URI
from pipeline.inference.detector import Detector
from pipeline.io.images import ImageReadError, decode_rgb

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("boxes", "labels", "category_ids", "category_names", "scores", "masks")
DEFAULT_SCORE_THRESHOLD = 0.5
TRACKING_ENV = "MLFLOW_TRACKING_URI"


class MaskRCNNPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the model file from the artifacts once; ``predict`` runs it per image."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        with open(context.artifacts["categories"]) as f:
            categories = json.load(f)
        self.detector = Detector.from_file(context.artifacts["model"], categories=categories)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """A bad request (no ``image`` column, no rows, bytes that are not an image, a bad
        threshold) is an ``INVALID_PARAMETER_VALUE`` error naming the row: the scoring server
        answers it with a 400 and the message, other errors with a 500."""
        try:
            threshold = score_threshold(params)
            images = [decode_image(v, row=i) for i, v in enumerate(image_column(model_input))]
        except ValueError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        rows = []
        for image in images:
            (detection,) = self.detector.detect([image], score_threshold=threshold)
            record = self.detector.to_record(detection)
            rows.append({key: record[key] for key in OUTPUT_COLUMNS})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def image_column(model_input: object) -> pd.Series:
    """The ``image`` column of a request with at least one row."""
    if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input:
        raise ValueError(
            f"the input needs a column {INPUT_COLUMN!r} of encoded image bytes "
            "(base64 text in JSON)"
        )
    if model_input.empty:
        raise ValueError(f"the input has no rows: send one {INPUT_COLUMN!r} per image")
    return model_input[INPUT_COLUMN]


def score_threshold(params: dict[str, Any] | None) -> float:
    value = (params or {}).get("score_threshold", DEFAULT_SCORE_THRESHOLD)
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score_threshold must be a number, got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {threshold}")
    return threshold


def decode_image(value: bytes | str, *, row: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB from encoded image bytes or their base64 text."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise ValueError(f"row {row}: a str image must be base64 text ({err})") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"row {row}: expected image bytes, got {type(value).__name__}")
    try:
        return decode_rgb(bytes(value))
    except ImageReadError as err:
        raise ValueError(f"row {row}: not a readable image ({err})") from None


def input_example(image_bytes: bytes) -> pd.DataFrame:
    return pd.DataFrame({INPUT_COLUMN: [image_bytes]})


def model_signature() -> ModelSignature:
    """The input column, the output columns and the ``score_threshold`` parameter."""
    rle = Object([Property("size", Array("long")), Property("counts", "string")])
    outputs = Schema(
        [
            ColSpec(Array(Array("double")), "boxes"),
            ColSpec(Array("long"), "labels"),
            ColSpec(Array("long"), "category_ids"),
            ColSpec(Array("string"), "category_names"),
            ColSpec(Array("double"), "scores"),
            ColSpec(Array(rle), "masks"),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("score_threshold", "double", DEFAULT_SCORE_THRESHOLD)]),
    )


def load_detector(
    model: str | os.PathLike, *, tracking_uri: str | None = None, device: str | None = None
) -> Detector:
    """A local model file, or a registered model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/...``), on ``device`` (default: the GPU when there is one).

    A registered model's files are downloaded and loaded like a local one, so the Detector
    is built on the requested device instead of being moved there after a pyfunc load.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(model).startswith(("models:/", "runs:/")):
        return Detector.from_file(model, device=device)
    files = download_model_files(str(model), tracking_uri=tracking_uri)
    return Detector.from_file(files.model_file, categories=files.categories, device=device)


@dataclass(frozen=True, kw_only=True)
class ModelFiles:
    """A logged model's files on this machine, and the registry version it came from."""

    model_file: Path
    categories: list[dict[str, Any]] | None
    uri: str  # as downloaded: ``models:/<name>/<version>`` for a registered model
    name: str | None = None
    version: int | None = None
    run_id: str | None = None  # the run that logged the version


def download_model_files(
    model: str, *, tracking_uri: str | None = None, dst_dir: str | os.PathLike | None = None
) -> ModelFiles:
    """Download a ``models:/`` or ``runs:/`` model logged by this pipeline (into ``dst_dir``,
    default a new temporary directory). An alias is resolved to its version first, and that
    version is what is downloaded, so the files and the version number agree."""
    with use_tracking_uri(tracking_uri):
        where = mlflow.get_tracking_uri()
        try:
            name, version, run_id = _registered_version(model)
            uri = f"models:/{name}/{version}" if name else model
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(dst_dir) if dst_dir else None
                )
            )
        except mlflow.exceptions.MlflowException as err:
            raise ValueError(f"cannot load {model} from {where}: {err.message}") from err
    flavor = Model.load(local / "MLmodel").flavors.get("python_function", {})
    artifacts = {name: local / spec["path"] for name, spec in flavor.get("artifacts", {}).items()}
    if "model" not in artifacts:
        raise ValueError(f"{model} is not a model registered by this pipeline (no model file)")
    categories = (
        json.loads(artifacts["categories"].read_text()) if "categories" in artifacts else None
    )
    return ModelFiles(
        model_file=artifacts["model"],
        categories=categories,
        uri=uri,
        name=name,
        version=version,
        run_id=run_id,
    )


def parse_registered_uri(uri: str) -> tuple[str, str | None, int | None] | None:
    """``models:/<name>@<alias>`` -> (name, alias, None), ``models:/<name>/<version>`` ->
    (name, None, version); anything else -> None."""
    match = REGISTRY_URI.fullmatch(uri)
    if match is None:
        return None
    name, alias, version = match.groups()
    return name, alias, int(version) if version else None


def _registered_version(model: str) -> tuple[str | None, int | None, str | None]:
    """(name, version, run id) of a ``models:/`` URI; (None, None, None) for other URIs."""
    parsed = parse_registered_uri(model)
    if parsed is None:
        return None, None, None
    name, alias, number = parsed
    client = MlflowClient()
    found = (
        client.get_model_version_by_alias(name, alias)
        if alias
        else client.get_model_version(name, str(number))
    )
    return name, int(found.version), found.run_id


@contextmanager
def use_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a while, then back (None: leave it as it is).

    ``log_model``, ``load_model("models:/...")`` and the registry's model lookup go through the
    fluent URI. ``set_tracking_uri`` also exports MLFLOW_TRACKING_URI for subprocesses, and an
    explicitly set URI always lives in that variable, so the variable is what is restored.
    """
    if not uri:
        yield
        return
    previous = os.environ.get(TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: MLflow's default again, variable removed
