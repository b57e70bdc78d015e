"""The MLflow UI: a real `mlflow server` on a loopback port shows what train, evaluate and
register log.

The pipeline code logs through the server's HTTP API (as it would on a cluster); the tests
read the run, its metric history, dataset inputs and source, and the registered model's aliases
and description back through the REST API that the UI itself uses, then render the UI's pages
in headless Chromium and check what they show. The server is always stopped, also when a test
fails.
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
from dataclasses import dataclass
from pathlib import Path

import chromium
import pytest
import torch
from mlflow.tracking import MlflowClient

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.evaluation.evaluate import log_to_run
from pipeline.registry.lineage import (
    ShardInput,
    git_commit,
    log_shard_inputs,
    shard_inputs,
    source_tags,
)
from pipeline.registry.register import register
from pipeline.registry.tracking import RunRef, attached_run, log_metrics, open_or_create_run

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]  # the project checkout: its git commit is the source
EXPERIMENT, RUN_NAME, MODEL_NAME = "maskrcnn-ui", "shapes-train", "ui-maskrcnn"
START_TIMEOUT_S = 90
LOSS_STEPS = 8
METRICS = {
    "segm_AP": 0.61,
    "bbox_AP": 0.66,
    "num_images": 4,
    "per_class": {"segm": {"circle": 0.7, "square": 0.52}},
}
TINY_MODEL = {
    "num_classes": 3,
    "backbone": "resnet18",
    "canvas": 64,
    "fpn_channels": 16,
    "roi": {"representation_size": 32, "mask_layers": [16]},
}


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
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = (
        "false"  # seven job workers the UI's pages never use
    )
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


@dataclass(frozen=True, kw_only=True)
class Registered:
    """What the pipeline's own code logged to the server: one training run, its model."""

    base: str
    run: RunRef
    inputs: tuple[ShardInput, ...]
    losses: tuple[float, ...]


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory) -> Registered:
    """A run as train, evaluate and register leave it: created by the pipeline's code (the
    experiment kind, the source), the shards as dataset inputs, losses logged as rank 0 logs
    them, evaluate's figures, a registered champion version."""
    tmp = tmp_path_factory.mktemp("ui_run")
    run = open_or_create_run(
        tracking_uri=mlflow_server, experiment=EXPERIMENT, run_name=RUN_NAME, project_root=ROOT
    )
    shards = tmp / "shards"
    for split, images in (("train", 12), ("val", 4)):
        (shards / split).mkdir(parents=True)
        (shards / split / "manifest.json").write_text(json.dumps(_manifest(split, images)))
    inputs = tuple(shard_inputs(shards))
    log_shard_inputs(MlflowClient(mlflow_server), run.run_id, inputs)
    losses = tuple(3.0 / step for step in range(1, LOSS_STEPS + 1))
    with attached_run(run, system_metrics=False) as client:
        for step, loss in enumerate(losses, start=1):
            log_metrics(client, run, {"loss": loss, "loss_mask": loss / 3}, step=step)

    eval_dir = tmp / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps(METRICS))
    log_to_run(run.to_dict(), METRICS, eval_dir)
    torch.manual_seed(0)
    model_path = tmp / "model.pt"
    save_model(MaskRCNN(ModelConfig.from_dict(TINY_MODEL)), model_path)
    decision = register(
        model_path=model_path,
        eval_metrics=METRICS,
        run_info=run.to_dict(),
        model_name=MODEL_NAME,
        min_segm_ap=0.5,
        out_path=tmp / "reg.json",
        onnx=False,
    )
    assert decision["champion"] and decision["version"] == 1
    return Registered(base=mlflow_server, run=run, inputs=inputs, losses=losses)


def _manifest(split: str, images: int) -> dict:
    """A split's manifest as preprocess writes it (what the dataset inputs are made of)."""
    return {
        "format_version": 1,
        "split": split,
        "canvas": 64,
        "annotation_sha256": f"sha-of-instances_{split}.json",
        "categories": [{"id": 1, "name": "circle", "label": 1}],
        "counts": {"images": images, "instances": 4 * images, "shards": 1, "bytes_written": 9000},
        "shards": [{"file": "part-00000.parquet", "rows": images, "bytes": 9000}],
    }


def test_ui_shows_the_run_its_metrics_and_the_model_aliases(registered):
    base, run_id = registered.base, registered.run.run_id
    got = _get(base, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    logged = {m["key"]: m["value"] for m in got["data"]["metrics"]}
    assert logged["eval/segm_AP"] == pytest.approx(0.61)
    assert logged["eval/segm_AP/circle"] == pytest.approx(0.7)
    history = _get(
        base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="eval/bbox_AP"
    )["metrics"]
    assert [m["value"] for m in history] == [pytest.approx(0.66)]

    files = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="eval")
    assert "eval/metrics.json" in {f["path"] for f in files["files"]}

    model = _get(base, "/api/2.0/mlflow/registered-models/get", name=MODEL_NAME)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion": "1",
        "challenger": "1",
    }
    champion = _get(
        base, "/api/2.0/mlflow/registered-models/alias", name=MODEL_NAME, alias="champion"
    )["model_version"]
    assert champion["run_id"] == run_id
    assert {t["key"]: t["value"] for t in champion["tags"]}["segm_AP"] == "0.61"

    with urllib.request.urlopen(f"{base}/", timeout=10) as page:  # the UI itself
        assert page.status == 200 and "<html" in page.read().decode().lower()


