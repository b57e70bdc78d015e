"""REST serving: the real `mlflow models serve` on the registry alias answers like the Detector.

A tiny model is registered in a temporary SQLite store; the server runs from
``models:/<name>@champion`` with ``--env-manager local`` on a free loopback port, with the
environment that ``make serve`` gives it (the venv's bin/ on PATH, so that uvicorn is found, and
MLFLOW_TRACKING_URI). Two images are posted as base64 in a ``dataframe_split`` request and the
detections are compared with ``Detector`` on the same images; bad requests get a 400 that names
the problem and carries no traceback. The server is stopped at the end, also when a test fails.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.inference.detector import Detector
from pipeline.registry.pyfunc import decode_image
from pipeline.registry.register import example_image, register

pytestmark = pytest.mark.e2e

MODEL_NAME = "serve-maskrcnn"
CATEGORIES = [{"id": 4, "name": "circle", "label": 1}, {"id": 9, "name": "square", "label": 2}]
START_TIMEOUT_S = 300  # loading torch and the model on 2 busy cores took up to 165 s
REQUEST_TIMEOUT_S = 60


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "num_classes": 3,
            "backbone": "resnet18",
            "canvas": 64,
            "fpn_channels": 16,
            "roi": {"representation_size": 32, "mask_layers": [16], "score_thresh": 0.0},
            "rpn": {"pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(base: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_until_up(base: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()}"
            )
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(
        f"mlflow models serve did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()}"
    )


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow, uvicorn and its worker), then SIGKILL."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)


@pytest.fixture(scope="module")
def registered(sandbox: Path) -> dict:
    """A tiny model registered as the champion of MODEL_NAME in a SQLite store."""
    uri = f"sqlite:///{sandbox / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve", artifact_location=(sandbox / "art").as_uri())
    run = client.create_run(experiment)
    torch.manual_seed(0)
    model_path = sandbox / "model.pt"
    save_model(MaskRCNN(tiny_config()), model_path)
    decision = register(
        model_path=model_path,
        eval_metrics={"segm_AP": 0.5, "bbox_AP": 0.5},
        run_info={"run_id": run.info.run_id, "tracking_uri": uri},
        model_name=MODEL_NAME,
        min_segm_ap=0.1,
        out_path=sandbox / "decision.json",
        categories=CATEGORIES,
        onnx=False,  # served by the pyfunc's PyTorch model
    )
    assert decision["champion"]
    return {"uri": uri, "model_path": model_path}


@pytest.fixture(scope="module")
def server(sandbox: Path, registered: dict):
    """`mlflow models serve` on the champion alias, as `make serve` runs it."""
    port = _free_port()
    log_path = sandbox / "serve.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": registered["uri"],
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL_NAME}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=sandbox,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, process, log_path)
        yield base
    finally:
        _stop(process)


def _images() -> list[bytes]:
    rng = np.random.default_rng(7)
    noisy = rng.integers(0, 256, (80, 50, 3), dtype=np.uint8)
    noisy[20:60, 10:40] = (240, 200, 30)
    return [example_image(), _png(noisy)]


def test_two_images_give_the_detectors_detections(server, registered):
    images = _images()
    payload = {
        "dataframe_split": {"columns": ["image"], "data": [[_b64(b)] for b in images]},
        "params": {"score_threshold": 0.0},
    }
    status, body = _post(server, payload)
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 2
    detector = Detector.from_file(registered["model_path"], categories=CATEGORIES)
    for served, data in zip(predictions, images, strict=True):
        assert set(served) == {
            "boxes",
            "labels",
            "category_ids",
            "category_names",
            "scores",
            "masks",
        }
        (detection,) = detector.detect([decode_image(data)], score_threshold=0.0)
        expected = detector.to_record(detection)
        assert len(expected["scores"]) > 0  # a model with score_thresh 0 always detects
        assert served["labels"] == expected["labels"]
        assert served["category_names"] == expected["category_names"]
        assert served["category_ids"] == expected["category_ids"]
        np.testing.assert_allclose(served["scores"], expected["scores"], atol=1e-4)
        np.testing.assert_allclose(served["boxes"], expected["boxes"], atol=0.02)
        assert served["masks"] == expected["masks"]  # COCO RLE, {"size": [h, w], "counts"}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"columns": ["picture"], "data": [["aGVsbG8="]]}, "image"),
        ({"columns": ["image"], "data": [[_b64(b"these bytes are not an image")]]}, "row 0"),
        ({"columns": ["image"], "data": []}, "no rows"),
    ],
    ids=["no-image-column", "not-an-image", "empty-frame"],
)
def test_bad_requests_get_a_400_with_a_message(server, frame, message):
    status, body = _post(server, {"dataframe_split": frame})
    assert 400 <= status < 500, body
    assert message in body.get("message", ""), body
    assert "Traceback" not in json.dumps(body) and "stack_trace" not in body
