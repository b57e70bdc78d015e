"""Typed settings, one frozen class per params.yaml section, validated once, up front.

Field names are the params.yaml keys, and each class is what its stage hands on to the code
that does the work (``**settings.to_dict()`` into ``preprocess_split``, ``evaluate``, ...), so
the params check (``pipeline.config.check``) derives the known keys and their types from these
classes rather than from a table kept by hand. This is the lowest layer: it imports nothing of
ours but the model config.

The learning rate is given for a reference global batch (``lr_reference_batch``) and scaled
linearly with the real one (Goyal et al.), so changing the number of workers or the batch per
worker keeps the recipe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

SCHEDULES = ("multistep", "cosine")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
INITS = ("none", "imagenet", "coco", "registry")
SELECTS = ("best", "last")
DEFAULT_STEPS = 1000  # the run length when neither train.steps nor train.epochs is set
# What init: registry takes: models:/<name>@<alias> or models:/<name>/<version>.
REGISTRY_URI = re.compile(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
IMAGE_FORMATS = ("jpeg", "png")
AUTO = "auto"
LOCAL = "local"  # evaluate.concurrency: on this machine, without Ray

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
        "epochs",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "storage_path",
        "log_every",
    }
)

_S = TypeVar("_S", bound="Section")


class Section:
    """What the settings classes share: built from their params.yaml section (``SECTION``),
    checked when constructed, handed on as a plain dict (keyword arguments, JSON, MLflow)."""

    SECTION: ClassVar[str]

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        """The keys without a default: a params file must set them."""
        return tuple(
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        )

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any] | None) -> _S:
        """Build from a params.yaml section (lists become tuples); unknown or missing keys are
        a ValueError naming them."""
        data = dict(data or {})
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} settings: {unknown} (known: {known})")
        missing = [key for key in cls.required_keys() if key not in data]
        if missing:
            keys = ", ".join(f"{cls.SECTION}.{key}" for key in missing)
            raise ValueError(f"{keys} must be set")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{self.SECTION} settings: {message}")

    def _choice(self, name: str, value: str, allowed: tuple[str, ...]) -> None:
        self._require(value in allowed, f"{name} must be one of {allowed}, got {value!r}")

    def _fraction(self, *names: str) -> None:
        for name in names:
            self._require(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")

    def _at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) >= minimum, f"{name} must be >= {minimum}")

    def _count_or(self, name: str, *words: str) -> None:
        """``name`` is an integer >= 1 or one of ``words``."""
        value = getattr(self, name)
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        allowed = ", ".join(["an integer >= 1", *(f'"{w}"' for w in words[:-1])])
        message = f'{name} must be {allowed} or "{words[-1]}", got {value!r}'
        self._require(count or value in words, message)


@dataclass(frozen=True, kw_only=True)
class DataSettings(Section):
    """Where the data and the outputs live (``data:``). Every path is required: dvc.yaml's
    templating reads them all."""

    SECTION: ClassVar[str] = "data"

    shapes_dir: str
    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str
    shards_dir: str
    artifacts_dir: str


@dataclass(frozen=True, kw_only=True)
class ShapesSettings(Section):
    """The built-in synthetic dataset (``shapes:``), for ``write_shapes_dataset``."""

    SECTION: ClassVar[str] = "shapes"

    n_train: int = 400
    n_val: int = 80
    seed: int = 0
    min_side: int = 160
    max_side: int = 320
    max_instances: int = 6
    empty_fraction: float = 0.06
    crowd_fraction: float = 0.1
    jpeg_quality: int = 90
    object_scale: tuple[float, float] = (0.18, 0.42)  # shape size / shorter side of the image
    class_weights: dict[str, float] | None = None  # relative kind frequencies in train, by name

    def __post_init__(self) -> None:
        self._at_least(1, "n_train", "n_val", "max_instances", "jpeg_quality")
        self._require(
            16 <= self.min_side <= self.max_side,
            f"need 16 <= min_side <= max_side, got {self.min_side} and {self.max_side}",
        )
        self._fraction("empty_fraction", "crowd_fraction")
        self._require(self.jpeg_quality <= 100, "jpeg_quality must be in 1..100")
        scale, weights = list(self.object_scale), self.class_weights or {}
        self._require(0 < scale[0] <= scale[1] <= 0.75, f"object_scale {scale} not in (0, 0.75]")
        self._require(min(weights.values(), default=0) >= 0, f"class_weights < 0: {weights}")


@dataclass(frozen=True, kw_only=True)
class PreprocessSettings(Section):
    """How shards are written (``preprocess:``), for ``preprocess_split``."""

    SECTION: ClassVar[str] = "preprocess"

    image_format: str = "jpeg"
    jpeg_quality: int = 95
    rows_per_shard: int = 256
    progress: bool = True
    # Multi-scale training: the train split stores RPN targets for each factor (docs/training.md).
    train_scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        self._choice("image_format", self.image_format, IMAGE_FORMATS)
        self._require(1 <= self.jpeg_quality <= 100, "jpeg_quality must be in 1..100")
        self._at_least(1, "rows_per_shard")
        scales = self.train_scales
        distinct = len(scales) >= 1 and len(set(scales)) == len(scales)
        self._require(
            distinct and all(0 < r <= 1 for r in scales),
            f"train_scales must be distinct factors in (0, 1], got {list(scales)}",
        )


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings(Section):
    """Batch inference and scoring (``evaluate:``), for ``evaluate``. ``concurrency``: the
    number of inference actors, "local" (on this machine, no Ray), or "auto" (local on one
    machine with at most one GPU, else a pool sized to the cluster); ``processes``: local
    inference's processes on CPUs ("auto": one per core); ``amp``: autocast of inference on
    GPUs (as ``train.amp``)."""

    SECTION: ClassVar[str] = "evaluate"

    batch_size: int = 4
    score_threshold: float = 0.0
    num_overlays: int = 8
    overlay_score_threshold: float = 0.5
    concurrency: int | str = AUTO
    processes: int | str = AUTO
    amp: str = "none"

    def __post_init__(self) -> None:
        self._choice("amp", self.amp, AMP_MODES)
        self._at_least(1, "batch_size")
        self._at_least(0, "num_overlays")
        self._fraction("score_threshold", "overlay_score_threshold")
        self._count_or("concurrency", AUTO, LOCAL)
        self._count_or("processes", AUTO)


@dataclass(frozen=True, kw_only=True)
class RegisterSettings(Section):
    """Registration and the champion gate (``register:``), for ``register``. ``tracking_uri``
    None: the training run's store (run.json); ``onnx``: store model.onnx with the version."""

    SECTION: ClassVar[str] = "register"

    model_name: str
    min_segm_ap: float
    tracking_uri: str | None = None
    onnx: bool = True

    def __post_init__(self) -> None:
        self._require(bool(self.model_name), "model_name must be a non-empty name")
        self._fraction("min_segm_ap")


