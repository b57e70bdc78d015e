"""Fine-tuning from the registry (``init: registry``): real MLflow (SQLite), real Ray.

A tiny parent model is registered in a temporary store, with the val shards of dataset A as
its run's dataset input. Dataset A has the parent's classes; dataset B drops one of them. The
weights are checked right after loading (no step taken), then a short Ray run fine-tunes from
the registry and its model goes through the register gate against the parent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from maskrcnn.checkpoints import CLASS_SPECIFIC, load_maskrcnn_state, load_model, save_model
from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.registry.lineage import log_shard_inputs, shard_inputs
from pipeline.registry.register import decide, register
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.loop import WorkerTrainer
from pipeline.training.run_dir import plan_run
from pipeline.training.state import seed_everything
from pipeline.training.trainer import _parent_config, _start_run, train

NAME = "shapes-maskrcnn"
STEM = "backbone.body.conv1.weight"  # frozen (trainable_backbone_layers=3): equal after training


def config(num_classes: int) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes,
        backbone="resnet18",
        canvas=64,
        fpn_channels=16,
        trainable_backbone_layers=3,
        rpn=RPNConfig(pre_nms_top_n_train=100, post_nms_top_n_train=50),
        roi=RoIConfig(representation_size=32, mask_layers=(16,), batch_size_per_image=32),
    )


def settings(**overrides) -> TrainSettings:
    base = dict(
        steps=2,
        batch_per_worker=2,
        lr_reference_batch=2,
        warmup_steps=0,
        flip_prob=0.0,
        checkpoint_every=2,
        log_every=1,
        max_failures=0,
        init="registry",
        weights_path=f"models:/{NAME}@base",
    )
    return TrainSettings(**{**base, **overrides})


def _drop_category(annotation_file: Path, out: Path) -> None:
    """The same images without the last category: another class count."""
    data = json.loads(annotation_file.read_text())
    dropped = data["categories"].pop()["id"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
    out.write_text(json.dumps(data))


def _shards(root: Path, data: Path, name: str, annotations: dict[str, Path]) -> Path:
    shards = root / name
    for split in ("train", "val"):
        preprocess_split(
            annotation_file=annotations[split],
            images_dir=data / "images" / split,
            out_dir=shards / split,
            model_config=config(2),
            progress=False,
        )
    return shards


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory):
    """Shards A (the parent's classes) and B (one class fewer); a store where version 2 of
    NAME (alias ``base``, segm AP 0.3) is the parent and version 1 (0.5) the champion."""
    root = tmp_path_factory.mktemp("finetune")
    data = root / "shapes"
    write_shapes_dataset(data, n_train=4, n_val=1, seed=0, min_side=48, max_side=64)
    ann = {s: data / "annotations" / f"instances_{s}.json" for s in ("train", "val")}
    fewer = {s: root / f"fewer_{s}.json" for s in ("train", "val")}
    for split in ("train", "val"):
        _drop_category(ann[split], fewer[split])
    shards_a = _shards(root, data, "shards_a", ann)
    shards_b = _shards(root, data, "shards_b", fewer)
    categories = read_manifest(shards_a / "train")["categories"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tests", artifact_location=(root / "art").as_uri())
    torch.manual_seed(1)
    parent_path = root / "parent.pt"
    save_model(MaskRCNN(config(len(categories) + 1)), parent_path, categories=categories)
    for segm_ap in (0.5, 0.3):
        run = client.create_run(experiment)
        log_shard_inputs(client, run.info.run_id, shard_inputs(shards_a))
        _register(root, uri, parent_path, run.info.run_id, segm_ap)
    client.set_registered_model_alias(NAME, "base", "2")
    return {
        "root": root,
        "uri": uri,
        "client": client,
        "a": shards_a,
        "b": shards_b,
        "parent": load_model(parent_path).state_dict(),
    }


def _register(root: Path, uri: str, model_path: Path, run_id: str, segm_ap: float) -> dict:
    return register(
        model_path=model_path,
        eval_metrics={"segm_AP": segm_ap, "bbox_AP": segm_ap},
        run_info={"run_id": run_id, "tracking_uri": uri},
        model_name=NAME,
        min_segm_ap=0.1,
        out_path=root / f"decision-{run_id}.json",
        onnx=False,
    )


def _classes(shards: Path) -> int:
    return len(read_manifest(shards / "train")["categories"]) + 1


def _loaded(project, shards: Path) -> tuple[WorkerTrainer, object]:
    """Rank 0's model right after loading the parent, before any step."""
    plan = plan_run(
        settings=settings(),
        model_config=config(_classes(shards)),
        shards_dir=shards,
        tracking=TrackingSettings(uri=project["uri"], experiment="tests"),
        project_root=project["root"],
    )
    worker = WorkerTrainer(
        settings=plan.settings,
        model_config=plan.model_config,
        rank=0,
        world=1,
        device=torch.device("cpu"),
    )
    worker._load_initial_weights(_parent_config(plan))
    return worker, plan


def test_same_classes_load_every_tensor(project):
    worker, plan = _loaded(project, project["a"])
    assert plan.parent.version == 2 and plan.parent.uri == f"models:/{NAME}/2"
    state = worker.module.state_dict()
    assert torch.equal(state[STEM], project["parent"][STEM])
    for key, value in project["parent"].items():
        assert torch.equal(state[key], value), key


def test_other_classes_start_the_predictors_fresh(project, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.training.trainer"):
        worker, _ = _loaded(project, project["b"])
    seed_everything(worker.settings.seed)
    fresh = MaskRCNN(worker.model_config).state_dict()
    state = worker.module.state_dict()
    for key, value in project["parent"].items():
        expected = fresh[key] if key.startswith(CLASS_SPECIFIC) else value
        assert torch.equal(state[key], expected), key
    old, new = _classes(project["a"]), _classes(project["b"])
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == new == old - 1
    line = next(r.getMessage() for r in caplog.records if "fine-tuning from" in r.getMessage())
    assert f"{old} classes in the parent, {new} here" in line
    assert "roi_heads.mask_predictor.mask_fcn_logits start fresh" in line


def test_a_misshapen_tensor_elsewhere_is_named(project):
    state = dict(project["parent"])
    state["backbone.fpn.inner_blocks.0.0.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch.*backbone\.fpn\.inner_blocks\.0\.0"):
        load_maskrcnn_state(MaskRCNN(config(_classes(project["a"]))), state, source="models:/x/1")


def test_same_classes_in_another_order_start_fresh(project):
    classes = _classes(project["a"])
    model = MaskRCNN(config(classes))
    result = load_maskrcnn_state(model, project["parent"], source="p", same_classes=False)
    assert set(result.skipped) == {k for k in project["parent"] if k.startswith(CLASS_SPECIFIC)}
    assert f"the categories differ (file {classes}, model {classes})" in result.note


def _finetune(project, tmp_path, shards: Path, run_name: str):
    return train(
        settings=settings(run_name=run_name),
        model_config=config(_classes(shards)),
        shards_dir=shards,
        tracking=TrackingSettings(uri=project["uri"], experiment="tests"),
        out_dir=tmp_path / run_name,
        project_root=project["root"],
    )


def test_finetune_runs_record_the_parent_and_the_gate_compares_with_it(project, tmp_path):
    same = _finetune(project, tmp_path, project["a"], "same")
    assert torch.equal(load_model(same.model_path).state_dict()[STEM], project["parent"][STEM])
    tags = project["client"].get_run(same.run.run_id).data.tags
    assert tags["parent_model_name"] == NAME
    assert tags["parent_model_version"] == "2"
    assert tags["parent_model_uri"] == f"models:/{NAME}/2"
    assert (
        json.loads((Path(same.run_dir) / "maskrcnn_run.json").read_text())["recipe"]["train"][
            "weights_path"
        ]
        == "models:/shapes-maskrcnn/2"
    )

    root, uri = project["root"], project["uri"]
    decision = _register(root, uri, same.model_path, same.run.run_id, 0.4)
    assert decision["parent"]["version"] == 2 and decision["parent"]["same_val_set"]
    assert decision["parent_segm_ap"] == 0.3 and decision["segm_ap"] == 0.4
    assert not decision["champion"]  # beats its parent (0.3), not the champion (0.5)
    assert "beats its parent version 2 (0.3000)" in decision["reason"]
    assert json.loads((root / f"decision-{same.run.run_id}.json").read_text()) == decision

    # Data with other classes (and another val set): the run as train opens it, no steps.
    _, plan = _loaded(project, project["b"])
    other = _start_run(plan)
    decision = _register(root, uri, same.model_path, other.run_id, 0.6)
    assert decision["champion"] and not decision["parent"]["same_val_set"]
    assert "parent version 2 not compared" in decision["reason"]


def test_another_parent_version_is_another_run_directory(project):
    plans = [
        plan_run(
            settings=settings(weights_path=path),
            model_config=config(_classes(project["a"])),
            shards_dir=project["a"],
            tracking=TrackingSettings(uri=project["uri"], experiment="tests"),
            project_root=project["root"],
        )
        for path in (f"models:/{NAME}@base", f"models:/{NAME}/2", f"models:/{NAME}/1")
    ]
    assert plans[0].directory == plans[1].directory != plans[2].directory


def test_decide_against_the_parent():
    parent = {"version": 2, "segm_ap": 0.5, "same_val_set": True, "why": "same val shards"}
    promote, reason = decide(segm_ap=0.45, min_segm_ap=0.1, champion=None, parent=parent)
    assert not promote and "does not beat its parent version 2 (0.5000)" in reason
    other = replace_dict(parent, same_val_set=False, why="its val shards x, ours y")
    promote, reason = decide(segm_ap=0.45, min_segm_ap=0.1, champion=None, parent=other)
    assert promote and "not compared (its val shards x, ours y)" in reason


def replace_dict(d: dict, **changes) -> dict:
    return {**d, **changes}


def test_registry_weights_path_is_checked():
    with pytest.raises(ValueError, match="models:/<name>@<alias>"):
        TrainSettings(init="registry", weights_path="models:/x")
    with pytest.raises(ValueError, match="set init: registry"):
        replace(TrainSettings(), init="coco", weights_path="models:/x/1")
