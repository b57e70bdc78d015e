"""The Ray run directory name: the same for a resumable change, new for another recipe."""

from maskrcnn.config import ModelConfig
from pipeline.config.settings import TrainSettings
from pipeline.training.run_dir import ray_run_name

MODEL = ModelConfig(num_classes=3, backbone="resnet18", canvas=128)


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
    assert ray_run_name(base, MODEL) == ray_run_name(longer, MODEL)
    assert ray_run_name(base, MODEL).startswith("demo-")


def test_another_recipe_is_another_run():
    base = TrainSettings(run_name="demo")
    names = {
        ray_run_name(base, MODEL),
        ray_run_name(TrainSettings(run_name="demo", base_lr=0.01), MODEL),
        ray_run_name(TrainSettings(run_name="demo", seed=1), MODEL),
        ray_run_name(base, ModelConfig(num_classes=3, backbone="resnet18", canvas=192)),
        ray_run_name(TrainSettings(run_name="other"), MODEL),
    }
    assert len(names) == 5
