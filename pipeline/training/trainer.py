"""Train on Ray: one call that builds the TorchTrainer, runs it, and writes the stage outputs.

Resuming is Ray Train's: its run directory ``<storage_path>/<run_name>-<recipe hash>`` keeps
the checkpoint list, so a worker group restarted after a failure, or a driver started again
with the same run name and recipe, gets the latest checkpoint from ``ray.train.get_checkpoint()``
(the directory name and the MLflow run that goes with it: ``pipeline.training.run_dir``).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.data
import torch
from mlflow.tracking import MlflowClient
from ray.data import DataContext, RandomSeedConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.config.settings import TrainSettings
from pipeline.io import storage
from pipeline.io.ray_runtime import cluster_node_count, ensure_ray
from pipeline.registry.tracking import (
    RunRef,
    TrackingSettings,
    check_uri_for_cluster,
    end_run,
    find_project_root,
    log_params,
    resolve_tracking_uri,
)
from pipeline.shards.schema import check_compatible, read_manifest
from pipeline.training.loader import ray_dataset
from pipeline.training.loop import train_loop_per_worker
from pipeline.training.progress import LOSS_NAMES
from pipeline.training.run_dir import open_run_for, ray_run_dir, ray_run_name
from pipeline.training.state import MODEL_FILE

log = logging.getLogger(__name__)

CACHE_MAX_BYTES = 1 << 30
MODEL_OUT, METRICS_OUT, LOSS_OUT, RUN_OUT = "model.pt", "metrics.json", "loss.csv", "run.json"


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What ``train`` wrote and measured."""

    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    run: RunRef
    run_dir: str
    resumed_from: int


def train(
    *,
    settings: TrainSettings,
    model_config: ModelConfig,
    shards_dir: storage.Location,
    tracking: TrackingSettings,
    out_dir: str | Path,
    ray_address: str | None = None,
    project_root: Path | None = None,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model_config`` on ``<shards_dir>/train`` and write into ``out_dir``:
    model.pt (``save_model``), metrics.json, loss.csv (for ``dvc plots``) and run.json.

    ``project_root`` (default: found from the current directory) anchors relative paths:
    the tracking store and ``settings.storage_path``. ``shards_dir`` and the storage path may be
    URIs (s3://, gs://, file://, ...): on a cluster, every node must reach them. ``fault`` is a
    fault-tolerance drill, ``{"step", "rank", "marker"}``: that rank's process dies once, right
    after that step.
    """
    started = time.perf_counter()
    root = Path(project_root) if project_root else find_project_root()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage_path = storage.absolute(settings.storage_path, root=root)
    settings = replace(settings, storage_path=storage_path)
    train_dir = storage.join(storage.absolute(shards_dir), "train")
    _check_classes(check_compatible(train_dir, model_config), model_config, train_dir)

    if settings.amp == "bf16" and not settings.use_gpu:
        log.warning(
            "amp: bf16 on CPU was ~20x slower than fp32 on a CPU without bf16 instructions "
            "(docs/benchmarks.md, Training): measure it on yours before keeping it"
        )
    ensure_ray(ray_address)
    tracking_uri = resolve_tracking_uri(tracking.uri, project_root=root)
    check_uri_for_cluster(tracking_uri, node_count=cluster_node_count())
    run_dir = ray_run_dir(settings, model_config)
    run = open_run_for(
        settings=settings,
        model_config=model_config,
        tracking_uri=tracking_uri,
        experiment=tracking.experiment,
        project_root=root,
    )
    data_params = {"shards_dir": str(shards_dir)}
    log_params(
        run, {"train": settings.to_dict(), "model": model_config.to_dict(), "data": data_params}
    )
    run.write(out / RUN_OUT)

    trainer = make_trainer(
        settings=settings, model_config=model_config, train_dir=train_dir, run=run, fault=fault
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training in {run_dir} left no checkpoint")
        with result.checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception:
        end_run(run, status="FAILED")
        raise
    except BaseException:  # Ctrl-C (Ray Train aborts the run first), SystemExit
        end_run(run, status="KILLED")
        raise

    model = MaskRCNN(model_config)
    model.load_state_dict(state)
    save_model(model, out / MODEL_OUT, categories=read_manifest(train_dir)["categories"])
    summary = result.return_value or {}
    history = summary.get("history", [])
    metrics = _final_metrics(summary, settings, wall_s=time.perf_counter() - started)
    (out / METRICS_OUT).write_text(json.dumps(metrics, indent=2) + "\n")
    _write_loss_csv(out / LOSS_OUT, history)
    client = MlflowClient(run.tracking_uri)
    for name in (METRICS_OUT, LOSS_OUT):
        client.log_artifact(run.run_id, str(out / name), artifact_path="train")
    end_run(run, status="FINISHED")
    log.info("trained %d steps: %s", metrics["step"], out / MODEL_OUT)
    return TrainResult(
        model_path=out / MODEL_OUT,
        metrics=metrics,
        history=history,
        run=run,
        run_dir=run_dir,
        resumed_from=int(summary.get("resumed_from", 0)),
    )


def make_trainer(
    *,
    settings: TrainSettings,
    model_config: ModelConfig,
    train_dir: str,
    run: RunRef | None,
    fault: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer for these settings; ``run`` None trains without MLflow logging.

    ``train_dir`` and ``settings.storage_path`` must be absolute (workers run elsewhere).
    """
    with _quiet_data_progress():
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "settings": settings.to_dict(),
                "model": model_config.to_dict(),
                "run": run.to_dict() if run else None,
                "fault": fault,
            },
            torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers,
                use_gpu=settings.use_gpu,
                resources_per_worker={"CPU": settings.cpus_per_worker},
                placement_strategy=settings.placement_strategy,
            ),
            run_config=RunConfig(
                name=ray_run_name(settings, model_config),
                storage_path=settings.storage_path,
                failure_config=FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            ),
            datasets={"train": _train_dataset(train_dir, seed=settings.seed)},
        )


def _train_dataset(train_dir: str, *, seed: int) -> ray.data.Dataset:
    """The train split, its blocks in a new order every epoch; rows are shuffled further in a
    small buffer on each worker (see the training loop).

    A split of at most ``CACHE_MAX_BYTES`` is read once and kept in Ray's object store, so an
    epoch does not re-read the files; a larger one streams from the files every epoch.
    """
    manifest = read_manifest(train_dir)
    dataset = ray_dataset(train_dir, manifest=manifest)
    if manifest["counts"]["bytes_written"] <= CACHE_MAX_BYTES:
        dataset = dataset.materialize()
    return dataset.randomize_block_order(
        seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
    )


@contextmanager
def _quiet_data_progress() -> Iterator[None]:
    """No Ray Data progress bars in the training logs: the trainer captures the current
    DataContext when it is built and hands it to the workers."""
    context = DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = saved


def _check_classes(metadata: dict[str, Any], model_config: ModelConfig, where: str) -> None:
    classes = len(metadata.get("categories", [])) + 1
    if classes != model_config.num_classes:
        raise ValueError(
            f"shards in {where} have {classes - 1} categories (+ background = {classes}), "
            f"but the model config has num_classes={model_config.num_classes}"
        )


def _final_metrics(
    summary: dict[str, Any], settings: TrainSettings, *, wall_s: float
) -> dict[str, Any]:
    last = summary.get("history", [{}])[-1] if summary.get("history") else {}
    return {
        "step": summary.get("step", 0),
        "epoch": summary.get("epoch", 0),
        **{k: last[k] for k in ("loss", *LOSS_NAMES) if k in last},
        "images_per_s": summary.get("images_per_s", 0.0),
        "data_wait_fraction": summary.get("data_wait_fraction", 0.0),
        "train_s": summary.get("train_s", 0.0),
        "wall_s": wall_s,
        "resumed_from_step": summary.get("resumed_from", 0),
        "num_workers": settings.num_workers,
        "global_batch": settings.global_batch,
    }


def _write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    columns = ["step", "loss", *LOSS_NAMES, "lr"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
