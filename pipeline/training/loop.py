"""The function every Ray Train worker runs: DDP Mask R-CNN training over Ray Data shards.

Steps are optimizer steps counted over the whole run (one step = ``grad_accum`` batches on
every worker). A checkpoint every ``checkpoint_every`` steps (and at the end) carries the model,
optimizer, scheduler, scaler, step, RNG states and data position; a restarted worker group
(after a failure, or a rerun of the driver with the same run name) resumes from the latest one
through ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConsistencyMode

from maskrcnn.checkpoints import load_imagenet_backbone as load_imagenet
from maskrcnn.checkpoints import load_maskrcnn_state, load_torchvision_maskrcnn
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.config.settings import TrainSettings
from pipeline.inference.detector import conv_layout
from pipeline.registry.tracking import RunRef, attached_run
from pipeline.training.batch import prefetch_batches, to_device, unpack_batch
from pipeline.training.device import configure_device, ddp_kwargs
from pipeline.training.faults import FAULT_ENV, FaultDrill
from pipeline.training.hooks import RecipeHooks
from pipeline.training.loader import make_collate_fn
from pipeline.training.metrics_sender import MetricsSender, send_metrics
from pipeline.training.periodic_eval import PeriodicEval, rank0_evaluator
from pipeline.training.progress import LossWindow, ThroughputMeter, diverged_message
from pipeline.training.progress_bar import StepReporter
from pipeline.training.resources import torch_threads
from pipeline.training.schedule import make_optimizer, make_scheduler
from pipeline.training.state import (
    Progress,
    read_checkpoint,
    seed_everything,
    state_digest,
    stream_seed,
    write_checkpoint,
)

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHUFFLE_BUFFER_BATCHES = 8  # rows shuffled on each worker, in batches: cheap, and enough
# Run tag: the Ray node id of each rank, in rank order (the latest attempt's placement).
WORKER_NODES_TAG = "ray.worker_node_ids"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. ``config``: ``settings`` and ``model`` (dicts), ``run`` (RunRef
    fields or None), ``board`` (the driver's progress bar board, or None). Rank 0 returns a
    summary. A fault drill, if any, comes from the ``MASKRCNN_FAULT`` environment variable
    (:mod:`pipeline.training.faults`)."""
    settings = TrainSettings.from_dict(config["settings"])
    model_config = ModelConfig.from_dict(config["model"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not settings.use_gpu:
        torch.set_num_threads(torch_threads(settings))

    trainer = WorkerTrainer(
        settings=settings,
        model_config=model_config,
        rank=rank,
        world=world,
        device=ray.train.torch.get_device(),
        drill=FaultDrill.parse(os.environ.get(FAULT_ENV)),
        evaluator=rank0_evaluator(config.get("eval"), settings, model_config, rank=rank),
        reporter=StepReporter(config.get("board")) if rank == 0 else None,
    )
    resumed_from = trainer.restore(ray.train.get_checkpoint(), parent=config.get("parent"))
    run = RunRef(**config["run"]) if config.get("run") and rank == 0 else None
    nodes = trainer.node_ids()
    tracking = attached_run(run) if run else contextlib.nullcontext()
    with tracking as client:
        sender = None
        if run:
            client.set_tag(run.run_id, WORKER_NODES_TAG, ",".join(nodes))
            sender = MetricsSender(partial(send_metrics, client, run.run_id))
        try:
            trainer.fit(ray.train.get_dataset_shard("train"), log_fn=sender.put if sender else None)
        finally:
            if sender:
                sender.close()
    return {
        "resumed_from": resumed_from,
        **trainer.summary(),
        **(sender.counts() if sender else {}),
        "replicas": trainer.replicas(),
    }


class WorkerTrainer:
    """Model, optimizer and progress of one worker; ``fit`` runs steps until ``settings.steps``."""

    def __init__(
        self,
        *,
        settings: TrainSettings,
        model_config: ModelConfig,
        rank: int,
        world: int,
        device: torch.device,
        drill: FaultDrill | None = None,
        evaluator: PeriodicEval | None = None,
        reporter: StepReporter | None = None,
    ) -> None:
        self.settings, self.rank, self.world = settings, rank, world
        self.reporter = reporter or StepReporter()
        self.hooks = RecipeHooks(settings, rank=rank, world=world, evaluator=evaluator)
        self.model_config = model_config
        self.device, self.drill = device, drill
        configure_device(device, amp=settings.amp)
        seed_everything(settings.seed)  # identical initial weights on every rank
        self.module = MaskRCNN(model_config).to(self.device, memory_format=conv_layout(device))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, settings)
        self.scheduler = make_scheduler(self.optimizer, settings)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        self.progress = Progress()
        self.window = LossWindow(device)
        self.meter = ThroughputMeter()
        self.model: torch.nn.Module = self.module

    def restore(self, checkpoint: ray.train.Checkpoint | None, *, parent: Any = None) -> int:
        """Load the latest checkpoint (every rank) or the initial weights (rank 0; ``parent``:
        init: registry), then wrap the model for DDP, which broadcasts rank 0's weights;
        return the step resumed from."""
        if checkpoint is None:
            self._load_initial_weights(parent)
            self.hooks.start(self.module)
        else:
            with checkpoint.as_directory() as directory:
                self.progress = read_checkpoint(
                    directory,
                    rank=self.rank,
                    model=self.module,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                    device=self.device,
                )
                self.hooks.start(self.module, checkpoint_dir=directory)
            if self.rank == 0:
                p = self.progress
                log.info(
                    "resuming at step %d, epoch %d, batch %d", p.step, p.epoch, p.batch_in_epoch
                )
        self.model = ray.train.torch.prepare_model(
            self.module, parallel_strategy_kwargs=ddp_kwargs(self.model_config)
        )
        # New draws after a restart, not a replay of the failed attempt's random stream.
        self.collate = make_collate_fn(
            self.model_config,
            flip_prob=self.settings.flip_prob,
            seed=stream_seed(self.settings.seed, self.rank, self.progress.step),
            pin_memory=self.device.type == "cuda",
        )
        return self.progress.step

    def _load_initial_weights(self, parent: Any = None) -> None:
        """Only rank 0 needs the weights: wrapping for DDP copies its weights to all."""
        s = self.settings
        if s.init == "none" or self.rank != 0:
            return
        if s.init == "registry":  # the trainer put the parent's weights in the object store
            weights, same = ray.get(parent["weights"]), parent["same_classes"]
            result = load_maskrcnn_state(
                self.module, weights, source=parent["uri"], same_classes=same
            )
        else:
            load = load_imagenet if s.init == "imagenet" else load_torchvision_maskrcnn
            result = load(self.module, s.weights_path)
        log.info(
            "initialised from %s (%s): %d tensors. %s",
            s.weights_path,
            s.init,
            result.loaded,
            result.note,
        )

    def fit(self, shard: Any, *, log_fn: Any) -> None:
        s = self.settings
        self.model.train()
        micro = 0
        while self.progress.step < s.steps and not self.progress.stopped_early:
            for images, targets, wait_s in self._epoch_batches(shard):
                micro += 1
                self.micro_step(images, targets, last=micro == s.grad_accum)
                self.meter.add(images=images.shape[0] * self.world, wait_s=wait_s)
                if micro < s.grad_accum:
                    continue
                micro = 0
                self.optimizer_step()
                step = self.progress.step
                self._fault("exit", step)
                if step % s.log_every == 0 or step == s.steps:
                    self._log(self.window.reduce(self.world), log_fn)
                self.hooks.after_step(self.module, self.progress)
                with self.meter.paused():  # images/s and the ETA are of training
                    evaluated = self.hooks.evaluate_if_due(self.module, self.progress, log_fn)
                if step % s.checkpoint_every == 0 or step == s.steps or evaluated:
                    self._check_finite()
                    self._checkpoint()
                    self._fault("after_checkpoint", step)
                if step >= s.steps or (evaluated and self.hooks.stop(self.progress)):
                    return
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0

    def _epoch_batches(self, shard: Any) -> Iterator[tuple[torch.Tensor, list, float]]:
        """This epoch's batches on the device, with the seconds spent waiting for each;
        batches already consumed before a resume are skipped."""
        skip, seen = self.progress.batch_in_epoch, 0
        batch = self.settings.batch_per_worker
        options = dict(
            batch_size=batch,
            prefetch_batches=prefetch_batches(self.settings.prefetch_batches, self.device),
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch,
            local_shuffle_seed=stream_seed(self.settings.seed, self.rank, self.progress.epoch),
        )
        if self.device.type == "cuda":  # collated in Ray Data's threads, beside the GPU's step
            # device "cpu": to_device moves the pinned batch, and leaves `counts` on the host
            batches = shard.iter_torch_batches(collate_fn=self.collate, device="cpu", **options)
            iterator = iter(batches)
        else:  # collated here: torch work in a second thread slows the step (docs/benchmarks.md)
            iterator = map(self.collate, shard.iter_batches(batch_format="numpy", **options))
        while True:
            start = time.perf_counter()
            try:
                packed = next(iterator)
            except StopIteration:
                break
            seen += 1
            if seen <= skip:
                continue
            images, targets = unpack_batch(to_device(packed, self.device))
            self.progress.batch_in_epoch = seen
            yield images, targets, time.perf_counter() - start
        if seen == 0:
            raise ValueError(
                f"rank {self.rank}: its share of the train shards holds fewer than "
                f"batch_per_worker={self.settings.batch_per_worker} images"
            )

    def micro_step(self, images: torch.Tensor, targets: list, *, last: bool) -> None:
        """Forward and backward of one micro-batch; gradients accumulate over ``grad_accum``
        micro-batches (DDP all-reduces them with the ``last`` one) into one optimizer step.

        No host sync here: the losses stay on the device, in the loss window, whose sums turn
        non-finite with the first non-finite loss and are checked when they are read anyway
        (each log step) and before each checkpoint (:meth:`_check_finite`).
        """
        s = self.settings
        no_sync = self.world > 1 and not last and hasattr(self.model, "no_sync")
        autocast = (
            torch.autocast(self.device.type, dtype=AMP_DTYPES[s.amp])
            if s.amp != "none"
            else contextlib.nullcontext()
        )
        # Accumulating micro-batches skip DDP's gradient all-reduce until the last one.
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast:
                losses = self.model(images, targets)
            total = sum(losses.values())
            self.scaler.scale(total / s.grad_accum).backward()
        self.window.add(losses)

    def optimizer_step(self) -> None:
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def _check_finite(self) -> None:
        """Never checkpoint weights that a non-finite loss has reached (one sync)."""
        if not self.window.finite(self.world):
            losses = self.window.reduce(self.world)
            raise FloatingPointError(diverged_message(losses, step=self.progress.step))

    def _fault(self, kind: str, step: int) -> None:
        if self.drill and self.drill.due(kind=kind, step=step, rank=self.rank):
            self.drill.fire("exits" if kind == "exit" else "exits after its checkpoint")

    def _log(self, losses: dict[str, float], log_fn: Any) -> None:
        step, s = self.progress.step, self.settings
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(diverged_message(losses, step=step))
        images_per_s, wait = self.meter.window()
        lr = self.optimizer.param_groups[0]["lr"]
        row = {
            "step": step,
            "epoch": self.progress.epoch,
            "lr": lr,
            **losses,
            "images_per_s": images_per_s,
            "data_wait": wait,
        }
        self.progress.history.append(row)
        if self.rank != 0:
            return
        eta = (s.steps - step) * s.global_batch / max(images_per_s, 1e-9)
        self.reporter.report(
            step=step,
            steps=s.steps,
            losses=losses,
            lr=lr,
            images_per_s=images_per_s,
            data_wait=wait,
            eta_s=eta,
        )
        if log_fn:
            log_fn({k: v for k, v in row.items() if k != "step"}, step)

    def _checkpoint(self) -> None:
        """Every rank reports (Ray Train needs the same number of reports from each); each
        writes its own part and Ray merges the parts into one checkpoint directory."""
        metrics = {"step": self.progress.step, "epoch": self.progress.epoch}
        if self.progress.history:
            metrics["loss"] = self.progress.history[-1]["loss"]
        metrics.update(self.hooks.checkpoint_metrics(self.progress))
        step = self.progress.step
        drill = self.drill
        upload = None  # Ray's own copy to storage
        if drill and drill.due(kind="checkpoint_write", step=step, rank=self.rank):
            upload = drill.partial_upload
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(
                directory,
                rank=self.rank,
                model=self.module,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                progress=self.progress,
                device=self.device,
            )
            self.hooks.write(directory)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
                checkpoint_upload_fn=upload,
            )
        # Ray registers a checkpoint when its controller next polls the workers (every 2 s):
        # wait for that, so that a crash from here on loses at most checkpoint_every steps.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def summary(self) -> dict[str, Any]:
        return {
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "history": self.progress.history,
            **self.hooks.summary(self.progress),
            **self.meter.overall(),
        }

    def node_ids(self) -> list[str]:
        """The Ray node of every rank, in rank order (a collective: every rank calls it)."""
        return self._all_gather(ray.get_runtime_context().get_node_id())

    def replicas(self) -> list[dict[str, Any]]:
        """Each rank's node and a digest of its weights, gathered on every rank: DDP keeps
        replicas bitwise identical, so one digest that differs means a broken run."""
        mine = {
            "rank": self.rank,
            "node_id": ray.get_runtime_context().get_node_id(),
            "state_sha256": state_digest(self.module),
        }
        return self._all_gather(mine)

    def _all_gather(self, mine: Any) -> list[Any]:
        """Every rank's ``mine``, in rank order, on every rank (a collective)."""
        if self.world == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered
