"""The run plan: the Ray run name is the same for a resumable change, new for another recipe,
and the plan resolves every path once, from the project root."""

from pathlib import Path

from maskrcnn.config import ModelConfig
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.training.run_dir import plan_run

MODEL = ModelConfig(num_classes=3, backbone="resnet18", canvas=128)
MANIFEST = {"categories": [], "counts": {}}  # what the plan is given; it reads nothing else
ROOT = Path("/srv/project")


def plan(settings: TrainSettings, model: ModelConfig = MODEL, **overrides):
    arguments = {
        "settings": settings,
        "model_config": model,
        "shards_dir": "data/shards",
        "tracking": TrackingSettings(),
        "project_root": ROOT,
        "train_manifest": MANIFEST,
        **overrides,
    }
    return plan_run(**arguments)


def test_same_recipe_same_directory_whatever_the_resources_and_length():
    base = TrainSettings(run_name="demo", steps=100)
    longer = TrainSettings(
        run_name="demo",
        steps=300,
        num_workers=4,
        log_every=1,
        checkpoint_every=7,
        storage_path="s3://bucket/runs",
    )
    assert plan(base).name == plan(longer).name
    assert plan(base).name.startswith("demo-")
    assert plan(longer).directory == f"s3://bucket/runs/{plan(base).name}"


def test_another_recipe_is_another_run():
    base = TrainSettings(run_name="demo")
    names = {
        plan(base).name,
        plan(TrainSettings(run_name="demo", base_lr=0.01)).name,
        plan(TrainSettings(run_name="demo", seed=1)).name,
        plan(base, ModelConfig(num_classes=3, backbone="resnet18", canvas=192)).name,
        plan(TrainSettings(run_name="other")).name,
    }
    assert len(names) == 5


def test_other_train_data_is_another_run():
    """New annotations (the synthesize stage with other params) or other training scales
    (preprocess) must train again, not rewrite the finished run of the old data."""
    data = {"annotation_sha256": "a" * 64, "image_format": "jpeg", "train_scales": [1.0]}
    settings = TrainSettings(run_name="demo")

    def name(**changes):
        return plan(settings, train_manifest={**MANIFEST, **data, **changes}).name

    names = {
        name(),
        name(annotation_sha256="b" * 64),
        name(train_scales=[1.0, 0.5]),
        name(image_format="png"),
    }
    assert len(names) == 4
    assert name(counts={"images": 9}) == name()  # counts follow from the data named above


def test_the_plan_resolves_paths_from_the_project_root():
    resolved = plan(TrainSettings(run_name="demo", storage_path="ray_results"))
    assert resolved.settings.storage_path == str(ROOT / "ray_results")
    assert resolved.directory == str(ROOT / "ray_results" / resolved.name)
    assert resolved.train_dir == str(Path("data/shards").resolve() / "train")
    assert resolved.shards_dir == "data/shards"
    assert resolved.tracking_uri == f"sqlite:///{ROOT / 'mlflow.db'}"
    assert resolved.experiment == "maskrcnn"
    assert resolved.train_manifest is MANIFEST
    assert resolved.recipe["train"]["run_name"] == "demo"
    assert "steps" not in resolved.recipe["train"]  # a resumable change is not in the recipe


def test_the_manifest_is_read_when_not_given(tmp_path):
    split = tmp_path / "shards" / "train"
    split.mkdir(parents=True)
    (split / "manifest.json").write_text('{"categories": [{"id": 7}], "counts": {}}')
    resolved = plan(TrainSettings(), shards_dir=tmp_path / "shards", train_manifest=None)
    assert resolved.train_manifest["categories"] == [{"id": 7}]
