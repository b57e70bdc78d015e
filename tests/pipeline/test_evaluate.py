"""evaluate() end to end: real shards, a real (random, tiny) Mask R-CNN, Ray Data, MLflow."""

from __future__ import annotations

import csv
import json

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.evaluation.evaluate import _pool_size, evaluate
from pipeline.shards.preprocess import preprocess_split


def tiny_config(canvas: int = 64) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "num_classes": 6,
            "backbone": "resnet18",
            "canvas": canvas,
            "fpn_channels": 16,
            "roi": {"representation_size": 32, "mask_layers": [16], "score_thresh": 0.0},
            "rpn": {"pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
        }
    )


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def val(shapes_dataset, tmp_path_factory):
    """The synthetic val split (4 images of 64-128 px) as shards for canvas 64, and a model."""
    root, summary = shapes_dataset
    split = summary["val"]
    work = tmp_path_factory.mktemp("evaluate")
    annotation_file, images_dir = root / split["annotation_file"], root / split["images_dir"]
    preprocess_split(
        annotation_file=annotation_file,
        images_dir=images_dir,
        out_dir=work / "shards" / "val",
        model_config=tiny_config(),
        progress=False,
    )
    torch.manual_seed(0)
    save_model(MaskRCNN(tiny_config()), work / "model.pt")
    coco = json.loads(annotation_file.read_text())
    return {
        "work": work,
        "annotation_file": annotation_file,
        "images_dir": images_dir,
        "shards": work / "shards" / "val",
        "model": work / "model.pt",
        "coco": coco,
    }


def test_evaluate_writes_scores_plots_predictions_overlays_and_logs_them(val):
    uri = f"sqlite:///{val['work'] / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("eval", artifact_location=(val["work"] / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    out = val["work"] / "eval"

    metrics = evaluate(
        model_path=val["model"],
        shards_dir=val["shards"],
        annotation_file=val["annotation_file"],
        images_dir=val["images_dir"],
        out_dir=out,
        batch_size=3,
        num_overlays=2,
        overlay_score_threshold=0.0,
        concurrency=1,
        tracking_run={"run_id": run_id, "experiment_id": experiment, "tracking_uri": uri},
    )

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["num_images"] == 4
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_APl", "segm_AR100"):
        assert key in metrics
    assert 0.0 <= metrics["segm_AP"] <= 1.0 and 0.0 <= metrics["bbox_AR100"] <= 1.0
    names = {c["name"] for c in val["coco"]["categories"]}
    assert set(metrics["per_class"]["segm"]) == names

    # Predictions: COCO results format in original image coordinates, original category ids.
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == metrics["num_detections"] > 0
    sizes = {i["id"]: [i["height"], i["width"]] for i in val["coco"]["images"]}
    category_ids = {c["id"] for c in val["coco"]["categories"]}
    for p in predictions:
        assert p["segmentation"]["size"] == sizes[p["image_id"]]
        assert isinstance(p["segmentation"]["counts"], str)
        assert p["category_id"] in category_ids
        x, y, w, h = p["bbox"]
        height, width = sizes[p["image_id"]]
        assert min(x, y) >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        assert mask_utils.area(p["segmentation"]) <= height * width

    with (out / "pr_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 101 and {"recall", "bbox_iou50", "segm_iou50_95"} <= set(rows[0])

    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 2
    first_id = min(sizes)
    with Image.open(overlays[0]) as picture:
        assert [picture.height, picture.width] == sizes[first_id]

    run = client.get_run(run_id)
    assert run.data.metrics["eval/segm_AP"] == pytest.approx(metrics["segm_AP"])
    assert run.data.metrics["eval/num_images"] == 4
    assert any(key.startswith("eval/segm_AP/") for key in run.data.metrics)
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {
        "eval/metrics.json",
        "eval/pr_curve.csv",
        "eval/predictions.json",
        "eval/overlays",
    } <= logged


def test_a_model_for_another_canvas_is_refused(val):
    other = val["work"] / "canvas128.pt"
    save_model(MaskRCNN(tiny_config(canvas=128)), other)
    with pytest.raises(ValueError, match="canvas"):
        evaluate(
            model_path=other,
            shards_dir=val["shards"],
            annotation_file=val["annotation_file"],
            images_dir=val["images_dir"],
            out_dir=val["work"] / "never",
        )


def test_the_actor_pool_leaves_a_cpu_for_reading():
    # Two actors holding both CPUs of this Ray would wait forever for the read tasks.
    assert ray.cluster_resources()["CPU"] == 2
    assert _pool_size(2, gpu=False) == 1
    assert _pool_size(1, gpu=False) == 1