@dataclass(frozen=True, kw_only=True)
class TrackingSettings(Section):
    """Where MLflow runs go (``tracking:``). ``uri`` None means the project's SQLite file."""

    SECTION: ClassVar[str] = "tracking"

    uri: str | None = None
    experiment: str = "maskrcnn"

    def __post_init__(self) -> None:
        self._require(bool(self.experiment), "experiment must be a non-empty name")


@dataclass(frozen=True, kw_only=True)
class RaySettings(Section):
    """Which Ray runtime the stages use (``ray:``): None starts a local one; "auto" or
    ``host:port`` joins a cluster."""

    SECTION: ClassVar[str] = "ray"

    address: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainSettings(Section):
    """How to train: resources, optimisation recipe, checkpoints and logging."""

    SECTION: ClassVar[str] = "train"

    # resources
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: the trainer shares a local Ray's CPUs out
    placement_strategy: str = "PACK"
    batch_per_worker: int = 2
    prefetch_batches: int | None = None  # Ray Data's look-ahead; None = 1 on CPU, 2 on GPU
    # optimisation
    optimizer: str = "sgd"  # adamw: betas (0.9, 0.999); momentum is SGD's only
    steps: int | None = None  # exactly one of steps and epochs (neither: DEFAULT_STEPS)
    epochs: int | None = None  # steps = epochs * ceil(train images / global batch)
    base_lr: float = 0.02
    lr_reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    warmup_epochs: float | None = None  # replaces warmup_steps when set
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    milestones_epochs: tuple[float, ...] = ()  # instead of milestones
    gamma: float = 0.1
    grad_clip: float = 0.0
    grad_accum: int = 1
    amp: str = "none"
    flip_prob: float = 0.5
    repeat_factor_threshold: float = 0.0  # LVIS repeat-factor sampling; 0 = off
    init: str = "none"
    weights_path: str | None = None
    ema_decay: float = 0.0  # EMA of the weights; 0 = off (pipeline.training.ema)
    # evaluation during training and the model written (pipeline.training.periodic_eval)
    eval_every: int = 0  # steps; 0 = off
    eval_images: int | None = None  # val images per evaluation; None = all
    select: str = "last"  # best (highest eval segm AP) or last
    patience: int = 0  # evaluations without improvement before stopping; 0 = off
    # fault tolerance
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 2  # restarts after a worker failure, or a worker group start time-out
    storage_path: str = "ray_results"
    run_name: str = "maskrcnn"
    # logging
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("cpus_per_worker", "prefetch_batches"):  # null: decided at run time
            value = getattr(self, name)
            self._require(value is None or value > 0, f"{name} must be > 0 or null")
        self._choice("placement_strategy", self.placement_strategy, PLACEMENTS)
        self._check_length()
        self._check_selection()
        self._at_least(1, "num_workers", "batch_per_worker", "lr_reference_batch", "grad_accum")
        self._at_least(1, "checkpoint_every", "keep_checkpoints", "log_every")
        self._choice("optimizer", self.optimizer, OPTIMIZERS)
        self._require(self.base_lr > 0, "base_lr must be > 0")
        self._require(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        self._require(self.weight_decay >= 0, "weight_decay must be >= 0")
        self._require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        self._require(0 < self.warmup_factor <= 1, "warmup_factor must be in (0, 1]")
        self._choice("schedule", self.schedule, SCHEDULES)
        self._require(0 < self.gamma <= 1, "gamma must be in (0, 1]")
        self._require(
            all(0 < m < (self.steps or math.inf) for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones)),
            f"milestones must be strictly increasing steps in (0, steps={self.steps}), "
            f"got {list(self.milestones)}",
        )
        self._require(
            all(0 < m < (self.epochs or math.inf) for m in self.milestones_epochs)
            and list(self.milestones_epochs) == sorted(set(self.milestones_epochs)),
            f"milestones_epochs must be strictly increasing epochs in (0, epochs={self.epochs}),"
            f" got {list(self.milestones_epochs)}",
        )
        self._require(
            not (self.milestones and self.milestones_epochs),
            "set milestones (steps) or milestones_epochs, not both",
        )
        self._require(
            self.warmup_epochs is None or self.warmup_epochs >= 0, "warmup_epochs must be >= 0"
        )
        self._require(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0 turns EMA off)")
        self._require(self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)")
        self._choice("amp", self.amp, AMP_MODES)
        self._require(
            self.amp != "fp16" or self.use_gpu,
            "amp: fp16 needs use_gpu: true (CPU autocast supports bf16 only)",
        )
        self._fraction("flip_prob", "repeat_factor_threshold")
        self._choice("init", self.init, INITS)
        self._require(
            self.init in ("none", "registry") or bool(self.weights_path),
            f"init: {self.init} needs weights_path (a local file; nothing is downloaded)",
        )
        self._require(
            self.init != "registry" or bool(REGISTRY_URI.fullmatch(self.weights_path or "")),
            "init: registry needs weights_path models:/<name>@<alias> or models:/<name>/<n>, "
            f"got {self.weights_path!r}",
        )
        self._require(
            self.init == "registry" or not str(self.weights_path or "").startswith("models:/"),
            f"weights_path {self.weights_path!r} is a registered model: set init: registry",
        )
        self._require(self.max_failures >= -1, "max_failures must be >= 0, or -1 for unlimited")
        self._require(bool(self.storage_path), "storage_path must not be empty")
        self._require(
            bool(self.run_name) and "/" not in self.run_name,
            f"run_name must be a non-empty name without '/', got {self.run_name!r}",
        )

    def _check_length(self) -> None:
        """Exactly one of steps and epochs; neither is the default length in steps."""
        self._require(
            self.steps is None or self.epochs is None,
            f"set exactly one of train.steps and train.epochs, got steps={self.steps} and "
            f"epochs={self.epochs}",
        )
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)  # frozen: set once, here
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            self._require(value is None or value >= 1, f"{name} must be >= 1")

    def _check_selection(self) -> None:
        self._at_least(0, "eval_every", "patience")
        self._require(self.eval_images is None or self.eval_images >= 1, "eval_images must be >= 1")
        self._choice("select", self.select, SELECTS)
        needs_eval = [k for k, on in (("select: best", self.select == "best"),
                                      ("patience", self.patience > 0)) if on]  # fmt: skip
        self._require(
            self.eval_every > 0 or not needs_eval,
            f"{' and '.join(needs_eval)} need evaluations during training: set train.eval_every",
        )

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all workers and accumulated micro-batches."""
        return self.batch_per_worker * self.num_workers * self.grad_accum

    @property
    def lr(self) -> float:
        """Peak learning rate: ``base_lr`` scaled linearly from the reference batch."""
        return self.base_lr * self.global_batch / self.lr_reference_batch
