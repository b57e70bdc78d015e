"""The names of the files each stage writes, defined once.

The code that writes an output and the stages that read it take the name from here; dvc.yaml
keeps its own copy (it cannot import Python), and tests/test_outputs.py checks that the two
agree. Each stage writes into ``<data.artifacts_dir>/<directory>``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.config.errors import UserError


@dataclass(frozen=True)
class _Outputs:
    directory: str

    def names(self) -> dict[str, str]:
        """Output -> file name, the directory left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "directory"}

    def under(self, artifacts_dir: str | Path) -> Path:
        return Path(artifacts_dir) / self.directory

    def find(self, directory: str | Path, name: str) -> Path:
        """``directory/name``, written by this stage; a UserError saying which stage to run
        when it is not there."""
        path = Path(directory) / name
        if not path.exists():
            raise UserError(
                f"{path} not found: run the {self.directory} stage first "
                f"(`dvc repro {self.directory}`), or point to its output directory"
            )
        return path


@dataclass(frozen=True)
class TrainOutputs(_Outputs):
    model: str = "model.pt"  # maskrcnn.checkpoints.save_model
    run: str = "run.json"  # the MLflow run (pipeline.registry.tracking.RunRef)
    metrics: str = "metrics.json"
    loss: str = "loss.csv"  # one row per step, for `dvc plots`


@dataclass(frozen=True)
class EvaluateOutputs(_Outputs):
    metrics: str = "metrics.json"
    predictions: str = "predictions.json"  # COCO results
    pr_curve: str = "pr_curve.csv"
    overlays: str = "overlays"  # a directory of PNGs


@dataclass(frozen=True)
class RegisterOutputs(_Outputs):
    decision: str = "decision.json"


TRAIN = TrainOutputs(directory="train")
EVALUATE = EvaluateOutputs(directory="evaluate")
REGISTER = RegisterOutputs(directory="register")
STAGES = {"train": TRAIN, "evaluate": EVALUATE, "register": REGISTER}
