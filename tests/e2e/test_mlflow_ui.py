"""The MLflow UI: a real `mlflow server` on a loopback port shows what evaluate and register log.

The pipeline code logs through the server's HTTP API (as it would on a cluster); the test then
reads the run, its metric history and the registered model's aliases back through the REST API
that the UI itself uses. The server is always stopped, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.evaluation.evaluate import log_to_run
from pipeline.registry.register import register

pytestmark = pytest.mark.e2e

MODEL_NAME = "ui-maskrcnn"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, endpoint: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}{endpoint}{query}", timeout=10) as response:
        return json.loads(response.read())


def _wait_until_up(base: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it and its workers), SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log_path = root / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_up(base, server, log_path)
            yield base
        finally:
            _stop(server)


def test_ui_shows_the_run_its_metrics_and_the_model_aliases(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("ui-test")
    run_id = client.create_run(experiment_id, run_name="train").info.run_id
    run = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": mlflow_server}

    metrics = {
        "segm_AP": 0.61,
        "bbox_AP": 0.66,
        "num_images": 4,
        "per_class": {"segm": {"circle": 0.7, "square": 0.52}},
    }
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    log_to_run(run, metrics, eval_dir)

    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    save_model(
        MaskRCNN(
            ModelConfig.from_dict(
                {
                    "num_classes": 3,
                    "backbone": "resnet18",
                    "canvas": 64,
                    "fpn_channels": 16,
                    "roi": {"representation_size": 32, "mask_layers": [16]},
                }
            )
        ),
        model_path,
    )
    decision = register(
        model_path=model_path,
        eval_metrics=metrics,
        run_info=run,
        model_name=MODEL_NAME,
        min_segm_ap=0.5,
        out_path=tmp_path / "reg.json",
    )
    assert decision["champion"] and decision["version"] == 1

    got = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    logged = {m["key"]: m["value"] for m in got["data"]["metrics"]}
    assert logged["eval/segm_AP"] == pytest.approx(0.61)
    assert logged["eval/segm_AP/circle"] == pytest.approx(0.7)
    history = _get(
        mlflow_server,
        "/api/2.0/mlflow/metrics/get-history",
        run_id=run_id,
        metric_key="eval/bbox_AP",
    )["metrics"]
    assert [m["value"] for m in history] == [pytest.approx(0.66)]

    files = _get(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="eval")
    assert "eval/metrics.json" in {f["path"] for f in files["files"]}

    model = _get(mlflow_server, "/api/2.0/mlflow/registered-models/get", name=MODEL_NAME)[
        "registered_model"
    ]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion": "1",
        "challenger": "1",
    }
    champion = _get(
        mlflow_server, "/api/2.0/mlflow/registered-models/alias", name=MODEL_NAME, alias="champion"
    )["model_version"]
    assert champion["run_id"] == run_id
    assert {t["key"]: t["value"] for t in champion["tags"]}["segm_AP"] == "0.61"

    with urllib.request.urlopen(f"{mlflow_server}/", timeout=10) as page:  # the UI itself
        assert page.status == 200 and "<html" in page.read().decode().lower()
