"""The full COCO recipe, configs/coco_r50_fpn_1x.yaml: it validates, it is the standard
R50-FPN 1x schedule, and its first step runs on CPU on a tiny COCO-format dataset.

The smoke run keeps the recipe's model section as it is (ResNet-50, canvas 1024, frozen BN,
torchvision's default heads) and overrides only what a CPU test box cannot do: the data paths,
GPU and AMP, workers and batch, the length of the run (hence no lr milestones), storage and
tracking, and the ImageNet weights file (written here from an untrained torchvision ResNet-50:
nothing is downloaded). It goes through the stages' own calls: preprocess_split, then the Ray
Train entry point, train. One optimizer step of R50-FPN on a 1024 x 1024 canvas costs 15-40 s
on two CPU cores, so the run is a single step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
import torchvision
import yaml
from mlflow.tracking import MlflowClient

from maskrcnn.checkpoints import load_model
from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import load_params, model_config
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.progress import LOSS_NAMES
from pipeline.training.schedule import in_steps, lr_factor, steps_per_epoch
from pipeline.training.state import MODEL_FILE, seed_everything
from pipeline.training.trainer import TrainResult, train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "coco_r50_fpn_1x.yaml"
STEPS = 1
COCO_TRAIN_IMAGES = 118_287  # instances_train2017.json's images
# Layers that the recipe freezes (trainable_backbone_layers: 3 leaves conv1 and layer1 frozen,
# and frozen BN never updates its statistics): after a step they still hold the file's values.
FROZEN = ("conv1.weight", "layer1.0.conv1.weight", "bn1.running_mean", "layer3.2.bn2.running_var")


def recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def test_recipe_is_a_complete_valid_params_file():
    params = load_params(RECIPE, complete=True)
    assert params.ray_address == "auto"  # joins the cluster it is submitted to


def test_recipe_is_the_r50_fpn_1x_schedule():
    params = load_params(RECIPE, complete=True)
    model = model_config(params, num_classes=91)
    assert (model.backbone, model.canvas, model.norm) == ("resnet50", 1024, "frozen_bn")
    assert (model.trainable_backbone_layers, model.fpn_channels) == (3, 256)
    assert model.rpn == RPNConfig() and model.roi == RoIConfig()  # torchvision's heads
    assert model == ModelConfig(num_classes=91, trainable_backbone_layers=3)

    train = TrainSettings.from_dict(params.section("train"))
    assert train.batch_per_worker * train.num_workers == 16 and train.global_batch == 16
    assert train.base_lr == 0.02 and train.lr == 0.02  # no rescaling at the reference batch
    assert (train.optimizer, train.momentum, train.weight_decay) == ("sgd", 0.9, 1e-4)
    assert train.epochs == 12 and train.milestones_epochs == (8, 11)  # the published 1x
    assert train.steps is None and train.milestones == ()
    assert (train.schedule, train.gamma) == ("multistep", 0.1)
    assert (train.warmup_steps, train.warmup_factor) == (1000, 0.001)
    assert train.use_gpu and train.amp in ("fp16", "bf16")
    assert train.init == "imagenet" and train.weights_path
    assert train.flip_prob == 0.5

    # In steps on COCO 2017 train (118,287 images): 7,393 steps an epoch at global batch 16.
    steps = in_steps(train, {"counts": {"images": COCO_TRAIN_IMAGES}})
    assert steps_per_epoch(COCO_TRAIN_IMAGES, 16) == 7393
    assert steps.steps == 12 * 7393 and steps.milestones == (8 * 7393, 11 * 7393)
    assert steps.epochs is None and steps.warmup_steps == 1000

    def lr(step: int) -> float:
        keys = ("schedule", "steps", "warmup_steps", "warmup_factor", "milestones", "gamma")
        return steps.lr * lr_factor(step, **{k: getattr(steps, k) for k in keys})

    for step, expected in [(0, 2e-5), (1000, 0.02), (59_143, 0.02), (59_144, 2e-3),
                           (81_323, 2e-4), (88_715, 2e-4)]:  # fmt: skip
        assert lr(step) == pytest.approx(expected), step


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("warmup_steps: 1000", "warmup_step: 1000"), r"unknown key train\.warmup_step\b"),
        (
            ("epochs: 12 ", "steps: 100\n  epochs: 12 "),
            r"exactly one of train\.steps and train\.epochs",
        ),
        (("base_lr: 0.02", "base_lr: '0.02'"), r"train\.base_lr must be a number"),
        (("weight_decay: 0.0001", "weight_decay: 1e-4"), r"train\.weight_decay must be a number"),
        (("canvas: 1024", "canvas: 1024px"), r"model\.canvas must be an integer"),
        (("amp: fp16", "amp: fp8"), r"invalid train section: .*amp"),
        (("rpn: {}", "rpn: {nms: 0.7}"), r"unknown key model\.rpn\.nms\b"),
        (("min_segm_ap: 0.30", "min_segm_ap: high"), r"register\.min_segm_ap must be a number"),
    ],
)
def test_a_broken_copy_fails_naming_the_file_and_the_key(tmp_path, edit, named):
    old, new = edit
    text = RECIPE.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "coco_broken.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=rf"coco_broken\.yaml: .*{named}"):
        load_params(path, complete=True)


def test_a_copy_without_a_section_is_not_a_complete_recipe(tmp_path):
    raw = recipe()
    del raw["evaluate"]
    path = tmp_path / "coco_partial.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"coco_partial\.yaml: missing sections \['evaluate'\]"):
        load_params(path, complete=True)


@dataclass(frozen=True)
class Smoke:
    result: TrainResult
    config: ModelConfig
    imagenet: dict[str, torch.Tensor]


def imagenet_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict in the ImageNet file's format, distinct from any model
    initialisation: other seed, and running statistics that an untrained network never has."""
    torch.manual_seed(1234)
    state = torchvision.models.resnet50(weights=None).state_dict()
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Smoke:
    """The recipe's first step on CPU, as the preprocess and train stages run it."""
    root = tmp_path_factory.mktemp("coco_recipe")
    data = root / "coco"
    write_shapes_dataset(
        data, n_train=2, n_val=1, seed=0, min_side=48, max_side=64, max_instances=3,
        empty_fraction=0.0,
    )  # fmt: skip
    imagenet = imagenet_file(root / "resnet50-imagenet.pth")

    raw = recipe()
    raw["data"] = {
        "shapes_dir": str(data),
        "train_images": str(data / "images" / "train"),
        "train_annotations": str(data / "annotations" / "instances_train.json"),
        "val_images": str(data / "images" / "val"),
        "val_annotations": str(data / "annotations" / "instances_val.json"),
        "shards_dir": str(root / "shards"),
        "artifacts_dir": str(root / "artifacts"),
    }
    raw["train"].update(
        use_gpu=False, amp="none", num_workers=1, cpus_per_worker=2, batch_per_worker=1,
        steps=STEPS, epochs=None, milestones_epochs=[],
        weights_path=str(root / "resnet50-imagenet.pth"), storage_path=str(root / "ray_results"),
    )  # fmt: skip
    raw["tracking"]["uri"] = f"sqlite:///{root}/mlflow.db"
    raw["ray"]["address"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml", complete=True)
    assert params.section("model") == recipe()["model"]

    started = not ray.is_initialized()
    if started:  # 3 logical CPUs: the worker's 2 torch threads and one for Ray Data
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        shards = params.data_path("shards_dir")
        preprocess_split(
            annotation_file=params.data_path("train_annotations"),
            images_dir=params.data_path("train_images"),
            out_dir=f"{shards}/train",
            model_config=model_config(params, num_classes=2),
            progress=False,
            **params.section("preprocess"),
        )
        categories = read_manifest(f"{shards}/train")["categories"]
        config = model_config(params, num_classes=len(categories) + 1)
        result = train(
            settings=TrainSettings.from_dict(params.section("train")),
            model_config=config,
            shards_dir=shards,
            tracking=TrackingSettings(**params.section("tracking")),
            out_dir=f"{params.data_path('artifacts_dir')}/train",
            ray_address=params.ray_address,
            project_root=params.root,
        )
    finally:
        if started:
            ray.shutdown()
    return Smoke(result=result, config=config, imagenet=imagenet)


def test_first_step_runs_with_finite_losses(smoke):
    assert smoke.result.metrics["step"] == STEPS
    assert [row["step"] for row in smoke.result.history] == [STEPS]
    for name in ("loss", *LOSS_NAMES):
        value = smoke.result.history[-1][name]
        assert math.isfinite(value), f"{name} = {value}"
    assert smoke.result.history[-1]["loss"] > 0


def test_imagenet_weights_were_loaded_into_the_backbone(smoke):
    trained = load_model(smoke.result.model_path).state_dict()
    seed_everything(0)  # the workers' initial weights, before the file is loaded
    fresh = MaskRCNN(smoke.config).state_dict()
    for name in FROZEN:
        key = f"backbone.body.{name}"
        assert torch.equal(trained[key], smoke.imagenet[name]), key
        assert not torch.equal(fresh[key], smoke.imagenet[name]), key
    # and the step trained the rest: a head tensor moved from its initial value
    head = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(trained[head], fresh[head])


def test_checkpoint_model_file_and_run_are_written(smoke):
    result = smoke.result
    assert (Path(result.run_dir) / f"checkpoint_{STEPS:08d}" / MODEL_FILE).is_file()
    model = load_model(result.model_path)
    assert model.config == smoke.config  # the recipe's model section, as it is
    out = result.model_path.parent
    assert json.loads((out / "metrics.json").read_text())["global_batch"] == 1
    run = MlflowClient(result.run.tracking_uri).get_run(result.run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "resnet50"
    assert run.data.params["model.canvas"] == "1024"
    assert run.data.params["train.init"] == "imagenet"
