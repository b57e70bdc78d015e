"""Train on Ray: the train stage's work as a short sequence of named steps.

``train`` plans the run (``pipeline.training.run_dir``: paths, the train manifest, the recipe
hash, once), checks the shards against the model, starts Ray, opens the MLflow run, builds and
fits the TorchTrainer, and writes the stage outputs (``pipeline.io.outputs.TRAIN``).

Resuming is Ray Train's: its run directory ``<storage_path>/<run_name>-<recipe hash>`` keeps
the checkpoint list, so a worker group restarted after a failure, or a driver started again
with the same run name and recipe, gets the latest checkpoint from ``ray.train.get_checkpoint()``
and logs into the same MLflow run.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.data
import torch
from mlflow.tracking import MlflowClient
from ray.data import DataContext, RandomSeedConfig
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from maskrcnn.checkpoints import CLASS_SPECIFIC, save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.io import storage
from pipeline.io.console import on_terminal
from pipeline.io.outputs import TRAIN
from pipeline.io.ray_runtime import (
    cluster_node_count,
    ensure_ray,
    quiet_data_context,
    verbose_requested,
)
from pipeline.registry.lineage import log_shard_inputs, shard_inputs
from pipeline.registry.tracking import (
    RunRef,
    check_server,
    check_uri_for_cluster,
    end_run,
    find_project_root,
    log_params,
)
from pipeline.shards.schema import check_compatible
from pipeline.training.failures import FailureSummary, start_failure
from pipeline.training.loader import ray_dataset
from pipeline.training.loop import train_loop_per_worker
from pipeline.training.progress import LOSS_NAMES
from pipeline.training.progress_bar import training_bar
from pipeline.training.repeat import repeat_dataset
from pipeline.training.resources import with_worker_cpus
from pipeline.training.run_dir import RunPlan, open_run, plan_run
from pipeline.training.selection import Selected, checkpoint_config, eval_spec, select_checkpoint

log = logging.getLogger(__name__)

CACHE_MAX_BYTES = 1 << 30


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
    train_manifest: Mapping[str, Any] | None = None,
    val_annotations: storage.Location | None = None,
    train_scales: Sequence[float] | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Train ``model_config`` on ``<shards_dir>/train`` and write into ``out_dir`` the files
    of ``pipeline.io.outputs.TRAIN``: the model (``save_model``, with the shards' categories),
    metrics.json, loss.csv (for ``dvc plots``) and run.json.

    ``project_root`` (default: found from the current directory) anchors relative paths:
    the tracking store and ``settings.storage_path``. ``shards_dir`` and the storage path may be
    URIs (s3://, gs://, file://, ...): on a cluster, every node must reach them.
    ``train_manifest``: the train split's manifest, when the caller has read it;
    ``val_annotations``: the val split's annotation file, which evaluations during training
    (``train.eval_every``) score against, on ``<shards_dir>/val``; ``train_scales``: the
    scales the params ask for (``preprocess.train_scales``), which the train shards must hold
    targets for (None: whatever they hold). Fault drills:
    ``MASKRCNN_FAULT`` in the workers' environment (``pipeline.training.faults``).
    ``verbose``: Ray Data's and Ray Train's own INFO lines on the console (``ray_runtime``).
    """
    started = time.perf_counter()
    plan = plan_run(
        settings=settings,
        model_config=model_config,
        shards_dir=shards_dir,
        tracking=tracking,
        project_root=Path(project_root) if project_root else find_project_root(),
        train_manifest=train_manifest,
    )
    _check_shards(plan, train_scales=train_scales)
    _warn_about_slow_settings(plan.settings, cpu_has_bf16=cpu_has_bf16())
    check_server(plan.tracking_uri)  # before Ray starts: an unreachable server fails at once
    ensure_ray(ray_address, verbose=verbose)
    check_uri_for_cluster(plan.tracking_uri, node_count=cluster_node_count())
    plan = _with_worker_cpus(plan)  # before the MLflow run, which logs the settings
    run = _start_run(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.write(out / TRAIN.run)
    with training_bar(steps=plan.settings.steps, enabled=on_terminal()) as board:
        trainer = make_trainer(
            plan=plan, run=run, val_annotations=val_annotations, verbose=verbose, board=board
        )
        summary, selected = _fit(trainer, settings=plan.settings, run=run, where=plan.directory)
    _write_model(selected.state, plan, out / TRAIN.model)
    history = summary.get("history", [])
    metrics = _final_metrics(summary, plan.settings, wall_s=time.perf_counter() - started)
    metrics.update(selected.metrics(), stopped_early=bool(summary.get("stopped_early")))
    (out / TRAIN.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    _write_loss_csv(out / TRAIN.loss, history)
    _log_outputs(run, out)
    end_run(run, status="FINISHED")
    log.info("trained %d steps: %s", metrics["step"], out / TRAIN.model)
    return TrainResult(
        model_path=out / TRAIN.model,
        metrics=metrics,
        history=history,
        run=run,
        run_dir=plan.directory,
        resumed_from=int(summary.get("resumed_from", 0)),
    )


def make_trainer(
    *,
    plan: RunPlan,
    run: RunRef | None,
    val_annotations: storage.Location | None = None,
    verbose: bool = False,
    board: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a planned run; ``run`` None trains without MLflow logging;
    ``val_annotations``: what evaluations during training score against. Not ``verbose``:
    Ray Train's console shows errors only (its log files keep the rest) and a worker failure
    is summarised by ``FailureSummary``. ``board``: the progress bar's board (``progress_bar``),
    which rank 0 feeds instead of logging its progress line on the console."""
    plan = _with_worker_cpus(plan)
    settings, verbose = plan.settings, verbose_requested(verbose)
    with _quiet_data_progress(verbose=verbose):
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "settings": settings.to_dict(),
                "model": plan.model_config.to_dict(),
                "run": run.to_dict() if run else None,
                "board": board,
                "parent": _parent_config(plan),
                "eval": eval_spec(
                    settings=settings, train_dir=plan.train_dir, val_annotations=val_annotations
                ),
            },
            torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers,
                use_gpu=settings.use_gpu,
                resources_per_worker={"CPU": settings.cpus_per_worker},
                placement_strategy=settings.placement_strategy,
            ),
            run_config=RunConfig(
                name=plan.name,
                storage_path=settings.storage_path,
                # A worker group that cannot start (a node lost) stops as a worker does.
                failure_config=FailureConfig(
                    max_failures=settings.max_failures,
                    controller_failure_limit=settings.max_failures,
                ),
                checkpoint_config=checkpoint_config(settings),
                logging_config=LoggingConfig(log_level="INFO" if verbose else "ERROR"),
                callbacks=[
                    FailureSummary(run_dir=plan.directory, max_failures=settings.max_failures)
                ],
            ),
            datasets={"train": _train_dataset(plan)},
        )


def _check_shards(plan: RunPlan, *, train_scales: Sequence[float] | None) -> None:
    """The train shards were made for this model (its anchors, canvas and class count) and,
    when given, for these training scales."""
    try:
        metadata = check_compatible(
            dict(plan.train_manifest), plan.model_config, train_scales=train_scales
        )
    except ValueError as err:
        raise ValueError(f"{plan.train_dir}: {err}") from None
    classes = len(metadata.get("categories", [])) + 1
    if classes != plan.model_config.num_classes:
        raise ValueError(
            f"shards in {plan.train_dir} have {classes - 1} categories (+ background = {classes}), "
            f"but the model config has num_classes={plan.model_config.num_classes}"
        )


def _warn_about_slow_settings(settings: TrainSettings, *, cpu_has_bf16: bool) -> None:
    """bf16 autocast on a CPU without bf16 instructions (AVX512-BF16 or AMX, as this driver's
    CPU is judged) emulates them: many times slower than fp32, not faster."""
    if settings.amp == "bf16" and not settings.use_gpu and not cpu_has_bf16:
        log.warning(
            "amp: bf16 on CPU was ~20x slower than fp32 on a CPU without bf16 instructions, "
            "as this one is (docs/benchmarks.md, Training): measure it before keeping it"
        )


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _start_run(plan: RunPlan) -> RunRef:
    """The plan's MLflow run (the same one when resuming), with the recipe as its params and
    the train and val shards as its dataset inputs."""
    run = open_run(plan)
    log_params(
        run,
        {
            "train": plan.settings.to_dict(),
            "model": plan.model_config.to_dict(),
            "data": {"shards_dir": plan.shards_dir},
        },
    )
    datasets = shard_inputs(plan.shards_dir, known={"train": plan.train_manifest})
    client = MlflowClient(run.tracking_uri)
    log_shard_inputs(client, run.run_id, datasets)
    for key, value in (plan.parent.tags() if plan.parent else {}).items():
        client.set_tag(run.run_id, key, value)
    return run


def _parent_config(plan: RunPlan) -> dict[str, Any] | None:
    """The parent model for rank 0: its weights go into the Ray object store once, here, and
    the workers get the reference. Rank 0 may run on another node, which cannot see a
    driver-local file; the object lives as long as the driver that owns it, i.e. the fit (a
    restarted worker group fetches it again), and writes nothing to ``storage_path``."""
    parent = plan.parent
    if parent is None:
        return None
    categories = plan.train_manifest.get("categories", [])
    same = parent.same_classes(categories)
    log.info(
        "fine-tuning from %s (%s): %d classes in the parent, %d here%s",
        parent.uri,
        parent.requested,
        parent.state_dict[CLASS_SPECIFIC[0] + "weight"].shape[0],  # its num_classes
        len(categories) + 1,
        "" if same else f": {', '.join(k.rstrip('.') for k in CLASS_SPECIFIC)} start fresh",
    )
    return {"weights": ray.put(dict(parent.state_dict)), "uri": parent.uri, "same_classes": same}


def _fit(
    trainer: TorchTrainer, *, settings: TrainSettings, run: RunRef, where: str
) -> tuple[dict[str, Any], Selected]:
    """Rank 0's summary and the checkpoint ``train.select`` chose (``selection``); a run that
    does not finish leaves its MLflow run FAILED (an error) or KILLED (Ctrl-C: Ray Train aborts
    it first)."""
    try:
        result = trainer.fit()
        selected = select_checkpoint(result, settings, where=where)
    except Exception as error:
        end_run(run, status="FAILED")
        explained = start_failure(error, num_workers=settings.num_workers, run_dir=where)
        if explained:
            raise explained from error
        raise
    except BaseException:
        end_run(run, status="KILLED")
        raise
    return result.return_value or {}, selected


def _write_model(state: dict[str, torch.Tensor], plan: RunPlan, path: Path) -> None:
    """The model file: config, weights and the shards' categories (so it names its classes)."""
    model = MaskRCNN(plan.model_config)
    model.load_state_dict(state)
    save_model(model, path, categories=plan.train_manifest.get("categories"))


def _log_outputs(run: RunRef, out: Path) -> None:
    client = MlflowClient(run.tracking_uri)
    for name in (TRAIN.metrics, TRAIN.loss):
        client.log_artifact(run.run_id, str(out / name), artifact_path="train")


def _train_dataset(plan: RunPlan) -> ray.data.Dataset:
    """The train split, its blocks in a new order every epoch; rows are shuffled further in a
    small buffer on each worker (see the training loop).

    A split of at most ``CACHE_MAX_BYTES`` is read once and kept in Ray's object store, so an
    epoch does not re-read the files; a larger one streams from the files every epoch. With
    ``repeat_factor_threshold`` each epoch repeats images by their factor (``repeat``).
    """
    dataset = ray_dataset(plan.train_dir, manifest=plan.train_manifest)
    if _cached(plan):
        dataset = dataset.materialize()
    dataset = dataset.randomize_block_order(
        seed=RandomSeedConfig(seed=plan.settings.seed, reseed_after_execution=True)
    )
    threshold = plan.settings.repeat_factor_threshold
    if threshold > 0:
        dataset = repeat_dataset(
            dataset, plan.train_manifest, threshold=threshold, seed=plan.settings.seed
        )
    return dataset


def _with_worker_cpus(plan: RunPlan) -> RunPlan:
    """The plan with ``cpus_per_worker`` resolved for the connected Ray (``resources``)."""
    settings = with_worker_cpus(
        plan.settings,
        ray_cpus=ray.cluster_resources().get("CPU", 1.0),
        nodes=cluster_node_count(),
        streamed=not _cached(plan),
    )
    return replace(plan, settings=settings)


def _cached(plan: RunPlan) -> bool:
    """Whether the train split is small enough to keep in Ray's object store."""
    return plan.train_manifest["counts"]["bytes_written"] <= CACHE_MAX_BYTES


@contextmanager
def _quiet_data_progress(*, verbose: bool) -> Iterator[None]:
    """No Ray Data progress bars in the training logs (nor, unless ``verbose``, its lines at
    the start of each epoch's execution): the trainer captures the current DataContext when it
    is built and hands it to the workers."""
    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    quiet_data_context(context)
    context.print_on_execution_start = verbose
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


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
