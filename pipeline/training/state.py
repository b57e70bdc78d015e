"""What a training checkpoint holds, and how a worker writes and restores it.

A checkpoint directory (one per reported step, merged by Ray from every rank) holds:

- ``model_state.pt``: the model's state dict (rank 0);
- ``train_state.pt``: optimizer, scheduler, grad scaler and :class:`Progress` (rank 0);
- ``rng_rank<r>.pt``: the Python, NumPy and torch RNG states of rank ``r`` (every rank), with
  the generator of that rank's own GPU only.

DDP keeps the model and optimizer identical on every rank, so rank 0's copy restores all of
them; the random streams differ per rank, so each rank keeps its own. A rank saves and restores
only its own device's generator: Ray Train shows every worker of a node all of that node's GPUs,
and a restarted worker group may see fewer of them than the one that saved.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CPU = torch.device("cpu")
MODEL_FILE = "model_state.pt"
STATE_FILE = "train_state.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


@dataclass(kw_only=True)
class Progress:
    """Where training stands: optimizer steps done, the data position, and the loss curve.

    ``batch_in_epoch`` counts the batches this rank has consumed in ``epoch``; a resumed run
    skips that many batches of the epoch's stream (the stream's order is Ray Data's, so the
    skipped batches are the same ones only when the order is deterministic: best effort).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # evaluation during training (pipeline.training.periodic_eval): rank 0's
    evals: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -1.0  # no evaluation yet
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False  # train.patience ran out: a resumed run does not go on

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(**data)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stream_seed(*keys: int) -> int:
    """A 32-bit seed for one random stream, e.g. ``(seed, rank, step)``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def state_digest(model: nn.Module) -> str:
    """sha256 of the model's state dict: equal digests mean bitwise equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def capture_rng(device: torch.device = CPU) -> dict[str, Any]:
    """The host RNG states, and the generator state of ``device`` when it is a GPU."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def device_rng_state(saved: Any, device: torch.device) -> torch.Tensor | None:
    """This device's generator state out of a saved ``cuda`` entry: the one state this module
    writes, or an older checkpoint's list of every visible GPU's state, of which only the entry
    of this device's index is used (None when the list has no such entry, or on CPU)."""
    if device.type != "cuda" or saved is None:
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    index = device.index or 0
    return saved[index] if index < len(saved) else None


def restore_rng(state: dict[str, Any], device: torch.device = CPU) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = device_rng_state(state.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def write_checkpoint(
    directory: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    device: torch.device = CPU,
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (``model`` unwrapped);
    ``device`` is the rank's own device, whose generator state goes with the RNG states."""
    directory = Path(directory)
    if rank == 0:
        torch.save(model.state_dict(), directory / MODEL_FILE)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": asdict(progress),
            },
            directory / STATE_FILE,
        )
    torch.save(capture_rng(device), directory / rng_file(rank))


def read_checkpoint(
    directory: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device = CPU,
) -> Progress:
    """Restore everything ``write_checkpoint`` saved; return where training stands.

    A rank without its own RNG file (the run was resumed with more workers) keeps the
    random state it was seeded with; so does ``device``'s generator when the file has no
    state for it (see :func:`device_rng_state`).
    """
    directory = Path(directory)
    for name in (MODEL_FILE, STATE_FILE):
        if not (directory / name).exists():
            raise ValueError(f"checkpoint {directory} has no {name}: not a training checkpoint")
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu"))
    # Our own files, holding Python and NumPy RNG tuples: not loadable with weights_only.
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng_path = directory / rng_file(rank)
    if rng_path.exists():
        restore_rng(torch.load(rng_path, map_location="cpu", weights_only=False), device)
    return Progress.from_dict(state["progress"])


def read_progress(directory: Path) -> Progress:
    """Only the progress of a checkpoint (for the driver)."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    return Progress.from_dict(state["progress"])