def test_the_run_records_its_experiment_kind_source_data_and_the_version_its_lineage(registered):
    base, run_id = registered.base, registered.run.run_id
    experiment = _get(
        base, "/api/2.0/mlflow/experiments/get", experiment_id=registered.run.experiment_id
    )["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}[
        "mlflow.experimentKind"
    ] == "custom_model_development"

    run = _get(base, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags.get("mlflow.source.git.commit") == git_commit(ROOT)  # None outside a checkout
    datasets = {
        d["dataset"]["name"]: (d["dataset"]["digest"], {t["key"]: t["value"] for t in d["tags"]})
        for d in run["inputs"]["dataset_inputs"]
    }
    assert datasets == {
        shard.name: (shard.digest, {"mlflow.data.context": shard.context})
        for shard in registered.inputs
    }

    version = _get(base, "/api/2.0/mlflow/model-versions/get", name=MODEL_NAME, version="1")
    description = version["model_version"]["description"]
    assert "**segm AP** 0.6100, **bbox AP** 0.6600" in description
    assert f"`{RUN_NAME}` (`{run_id}`)" in description
    for shard in registered.inputs:
        assert f"`{shard.name}` ({shard.context}) digest `{shard.digest}`" in description


def test_the_browser_shows_the_runs_the_loss_chart_the_datasets_and_the_champion(
    registered, tmp_path
):
    """Chromium renders the UI's pages from the server; what a person would see is asserted,
    and the screenshots are kept (their paths are printed)."""
    if chromium.binary() is None:
        pytest.fail(f"no {chromium.BINARY} on PATH: install it ({chromium.INSTALL})")
    base, run = registered.base, registered.run
    training = "?workflowType=machine_learning"  # the UI's "Model training" mode (README)
    train_input = registered.inputs[0]
    pages = {
        "runs": f"/#/experiments/{run.experiment_id}/runs{training}",
        "metrics": f"/#/experiments/{run.experiment_id}/runs/{run.run_id}/model-metrics{training}",
        "model": f"/#/models/{MODEL_NAME}{training}",
        "version": f"/#/models/{MODEL_NAME}/versions/1{training}",
    }
    expected = {
        "runs": [RUN_NAME, f"{train_input.name} ({train_input.digest})", "training"],
        "metrics": [RUN_NAME, "Model metrics", "loss_mask", "bbox_AP"],
        "model": [MODEL_NAME, "@ champion", "@ challenger", "segm_AP"],
        "version": ["@ champion", f"digest {train_input.digest}", RUN_NAME],
    }
    doms = {}
    for name, path in pages.items():
        shot = tmp_path / f"{name}.png"
        doms[name] = _render_until(base + path, shot, tmp_path / f"profile-{name}", expected[name])
        print(f"screenshot of {path}: {shot}")
    runs = chromium.text(doms["runs"])
    source = Path(source_tags(ROOT)["mlflow.source.name"]).name
    assert source in runs, f"the runs table shows no Source {source!r}: {runs[:1500]}"
    points = _chart_points(doms["metrics"], "loss")
    assert points == len(registered.losses), f"the loss chart has {points} points"


def _render_until(url: str, shot: Path, profile: Path, wanted: list[str]) -> str:
    """The page's DOM once every ``wanted`` text is on it; again with longer budgets on a slow
    machine (a loaded one has drawn the sections but not yet their charts) before failing with
    what the page did show."""
    shown, missing = "", wanted
    for budget_ms in (15000, 45000, 120000):
        try:
            dom = chromium.render(url, screenshot=shot, profile=profile, budget_ms=budget_ms)
        except TimeoutError as err:
            shown = str(err)
            continue
        shown = chromium.text(dom)
        missing = [w for w in wanted if w not in shown]
        if not missing:
            return dom
    pytest.fail(f"{url} does not show {missing} (screenshot {shot}):\n{shown[:2000]}")


def _chart_points(dom: str, metric: str) -> int:
    """Plotted points in the chart card titled ``metric`` (up to the next card's title)."""
    start = dom.find(f'title="{metric}">{metric}<')
    assert start >= 0, f"no chart titled {metric!r} on the metrics page"
    end = dom.find("<h4", start + 1)
    return dom[start : end if end > 0 else len(dom)].count('class="point"')
