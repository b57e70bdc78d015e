"""Registration: champion gating by segm AP and floor, and the champion loads and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.inference.detector import predict_files
from pipeline.registry.pyfunc import load_detector, use_tracking_uri
from pipeline.registry.register import decide, example_image, register

NAME = "shapes-maskrcnn"
CATEGORIES = [{"id": 4, "name": "circle", "label": 1}, {"id": 9, "name": "square", "label": 2}]


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


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store with one training run, and a saved tiny model."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("maskrcnn", artifact_location=(root / "art").as_uri())
    torch.manual_seed(0)
    model_path = root / "model.pt"
    save_model(MaskRCNN(tiny_config()), model_path)
    return {
        "root": root,
        "uri": uri,
        "client": client,
        "experiment_id": experiment_id,
        "model_path": model_path,
    }


def _register(store, name: str, segm_ap: float, *, floor: float = 0.3) -> dict:
    run = store["client"].create_run(store["experiment_id"])
    run_info = {
        "run_id": run.info.run_id,
        "experiment_id": store["experiment_id"],
        "tracking_uri": store["uri"],
    }
    metrics = {"segm_AP": segm_ap, "bbox_AP": segm_ap + 0.05}
    out = store["root"] / f"decision-{run.info.run_id}.json"
    decision = register(
        model_path=store["model_path"],
        eval_metrics=metrics,
        run_info=run_info,
        model_name=name,
        min_segm_ap=floor,
        out_path=out,
        categories=CATEGORIES,
        onnx=False,  # the export is checked once, below; it is most of a registration's time
    )
    assert json.loads(out.read_text()) == decision
    return decision


def _pyfunc_artifacts(store, decision: dict) -> tuple[Path, dict]:
    """The registered version's files (downloaded) and its pyfunc's artifacts table."""
    with use_tracking_uri(store["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=decision["model_uri"]))
    return local, Model.load(local / "MLmodel").flavors["python_function"]["artifacts"]


def _aliases(store, name: str) -> dict[str, int]:
    model = store["client"].get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


def test_champion_moves_only_to_a_better_model(store):
    tracking_env = os.environ.get("MLFLOW_TRACKING_URI")
    first = _register(store, NAME, 0.50)
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_env  # no global state left behind
    assert first["version"] == 1 and first["champion"] and first["previous_champion"] is None
    assert _aliases(store, NAME) == {"champion": 1, "challenger": 1}

    worse = _register(store, NAME, 0.40)
    assert worse["version"] == 2 and not worse["champion"]
    assert "does not beat" in worse["reason"]
    assert worse["previous_champion"]["version"] == 1
    assert worse["previous_champion"]["segm_ap"] == pytest.approx(0.50)
    assert _aliases(store, NAME) == {"champion": 1, "challenger": 2}

    better = _register(store, NAME, 0.60)
    assert better["champion"] and better["version"] == 3
    assert _aliases(store, NAME) == {"champion": 3, "challenger": 3}
    tags = store["client"].get_model_version(NAME, "3").tags
    assert float(tags["segm_AP"]) == pytest.approx(0.60) and "beats" in tags["decision"]


def test_a_model_below_the_floor_never_becomes_champion(store):
    name = f"{NAME}-floor"
    low = _register(store, name, 0.20, floor=0.25)
    assert not low["champion"] and "below the floor" in low["reason"]
    assert _aliases(store, name) == {"challenger": 1}
    _, artifacts = _pyfunc_artifacts(store, low)
    assert "onnx" not in artifacts and "model" in artifacts  # register(onnx=False)


def test_decide_rules():
    champion = {"version": 4, "segm_ap": 0.5}
    assert decide(segm_ap=0.5, min_segm_ap=0.1, champion=champion)[0] is False  # a tie keeps it
    assert decide(segm_ap=0.51, min_segm_ap=0.1, champion=champion)[0] is True
    assert decide(segm_ap=0.9, min_segm_ap=0.95, champion=None)[0] is False
    assert decide(segm_ap=0.95, min_segm_ap=0.95, champion=None)[0] is True


def test_champion_loads_in_a_fresh_process_and_predicts(store, tmp_path):
    """models:/name@champion loads from the store alone (code paths included) and predicts."""
    if "champion" not in _aliases(store, NAME):
        _register(store, NAME, 0.50)
    image = tmp_path / "image.png"
    image.write_bytes(example_image())
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({store["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        frame = pd.DataFrame({{"image": [open({str(image)!r}, "rb").read()]}})
        out = model.predict(frame, params={{"score_threshold": 0.0}})
        first = out.iloc[0]
        print(json.dumps({{"columns": list(out.columns), "rows": len(out),
                           "n": len(first["scores"]), "names": sorted(set(first["category_names"])),
                           "size": first["masks"][0]["size"] if len(first["masks"]) else None,
                           "pipeline": sys.modules["pipeline"].__file__}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["columns"] == [
        "boxes",
        "labels",
        "category_ids",
        "category_names",
        "scores",
        "masks",
    ]
    assert result["rows"] == 1 and result["n"] > 0  # random init, score threshold 0
    assert set(result["names"]) <= {"circle", "square"}
    assert result["size"] == [48, 64]  # masks at the input image's own size
    assert "/code/pipeline/" in result["pipeline"]  # imported from the model's code paths


def test_predict_command_reads_a_registered_model(store, tmp_path):
    if "champion" not in _aliases(store, NAME):
        _register(store, NAME, 0.50)
    image = tmp_path / "image.png"
    image.write_bytes(example_image())
    detector = load_detector(f"models:/{NAME}@champion", tracking_uri=store["uri"])
    out = predict_files(detector=detector, images=[image], out_dir=tmp_path, score_threshold=0.0)
    (record,) = json.loads(out.read_text())
    assert record["scores"] and set(record["category_names"]) <= {"circle", "square"}
    assert all(m["size"] == [48, 64] for m in record["masks"])
    with pytest.raises(ValueError, match="no-such-model"):
        load_detector("models:/no-such-model@champion", tracking_uri=store["uri"])


def test_register_takes_the_categories_from_the_model_file(store):
    """Without ``categories``, the pyfunc's categories artifact is what the model file stores."""
    named = store["root"] / "named.pt"
    stored = [{"id": 11, "name": "disc", "label": 1}, {"id": 12, "name": "tile", "label": 2}]
    save_model(MaskRCNN(tiny_config()), named, categories=stored)
    run = store["client"].create_run(store["experiment_id"])
    decision = register(
        model_path=named,
        eval_metrics={"segm_AP": 0.5, "bbox_AP": 0.5},
        run_info={"run_id": run.info.run_id, "tracking_uri": store["uri"]},
        model_name=f"{NAME}-named",
        min_segm_ap=0.0,
        out_path=store["root"] / "named-decision.json",
    )
    local, artifacts = _pyfunc_artifacts(store, decision)
    assert json.loads((local / artifacts["categories"]["path"]).read_text()) == stored
    assert artifacts["onnx"]["path"] == "artifacts/model.onnx"
    assert (local / "artifacts" / "model.onnx").stat().st_size > 0
