"""What a training prints when stdout is not a terminal (CI, a log file): the periodic progress
lines, none of Ray Data's per-execution lines, and a worker killed by a fault drill summarised
in a few lines. What the logs promise: docs/training.md, "Logs and progress".

The training runs in a subprocess (this file's ``main``), stdout a pipe, with the tiny model of
tests/pipeline/test_training.py, four images, a handful of steps and a local Ray of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import setup_logging
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.faults import FAULT_ENV
from pipeline.training.trainer import train

pytestmark = pytest.mark.e2e

STEPS, FAULT_STEP = 4, 3
RAY_DATA_LINES = ("Starting execution of Dataset", "Execution plan of Dataset")


def main(root: Path) -> None:
    """Preprocess four images and train the tiny model for ``STEPS`` steps in ``root``."""
    setup_logging()
    data, shards = root / "shapes", root / "shards"
    write_shapes_dataset(data, n_train=4, n_val=1, seed=0, min_side=48, max_side=64)
    config = ModelConfig(
        num_classes=2,
        backbone="resnet18",
        canvas=64,
        fpn_channels=32,
        rpn=RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100),
        roi=RoIConfig(representation_size=64, mask_layers=(32,), batch_size_per_image=64),
    )
    preprocess_split(
        annotation_file=data / "annotations" / "instances_train.json",
        images_dir=data / "images" / "train",
        out_dir=shards / "train",
        model_config=config,
    )
    classes = len(read_manifest(shards / "train")["categories"]) + 1
    settings = TrainSettings(
        num_workers=1,
        cpus_per_worker=1,
        batch_per_worker=2,
        steps=STEPS,
        warmup_steps=0,
        checkpoint_every=2,
        max_failures=1,
        log_every=1,
        storage_path=str(root / "ray"),
        run_name="logs",
    )
    train(
        settings=settings,
        model_config=replace(config, num_classes=classes),
        shards_dir=shards,
        tracking=TrackingSettings(experiment="logs"),
        out_dir=root / "out",
        project_root=root,
    )


def run_training(root: Path, **env: str) -> str:
    """stdout and stderr of ``main`` in a subprocess whose stdout is a pipe, not a terminal."""
    done = subprocess.run(
        [sys.executable, __file__, str(root)],
        env={**os.environ, "RAY_DEDUP_LOGS": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


if __name__ == "__main__":
    main(Path(sys.argv[1]))


def test_training_output_without_a_terminal(tmp_path: Path) -> None:
    """Progress lines every step, no Ray Data execution lines, and the killed worker in a few
    lines (rank, node, why, the step it resumes from), with Ray's full text in the run dir."""
    marker = tmp_path / "drill"
    output = run_training(tmp_path, **{FAULT_ENV: f"step={FAULT_STEP},rank=0,marker={marker}"})
    for step in range(1, STEPS + 1):
        assert f"step {step}/{STEPS} | loss " in output, output
    for line in RAY_DATA_LINES:
        assert line not in output, output
    assert "Reporting training result" not in output, output  # Ray Train's per-rank reports
    assert "[FailurePolicy]" not in output, output
    assert re.search(r"worker failure 1 \(train.max_failures=1\): rank 0 on node \S+", output)
    assert "the worker process died" in output, output
    assert "resuming from step 2" in output, output
    (log_file,) = (tmp_path / "ray").glob("logs-*/failures.log")
    assert "ActorDiedError" in log_file.read_text() or "actor died" in log_file.read_text()
    assert str(log_file) in output, output
