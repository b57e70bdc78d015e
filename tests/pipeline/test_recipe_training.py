"""The training recipe's schedule in epochs, evaluation during training with the best
checkpoint and early stopping, and the EMA of the weights.

The unit tests need nothing; the runs share one local Ray runtime and a tiny model (ResNet-18,
canvas 64) on four train and two val images of the synthetic dataset, with real MLflow (SQLite).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from maskrcnn.checkpoints import load_model
from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.ema import EMA_FILE, WeightsEMA, ema_decay_at
from pipeline.training.periodic_eval import out_of_patience, record_score
from pipeline.training.schedule import in_steps, lr_factor, steps_per_epoch
from pipeline.training.state import MODEL_FILE, Progress
from pipeline.training.trainer import train

# --- units ---------------------------------------------------------------------------------


def test_steps_per_epoch_rounds_up():
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(8, 4) == 2
    with pytest.raises(ValueError, match="0 images"):
        steps_per_epoch(0, 4)


def test_epochs_milestones_and_warmup_become_steps_once():
    settings = TrainSettings(epochs=5, milestones_epochs=(2, 4), warmup_epochs=0.5,
                             batch_per_worker=2, num_workers=2)  # fmt: skip
    steps = in_steps(settings, {"counts": {"images": 10}})  # 3 steps an epoch at batch 4
    assert (steps.steps, steps.milestones, steps.warmup_steps) == (15, (6, 12), 2)
    assert steps.epochs is None and steps.milestones_epochs == () and steps.warmup_epochs is None
    assert in_steps(steps, {"counts": {"images": 10}}) == steps  # already in steps: unchanged
    plain = TrainSettings(steps=7, milestones=(3,))
    assert in_steps(plain, {"counts": {"images": 10}}) is plain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 10, "epochs": 2}, "exactly one of train.steps and train.epochs"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"epochs": 4, "milestones_epochs": (4,)}, r"milestones_epochs must be .*epochs=4"),
        ({"epochs": 4, "milestones_epochs": (2,), "milestones": (5,)}, "not both"),
        ({"select": "best"}, "select: best need evaluations during training"),
        ({"patience": 2}, "patience need evaluations"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ],
)
def test_recipe_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kwargs)


def test_neither_steps_nor_epochs_is_the_default_length():
    assert TrainSettings().steps == 1000 and TrainSettings(epochs=3).steps is None


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.register_buffer("count", torch.tensor(3))


def test_ema_decay_warms_up_then_stays_at_the_setting():
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(100, 0.999) == pytest.approx(101 / 110)
    assert ema_decay_at(10_000, 0.999) == 0.999


def test_ema_update_is_the_weighted_average_and_copies_integer_buffers():
    model = Tiny()
    ema = WeightsEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([3.0, 0.0]))
        model.count.fill_(7)
    ema.update(model, step=1)  # decay 2/11
    d = 2 / 11
    expected = d * torch.tensor([1.0, -2.0]) + (1 - d) * torch.tensor([3.0, 0.0])
    assert torch.allclose(ema.shadow["weight"], expected)
    assert int(ema.shadow["count"]) == 7
    ema.update(model, step=1000)  # decay 0.9
    assert torch.allclose(ema.shadow["weight"], 0.9 * expected + 0.1 * torch.tensor([3.0, 0.0]))
    restored = WeightsEMA(Tiny(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_patience_counts_evaluations_without_improvement():
    progress = Progress()
    for step, score in [(2, 0.1), (4, 0.3), (6, 0.3), (8, 0.2)]:
        progress.step = step
        record_score(progress, score)
    assert (progress.best_score, progress.best_step, progress.evals_since_best) == (0.3, 4, 2)
    assert out_of_patience(progress, 2) and not out_of_patience(progress, 3)
    assert not out_of_patience(progress, 0)


# --- runs on Ray -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Train and val shards of the synthetic dataset, a tiny model config, a Ray runtime."""
    root = tmp_path_factory.mktemp("recipe")
    data = root / "shapes"
    write_shapes_dataset(data, n_train=4, n_val=2, seed=0, min_side=48, max_side=64)
    config = ModelConfig(
        num_classes=2,
        backbone="resnet18",
        canvas=64,
        fpn_channels=32,
        rpn=RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100),
        roi=RoIConfig(representation_size=64, mask_layers=(32,), batch_size_per_image=64),
    )
    shards = root / "shards"
    for split in ("train", "val"):
        preprocess_split(
            annotation_file=data / "annotations" / f"instances_{split}.json",
            images_dir=data / "images" / split,
            out_dir=shards / split,
            model_config=config,
            progress=False,
        )
    classes = len(read_manifest(shards / "train")["categories"]) + 1
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield root, shards, replace(config, num_classes=classes)
    if started:
        ray.shutdown()


