"""Training on Ray Train, end to end: real Ray (a simulated cluster), real MLflow (SQLite).

One Ray cluster for the module: a 2-CPU head node, and a second node added only for the tests
that need two machines. The shards are built once with the data helpers; the model is tiny
(ResNet-18, canvas 64, narrow heads) so that the steps take seconds; each run's cost is mostly
Ray starting its controller and worker processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from maskrcnn.checkpoints import load_model
from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.io.ray_runtime import cluster_node_count
from pipeline.registry.tracking import RunRef, check_uri_for_cluster
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.loader import iter_batches
from pipeline.training.loop import WORKER_NODES_TAG, WorkerTrainer
from pipeline.training.progress import LOSS_NAMES
from pipeline.training.run_dir import plan_run
from pipeline.training.state import seed_everything, state_digest
from pipeline.training.trainer import make_trainer, train

OVERFIT_STEPS = 16
OVERFIT_FACTOR = 1.5  # mean loss of the last 4 steps <= mean of the first 2 / 1.5
CHECKPOINT_EVERY = 4


@pytest.fixture(scope="module")
def cluster():
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # inherited by the workers
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory):
    """A project directory with train shards of four synthetic images, and the model config."""
    root = tmp_path_factory.mktemp("project")
    data = root / "shapes"
    write_shapes_dataset(data, n_train=4, n_val=1, seed=0, min_side=48, max_side=64)
    config = ModelConfig(
        num_classes=2,  # replaced below by the shards' category count
        backbone="resnet18",
        canvas=64,
        fpn_channels=32,
        rpn=RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100),
        roi=RoIConfig(representation_size=64, mask_layers=(32,), batch_size_per_image=64),
    )
    shards = root / "shards"
    preprocess_split(
        annotation_file=data / "annotations" / "instances_train.json",
        images_dir=data / "images" / "train",
        out_dir=shards / "train",
        model_config=config,
        progress=False,
    )
    classes = len(read_manifest(shards / "train")["categories"]) + 1
    return root, shards, replace(config, num_classes=classes)


def settings(**overrides) -> TrainSettings:
    base = dict(
        num_workers=1,
        batch_per_worker=2,
        steps=4,
        base_lr=0.02,
        lr_reference_batch=2,
        warmup_steps=0,
        flip_prob=0.0,
        checkpoint_every=2,
        keep_checkpoints=2,
        max_failures=1,
        log_every=1,
        run_name="run",
    )
    return TrainSettings(**{**base, **overrides})


def run_train(project, tmp_path, **overrides):
    root, shards, config = project
    return train(
        settings=settings(**overrides),
        model_config=config,
        shards_dir=shards,
        tracking=TrackingSettings(experiment="tests"),
        out_dir=tmp_path / "out",
        project_root=root,
    )


@pytest.fixture(scope="module")
def overfit(project, tmp_path_factory):
    """One run that fits four images, shared by the overfit, outputs, MLflow and resume tests
    (the fault drills, killed workers among them, are in tests/e2e/test_fault_drills.py)."""
    out = tmp_path_factory.mktemp("overfit")
    root, shards, config = project
    return train(
        settings=settings(
            steps=OVERFIT_STEPS, checkpoint_every=CHECKPOINT_EVERY, run_name="overfit"
        ),
        model_config=config,
        shards_dir=shards,
        tracking=TrackingSettings(experiment="tests"),
        out_dir=out / "out",
        project_root=root,
    )


def test_tiny_overfit_through_ray_lowers_the_loss(overfit):
    losses = [row["loss"] for row in overfit.history]
    first, last = sum(losses[:2]) / 2, sum(losses[-4:]) / 4
    assert last * OVERFIT_FACTOR <= first, f"loss went from {first:.3f} to {last:.3f}"


def test_outputs_are_written(overfit):
    out = overfit.model_path.parent
    model = load_model(out / "model.pt")
    assert model.config.canvas == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == OVERFIT_STEPS
    assert metrics["images_per_s"] > 0
    assert 0 <= metrics["data_wait_fraction"] <= 1
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "loss", *LOSS_NAMES, "lr"]
    assert len(rows) == OVERFIT_STEPS + 1
    # The saved model is the trained one: it differs from a fresh model of the same seed.
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    name = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(model.state_dict()[name], fresh.state_dict()[name])


def test_mlflow_run_holds_params_loss_histories_and_system_metrics(overfit):
    ref = RunRef.read(overfit.model_path.parent / "run.json")
    assert ref == overfit.run
    client = MlflowClient(ref.tracking_uri)
    run = client.get_run(ref.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(OVERFIT_STEPS)
    assert run.data.params["model.backbone"] == "resnet18"
    assert run.data.params["train.cpus_per_worker"] == "2.0"  # null: the head's 2 CPUs, 1 worker
    assert run.data.params["model.roi.mask_layers"] == "[32]"
    for name in ("loss", *LOSS_NAMES, "lr", "images_per_s", "data_wait"):
        history = client.get_metric_history(ref.run_id, name)
        assert {m.step for m in history} == set(range(1, OVERFIT_STEPS + 1)), name
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    # The one local node, once per worker.
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert run.data.tags[WORKER_NODES_TAG].split(",") == nodes * overfit.metrics["num_workers"]
    artifacts = {a.path for a in client.list_artifacts(ref.run_id, "train")}
    assert artifacts == {"train/metrics.json", "train/loss.csv"}


def test_only_the_last_keep_checkpoints_are_kept(overfit):
    """Runs before the rerun below, which adds a checkpoint to the same directory."""
    kept = sorted(p.name for p in Path(overfit.run_dir).glob("checkpoint_*") if p.is_dir())
    last = range(OVERFIT_STEPS, 0, -CHECKPOINT_EVERY)[: settings().keep_checkpoints]
    assert kept == sorted(f"checkpoint_{step:08d}" for step in last)


def test_rerun_with_the_same_name_resumes_from_the_last_checkpoint(overfit, project, tmp_path):
    more = OVERFIT_STEPS + 2
    result = run_train(
        project, tmp_path, steps=more, checkpoint_every=CHECKPOINT_EVERY, run_name="overfit"
    )
    assert result.run_dir == overfit.run_dir
    assert result.resumed_from == OVERFIT_STEPS
    assert [row["step"] for row in result.history] == list(range(1, more + 1))
    assert result.history[:OVERFIT_STEPS] == overfit.history
    assert result.run.run_id == overfit.run.run_id  # the same MLflow run, continued
    history = MlflowClient(result.run.tracking_uri).get_metric_history(result.run.run_id, "loss")
    assert {m.step for m in history} == set(range(1, more + 1))


@pytest.fixture
def two_nodes(cluster):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.remove_node(node)
    cluster.wait_for_nodes()


def test_ddp_across_two_nodes_with_synchronised_batchnorm_keeps_replicas_identical(
    two_nodes, project, tmp_path
):
    """One worker on each node, ``norm: syncbn`` through the workers' DDP over gloo (DDP
    refuses torch's own SyncBatchNorm on CPU), micro-batches accumulated: the run finishes and
    both replicas hold the same trained weights. (One run for both points: each run's cost is
    mostly Ray starting its workers.)"""
    _, shards, config = project
    synced = replace(config, norm="syncbn")
    plan = plan_run(
        settings=settings(
            num_workers=2,
            batch_per_worker=1,
            grad_accum=2,  # micro-batches accumulate without DDP's all-reduce (no_sync)
            steps=3,
            placement_strategy="STRICT_SPREAD",
            storage_path=str(tmp_path),
            run_name="ddp",
        ),
        model_config=synced,
        shards_dir=shards,
        tracking=TrackingSettings(),
        project_root=tmp_path,
    )
    trainer = make_trainer(plan=plan, run=None)
    summary = trainer.fit().return_value
    assert summary["step"] == 3
    replicas = summary["replicas"]
    assert sorted(r["rank"] for r in replicas) == [0, 1]
    assert len({r["node_id"] for r in replicas}) == 2  # one worker on each node
    assert len({r["state_sha256"] for r in replicas}) == 1  # bitwise identical weights
    seed_everything(0)  # the workers' initial weights
    assert replicas[0]["state_sha256"] != state_digest(MaskRCNN(synced))  # and trained


def test_local_tracking_uri_is_refused_on_a_multi_node_cluster(two_nodes, tmp_path):
    nodes = cluster_node_count()
    assert nodes == 2
    with pytest.raises(ValueError, match="mlflow server"):
        check_uri_for_cluster(f"sqlite:///{tmp_path}/mlflow.db", node_count=nodes)
    check_uri_for_cluster("http://tracking.internal:5000", node_count=nodes)


def test_a_diverging_run_stops_with_a_clear_error(project, tmp_path):
    # An absurd learning rate: the first step blows the weights up, the next loss is not finite.
    with pytest.raises(Exception, match=r"training diverged at step \d+: the loss is not finite"):
        run_train(project, tmp_path, base_lr=1e8, steps=6, max_failures=0, run_name="diverge")


# The worker's step without Ray: one rank, on the CPU, the model not wrapped for DDP.


def worker_trainer(config: ModelConfig, **overrides) -> WorkerTrainer:
    overrides = {"warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.0, **overrides}
    return WorkerTrainer(
        settings=settings(**overrides),
        model_config=config,
        rank=0,
        world=1,
        device=torch.device("cpu"),
    )


def one_image(project):
    _, shards, config = project
    images, targets = next(iter_batches(shards / "train", batch_size=1, model_config=config))
    return images, targets[0]


def copies(images, target, n: int):
    return images.repeat(n, 1, 1, 1), [{k: v.clone() for k, v in target.items()} for _ in range(n)]


def gradients(trainer: WorkerTrainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}


def test_grad_accum_gives_the_gradients_of_the_larger_batch(project):
    """Two accumulated micro-batches of one image = one batch of two images. Mask R-CNN's
    losses are means over the batch's sampled RoIs and mask pixels, not per image, so two
    *different* images agree only approximately; two copies of one image make the two
    exactly comparable, and still catch a missing 1/grad_accum, gradients zeroed between
    micro-batches, or an optimizer step per micro-batch."""
    _, _, config = project
    images, target = one_image(project)
    accumulated = worker_trainer(config, batch_per_worker=1, grad_accum=2)
    large = worker_trainer(config, batch_per_worker=2, grad_accum=1)
    assert accumulated.settings.lr == large.settings.lr  # the same global batch
    torch.manual_seed(5)  # the RoI sampler's draws
    for last in (False, True):
        accumulated.micro_step(*copies(images, target, 1), last=last)
    torch.manual_seed(5)
    large.micro_step(*copies(images, target, 2), last=True)
    expected, got = gradients(large), gradients(accumulated)
    assert got.keys() == expected.keys() and len(got) > 10
    for name, grad in expected.items():
        assert close(got[name], grad), name  # measured: within 2e-5 of the largest entry
    accumulated.optimizer_step()
    large.optimizer_step()
    assert accumulated.progress.step == large.progress.step == 1
    weights = large.module.state_dict()
    for name, value in accumulated.module.state_dict().items():
        assert close(value, weights[name]), name


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal within ``rel`` of the largest magnitude in ``b`` (sums in another order)."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-9)


def test_grad_clip_bounds_the_update(project):
    _, _, config = project
    clip = 0.05
    trainer = worker_trainer(config, grad_clip=clip)
    trainer.micro_step(*copies(*one_image(project), 2), last=True)
    raw = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients(trainer).values()]))
    assert raw > 4 * clip  # clipping binds
    before = [p.detach().clone() for p in trainer.params]
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.optimizer_step()
    # Plain SGD (no momentum, no decay): the update is lr times the clipped gradient.
    steps = [(b - p.detach()) / lr for b, p in zip(before, trainer.params, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([s.norm() for s in steps]))
    assert norm == pytest.approx(clip, rel=1e-3), f"update norm {norm:.4g}, raw {raw:.4g}"


def test_bf16_autocast_runs_the_model_in_bf16_and_keeps_fp32_weights(project):
    _, _, config = project
    trainer = worker_trainer(config, amp="bf16")
    dtypes = []
    conv = next(m for m in trainer.module.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    before = state_digest(trainer.module)
    trainer.micro_step(*copies(*one_image(project), 2), last=True)
    assert dtypes == [torch.bfloat16]
    grads = gradients(trainer)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert trainer.window.finite(world=1)
    trainer.optimizer_step()
    assert state_digest(trainer.module) != before
    assert {p.dtype for p in trainer.params} == {torch.float32}
