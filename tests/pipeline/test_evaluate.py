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
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.inference import PoolPlan, pool_plan, runs_here
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
        concurrency=2,  # two actors share the two CPUs, one left for reading: no deadlock
        tracking_run={"run_id": run_id, "experiment_id": experiment, "tracking_uri": uri},
        tracking_step=7,
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
    # At the scored model's training step, beside the evaluations during training.
    assert [m.step for m in client.get_metric_history(run_id, "eval/segm_AP")] == [7]
    assert run.data.metrics["eval/num_images"] == 4
    assert any(key.startswith("eval/segm_AP/") for key in run.data.metrics)
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {
        "eval/metrics.json",
        "eval/pr_curve.csv",
        "eval/predictions.json",
        "eval/overlays",
    } <= logged


def test_in_process_inference_gives_the_actor_pools_results(val):
    """``concurrency: local`` (what "auto" picks on one machine) is the same inference as the
    actor pool: the same detections, in the same order, so the same scores; in forked
    processes (one thread each) the same up to float rounding."""
    common = {
        "model_path": val["model"],
        "shards_dir": val["shards"],
        "annotation_file": val["annotation_file"],
        "images_dir": val["images_dir"],
        "batch_size": 3,
        "num_overlays": 0,
    }
    runs = {"actors": {"concurrency": 1}, "forked": {"concurrency": "local", "processes": 2}}
    runs["here"] = {"concurrency": "local", "processes": 1}
    outs = {name: val["work"] / f"eval-{name}" for name in runs}
    metrics = {name: evaluate(out_dir=outs[name], **runs[name], **common) for name in runs}
    predictions = {n: json.loads((out / "predictions.json").read_text()) for n, out in outs.items()}
    assert len(predictions["here"]) > 0
    assert predictions["here"] == predictions["actors"]
    _assert_same_but_rounding(predictions["forked"], predictions["here"])
    speeds = {name: m.pop("images_per_second") for name, m in metrics.items()}
    assert metrics["here"] == metrics["actors"] and min(speeds.values()) > 0
    for key in ("bbox_AP", "segm_AP"):
        assert metrics["forked"][key] == pytest.approx(metrics["here"][key], abs=1e-3)


def _assert_same_but_rounding(got: list[dict], want: list[dict]) -> None:
    """The same detections computed with another number of threads (one per forked worker):
    float sums in another order, so scores and boxes agree to rounding, masks nearly exactly."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)
        assert mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0] > 0.98


def test_auto_runs_in_process_only_without_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_here("auto", None) and runs_here("local", "auto")
    assert not runs_here("auto", "auto") and not runs_here(2, None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not runs_here("auto", None)


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


def test_cpu_actors_leave_a_cpu_for_reading():
    # Actors holding every CPU would wait forever for the read tasks.
    assert pool_plan(1, {"CPU": 2}) == PoolPlan(size=1, num_cpus=1.0, num_gpus=0, threads=2)
    assert pool_plan(2, {"CPU": 2}) == PoolPlan(size=2, num_cpus=0.5, num_gpus=0, threads=1)
    assert pool_plan(3, {"CPU": 2}).size == 2  # at most one per CPU
    for concurrency in (1, 3, 8):
        plan = pool_plan(concurrency, {"CPU": 8})
        assert plan.size * plan.num_cpus <= 7 and plan.threads == 8 // plan.size


def test_auto_is_one_actor_per_gpu_or_per_two_cpus():
    on_gpus = pool_plan("auto", {"CPU": 32, "GPU": 8})
    assert on_gpus == PoolPlan(size=8, num_cpus=1, num_gpus=1, threads=4)
    assert pool_plan(16, {"CPU": 32, "GPU": 8}).size == 8
    assert pool_plan("auto", {"CPU": 2}) == PoolPlan(size=1, num_cpus=1, num_gpus=0, threads=2)
    assert pool_plan("auto", {"CPU": 16}).size == 8
    assert pool_plan("auto", {"CPU": 1}).size == 1


@pytest.mark.parametrize("concurrency", [0, -1, "many", True, 1.5])
def test_bad_concurrency_is_refused(concurrency):
    with pytest.raises(
        ValueError, match='concurrency must be a positive integer, "auto" or "local"'
    ):
        pool_plan(concurrency, {"CPU": 4})