def run(project, out: Path, **overrides):
    root, shards, config = project
    base = dict(num_workers=1, batch_per_worker=2, base_lr=0.02, lr_reference_batch=2,
                warmup_steps=0, flip_prob=0.0, checkpoint_every=100, keep_checkpoints=1,
                max_failures=0, log_every=1)  # fmt: skip
    return train(
        settings=TrainSettings(**{**base, **overrides}),
        model_config=config,
        shards_dir=shards,
        tracking=TrackingSettings(experiment="recipe"),
        out_dir=out,
        project_root=root,
        val_annotations=root / "shapes" / "annotations" / "instances_val.json",
    )


def history(result, name: str) -> list[tuple[int, float]]:
    client = MlflowClient(result.run.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(result.run.run_id, name))


@pytest.fixture(scope="module")
def best(project, tmp_path_factory):
    """Three epochs of two steps, the lr dropped after epoch 2, an evaluation every 2 steps,
    the best checkpoint written."""
    out = tmp_path_factory.mktemp("best") / "out"
    return run(project, out, epochs=3, milestones_epochs=[2], eval_every=2, select="best",
               run_name="best")  # fmt: skip


def test_epochs_set_the_step_count_and_the_milestones(best):
    assert best.metrics["step"] == 6  # 4 images / global batch 2 = 2 steps an epoch
    lrs = {row["step"]: row["lr"] for row in best.history}  # the lr of the next step
    peak = 0.02
    assert lrs[3] == pytest.approx(peak) and lrs[4] == pytest.approx(peak * 0.1)
    assert lr_factor(4, schedule="multistep", steps=6, warmup_steps=0, warmup_factor=1.0,
                     milestones=(4,)) == pytest.approx(0.1)  # fmt: skip


def test_eval_histories_are_logged_at_their_steps(best):
    for name in ("eval/segm_AP", "eval/bbox_AP"):
        assert [step for step, _ in history(best, name)] == [2, 4, 6], name


def test_select_best_writes_the_best_checkpoints_weights(best):
    scores = history(best, "eval/segm_AP")
    top = max(score for _, score in scores)
    best_step = max(step for step, score in scores if score == top)  # ties: the later (Ray's)
    metrics = json.loads((best.model_path.parent / "metrics.json").read_text())
    assert (metrics["selected"], metrics["selected_step"]) == ("best", best_step)
    assert metrics["best_segm_AP"] == pytest.approx(top)
    kept = Path(best.run_dir) / f"checkpoint_{best_step:08d}" / MODEL_FILE
    weights = torch.load(kept, map_location="cpu", weights_only=True)
    written = load_model(best.model_path).state_dict()
    assert all(torch.equal(written[k], weights[k]) for k in weights)


def test_patience_stops_early(project, tmp_path):
    result = run(project, tmp_path / "out", steps=30, eval_every=1, patience=1,
                 run_name="patience")  # fmt: skip
    scores = history(result, "eval/segm_AP")
    step = result.metrics["step"]
    assert result.metrics["stopped_early"] and step < 30
    # the last evaluation was the first one without improvement on the best
    best_so_far = max(score for s, score in scores if s < step)
    assert scores[-1][0] == step and scores[-1][1] <= best_so_far


def test_ema_is_checkpointed_survives_a_resume_and_is_the_written_model(project, tmp_path):
    kwargs = dict(ema_decay=0.9, checkpoint_every=1, keep_checkpoints=4, run_name="ema")
    first = run(project, tmp_path / "first", steps=2, **kwargs)
    assert first.metrics["selected_ema"]
    second = run(project, tmp_path / "second", steps=4, **kwargs)  # same run: resumes at 2
    assert second.resumed_from == 2

    def part(step: int, name: str) -> dict[str, torch.Tensor]:
        path = Path(second.run_dir) / f"checkpoint_{step:08d}" / name
        return torch.load(path, map_location="cpu", weights_only=True)

    ema2, weights3, ema3 = part(2, EMA_FILE), part(3, MODEL_FILE), part(3, EMA_FILE)
    d = ema_decay_at(3, 0.9)
    for name, value in ema3.items():
        if value.dtype.is_floating_point:  # the resumed average went on from step 2's
            expected = d * ema2[name] + (1 - d) * weights3[name]
            assert torch.allclose(value, expected, atol=1e-6), name
    written = load_model(second.model_path).state_dict()
    ema4 = part(4, EMA_FILE)
    assert all(torch.equal(written[k], ema4[k]) for k in ema4)
    raw = part(4, MODEL_FILE)
    assert any(not torch.equal(raw[k], ema4[k]) for k in raw if raw[k].is_floating_point())
