"""Typed training settings: the ``train:`` section of params.yaml, validated once, up front.

Field names are the params.yaml keys. The learning rate is given for a reference global batch
(``lr_reference_batch``) and scaled linearly with the real one (Goyal et al.), so changing the
number of workers or the batch per worker keeps the recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("multistep", "cosine")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
INITS = ("none", "imagenet", "coco")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# Settings that may change while a run goes on under the same run name: how long it runs, how
# often it logs and checkpoints, where and on how many workers it runs (the learning rate follows
# the global batch). A change to any other setting is another recipe, hence another run
# (pipeline.training.run_dir).
RESUMABLE_CHANGES = frozenset(
    {
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "placement_strategy",
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "storage_path",
        "log_every",
    }
)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How to train: resources, optimisation recipe, checkpoints and logging."""

    # resources
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    batch_per_worker: int = 2
    # optimisation
    optimizer: str = "sgd"  # adamw: betas (0.9, 0.999); momentum is SGD's only
    steps: int = 1000
    base_lr: float = 0.02
    lr_reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    grad_clip: float = 0.0
    grad_accum: int = 1
    amp: str = "none"
    flip_prob: float = 0.5
    init: str = "none"
    weights_path: str | None = None
    # fault tolerance
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 2
    storage_path: str = "ray_results"
    run_name: str = "maskrcnn"
    # logging
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "num_workers must be >= 1")
        _require(self.cpus_per_worker > 0, "cpus_per_worker must be > 0")
        _choice("placement_strategy", self.placement_strategy, PLACEMENTS)
        for name in ("batch_per_worker", "steps", "lr_reference_batch", "grad_accum"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _require(self.base_lr > 0, "base_lr must be > 0")
        _require(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _require(0 < self.warmup_factor <= 1, "warmup_factor must be in (0, 1]")
        _choice("schedule", self.schedule, SCHEDULES)
        _require(0 < self.gamma <= 1, "gamma must be in (0, 1]")
        _require(
            all(0 < m < self.steps for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones)),
            f"milestones must be strictly increasing steps in (0, steps={self.steps}), "
            f"got {list(self.milestones)}",
        )
        _require(self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)")
        _choice("amp", self.amp, AMP_MODES)
        _require(
            self.amp != "fp16" or self.use_gpu,
            "amp: fp16 needs use_gpu: true (CPU autocast supports bf16 only)",
        )
        _require(0 <= self.flip_prob <= 1, "flip_prob must be in [0, 1]")
        _choice("init", self.init, INITS)
        _require(
            self.init == "none" or bool(self.weights_path),
            f"init: {self.init} needs weights_path (a local file; nothing is downloaded)",
        )
        _require(self.max_failures >= -1, "max_failures must be >= 0, or -1 for unlimited")
        _require(bool(self.storage_path), "storage_path must not be empty")
        _require(
            bool(self.run_name) and "/" not in self.run_name,
            f"run_name must be a non-empty name without '/', got {self.run_name!r}",
        )

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all workers and accumulated micro-batches."""
        return self.batch_per_worker * self.num_workers * self.grad_accum

    @property
    def lr(self) -> float:
        """Peak learning rate: ``base_lr`` scaled linearly from the reference batch."""
        return self.base_lr * self.global_batch / self.lr_reference_batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        """Build from the ``train:`` section of params.yaml; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train settings: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"train settings: {message}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name} must be one of {allowed}, got {value!r}")
