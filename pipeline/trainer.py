"""Train on Ray: one call that builds the TorchTrainer, runs it, and writes the stage outputs.

Resuming is Ray Train's: its run directory ``<storage_path>/<run_name>`` keeps the checkpoint
list, so a worker group restarted after a failure, or a driver started again with the same
run name, gets the latest checkpoint from ``ray.train.get_checkpoint()``. Beside Ray's files
we keep ``maskrcnn_run.json``: the MLflow run id (a rerun logs into the same run) and the
settings a resume must not change (a rerun with another recipe is refused, not mixed in).
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

import pyarrow.fs
import ray.data
import torch
from mlflow.tracking import MlflowClient
from ray.data import DataContext, RandomSeedConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.loader import ray_dataset
from pipeline.ray_runtime import cluster_node_count, ensure_ray
from pipeline.shards import check_compatible, read_manifest
from pipeline.tracking import (
    RunRef,
    TrackingSettings,
    check_uri_for_cluster,
    end_run,
    find_project_root,
    log_params,
    open_or_create_run,
    resolve_tracking_uri,
)
from pipeline.train_config import RESUMABLE_CHANGES, TrainSettings
from pipeline.train_loop import train_loop_per_worker
from pipeline.train_progress import LOSS_NAMES
from pipeline.train_state import MODEL_FILE

log = logging.getLogger(__name__)

MANIFEST = "maskrcnn_run.json"
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
    shards_dir: str | Path,
    tracking: TrackingSettings,
    out_dir: str | Path,
    ray_address: str | None = None,
    project_root: Path | None = None,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model_config`` on ``<shards_dir>/train`` and write into ``out_dir``:
    model.pt (``save_model``), metrics.json, loss.csv (for ``dvc plots``) and run.json.

    ``project_root`` (default: found from the current directory) anchors relative paths:
    the tracking store and ``settings.storage_path``. ``fault`` is a fault-tolerance drill,
    ``{"step", "rank", "marker"}``: that rank's process dies once, right after that step.
    """
    started = time.perf_counter()
    root = Path(project_root) if project_root else find_project_root()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = _resolve_storage(settings.storage_path, root)
    settings = replace(settings, storage_path=storage)
    train_dir = str(Path(shards_dir).resolve() / "train")
    _check_classes(check_compatible(train_dir, model_config), model_config, train_dir)

    ensure_ray(ray_address)
    tracking_uri = resolve_tracking_uri(tracking.uri, project_root=root)
    check_uri_for_cluster(tracking_uri, node_count=cluster_node_count())
    run = _open_run(
        settings=settings,
        model_config=model_config,
        storage=storage,
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
            raise RuntimeError(f"training in {storage}/{settings.run_name} left no checkpoint")
        with result.checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    except KeyboardInterrupt:
        end_run(run, status="KILLED")
        raise
    except Exception:
        end_run(run, status="FAILED")
        raise

    model = MaskRCNN(model_config)
    model.load_state_dict(state)
    save_model(model, out / MODEL_OUT)
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
        run_dir=f"{storage}/{settings.run_name}",
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
                name=settings.run_name,
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
    dataset = ray_dataset(train_dir)
    if read_manifest(train_dir)["counts"]["bytes_written"] <= CACHE_MAX_BYTES:
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


def _open_run(
    *,
    settings: TrainSettings,
    model_config: ModelConfig,
    storage: str,
    tracking_uri: str,
    experiment: str,
    project_root: Path,
) -> RunRef:
    """The MLflow run for this Ray run: the one recorded in the run directory's manifest when
    resuming (after checking the recipe did not change), else a new one."""
    where = f"{storage}/{settings.run_name}"
    fs, run_dir = pyarrow.fs.FileSystem.from_uri(where)
    fingerprint = _fingerprint(settings, model_config)
    manifest = _read_json(fs, f"{run_dir}/{MANIFEST}") or {}
    if manifest:
        _check_resumable(manifest["fingerprint"], fingerprint, where)
    run = open_or_create_run(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=settings.run_name,
        project_root=project_root,
        run_id=manifest.get("mlflow_run_id"),
        tags={"ray.run_name": settings.run_name, "ray.storage_path": storage},
    )
    fs.create_dir(run_dir, recursive=True)
    _write_json(
        fs, f"{run_dir}/{MANIFEST}", {"fingerprint": fingerprint, "mlflow_run_id": run.run_id}
    )
    return run


def _check_classes(metadata: dict[str, Any], model_config: ModelConfig, where: str) -> None:
    classes = len(metadata.get("categories", [])) + 1
    if classes != model_config.num_classes:
        raise ValueError(
            f"shards in {where} have {classes - 1} categories (+ background = {classes}), "
            f"but the model config has num_classes={model_config.num_classes}"
        )


def _resolve_storage(storage_path: str, root: Path) -> str:
    """A URI (s3://, gs://, ...) as is; a local path made absolute against ``root``."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    return str((root / Path(storage_path).expanduser()).resolve())


def _fingerprint(settings: TrainSettings, model_config: ModelConfig) -> dict[str, Any]:
    train = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"train": train, "model": model_config.to_dict()}))


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    changed = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section in ("train", "model")
        for key, value in current[section].items()
        if saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise ValueError(
            f"{where} holds a run with other settings ({'; '.join(changed)}); resuming it "
            "would mix two recipes. Use a new train.run_name, or delete that directory to "
            "start over. Only these may change on resume: " + ", ".join(sorted(RESUMABLE_CHANGES))
        )


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_json(fs: pyarrow.fs.FileSystem, path: str, data: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())


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
