"""What preprocess, a training and evaluate print, to a pipe (CI, a log file) and to a
terminal. To a pipe: the periodic progress lines of each, none of Ray Data's per-execution
lines, and a worker killed by a fault drill summarised in a few lines. To a terminal: one bar
each, and no per-step line (it goes to Ray Train's worker log file). What the logs promise:
docs/training.md, "Logs and progress".

This file's ``main`` runs in a subprocess, stdout and stderr a pipe or a pseudo-terminal, with
the tiny model of tests/pipeline/test_training.py, four train and two val images, a handful of
steps and a local Ray of its own (one per run: what is checked is the driver's console).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from maskrcnn.config import ModelConfig, RoIConfig, RPNConfig
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import setup_logging
from pipeline.config.settings import TrackingSettings, TrainSettings
from pipeline.evaluation.evaluate import evaluate
from pipeline.io import console
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest
from pipeline.training.faults import FAULT_ENV
from pipeline.training.trainer import train

pytestmark = pytest.mark.e2e

STEPS, FAULT_STEP = 4, 3
RAY_DATA_LINES = ("Starting execution of Dataset", "Execution plan of Dataset")
TIMEOUT_S = 600


def main(root: Path) -> None:
    """Preprocess four train images (one per shard) and two val images, train the tiny model
    for ``STEPS`` steps and evaluate it, in ``root``; print the Ray session directory."""
    setup_logging()
    console.LINE_EVERY_S = 0  # a plain line at each update: each shard, each val image
    data, shards = root / "shapes", root / "shards"
    write_shapes_dataset(data, n_train=4, n_val=2, seed=0, min_side=48, max_side=64)
    config = ModelConfig(
        num_classes=2,
        backbone="resnet18",
        canvas=64,
        fpn_channels=32,
        rpn=RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100),
        roi=RoIConfig(representation_size=64, mask_layers=(32,), batch_size_per_image=64),
    )
    for split in ("train", "val"):
        preprocess_split(
            annotation_file=data / "annotations" / f"instances_{split}.json",
            images_dir=data / "images" / split,
            out_dir=shards / split,
            model_config=config,
            rows_per_shard=1,
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
    trained = train(
        settings=settings,
        model_config=replace(config, num_classes=classes),
        shards_dir=shards,
        tracking=TrackingSettings(experiment="logs"),
        out_dir=root / "out",
        project_root=root,
    )
    evaluate(
        model_path=trained.model_path,
        shards_dir=shards / "val",
        annotation_file=data / "annotations" / "instances_val.json",
        images_dir=data / "images" / "val",
        out_dir=root / "eval",
        num_overlays=0,
        concurrency=1,
    )
    print(f"ray session: {ray._private.worker._global_node.get_session_dir_path()}")


def run_to_a_pipe(root: Path, **env: str) -> str:
    """stdout and stderr of ``main`` in a subprocess whose stdout is a pipe, not a terminal."""
    done = subprocess.run(
        [sys.executable, __file__, str(root)],
        env={**os.environ, "RAY_DEDUP_LOGS": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def run_in_a_terminal(root: Path) -> str:
    """What ``main`` writes on a pseudo-terminal of 120 x 40 (its stdout and stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, __file__, str(root)],
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: nothing holds the terminal open any more
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:  # exited, and nothing more to read
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        os.close(master)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, output
    return output


if __name__ == "__main__":
    main(Path(sys.argv[1]))


def test_output_without_a_terminal(tmp_path: Path) -> None:
    """Progress lines of preprocess, every step and evaluate, no bar, no Ray Data execution
    lines, and the killed worker in a few lines (rank, node, why, the step it resumes from),
    with Ray's full text in the run dir."""
    marker = tmp_path / "drill"
    output = run_to_a_pipe(tmp_path, **{FAULT_ENV: f"step={FAULT_STEP},rank=0,marker={marker}"})
    rate = r"[\d.]+ img/s, ETA \d:\d\d:\d\d"
    for done in range(1, 5):  # one line per shard of one image
        line = rf"preprocess train: {done}/4 images \({done * 25}%\), {rate}"
        assert re.search(line, output), output
    for done in (1, 2):
        line = rf"evaluate val: {done}/2 images \({done * 50}%\), {rate}"
        assert re.search(line, output), output
    assert "\r" not in output, output  # no bar
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


def test_output_on_a_terminal(tmp_path: Path) -> None:
    """One bar each for preprocess, training (step, loss, img/s, ETA) and evaluate, none of
    Ray Data's; the per-step line not on the console but in Ray Train's worker log file."""
    output = run_in_a_terminal(tmp_path)
    assert re.search(r"preprocess train: 100%\|[^|\n]+\| 4/4 images \[", output), output
    bar = rf"step {STEPS}/{STEPS} \|[^|\n]+\| \d\d:\d\d, loss [\d.]+, [\d.]+ img/s, ETA 0:00:00"
    assert re.search(bar, output), output
    assert re.search(r"evaluate val: 100%\|[^|\n]+\| 2/2 images \[", output), output
    assert not re.search(r"step \d+/\d+ \| loss", output), output  # the per-step line
    assert "images (" not in output, output  # nor the plain lines of preprocess and evaluate
    assert "Running Dataset" not in output, output  # Ray Data's bar
    session = Path(re.search(r"ray session: (\S+)", output)[1])
    worker_logs = "".join(p.read_text() for p in session.glob("logs/train/*app-worker*.log"))
    assert f"step {STEPS}/{STEPS} | loss " in worker_logs
