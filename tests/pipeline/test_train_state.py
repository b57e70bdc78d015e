"""Checkpoint contents, RNG streams, the progress bookkeeping and the metrics sender, without
Ray."""

import io
import logging
import random
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.io.console import format_duration
from pipeline.training.metrics_sender import MetricsSender
from pipeline.training.progress import LOSS_NAMES, LossWindow, ThroughputMeter, progress_line
from pipeline.training.progress_bar import log_to_files
from pipeline.training.state import (
    Progress,
    device_rng_state,
    read_checkpoint,
    read_progress,
    seed_everything,
    state_digest,
    stream_seed,
    write_checkpoint,
)


def parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler


def test_checkpoint_round_trip_restores_training_exactly(tmp_path):
    model, optimizer, scheduler, scaler = parts(seed=0)
    for _ in range(3):
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    progress = Progress(step=3, epoch=1, batch_in_epoch=2, history=[{"step": 3, "loss": 1.5}])
    seed_everything(7)
    for rank in (0, 1):
        write_checkpoint(
            tmp_path,
            rank=rank,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            progress=progress,
        )
    expected = (random.random(), np.random.rand(), torch.rand(1))  # the draws after the save

    other = parts(seed=1)
    assert state_digest(other[0]) != state_digest(model)
    seed_everything(99)
    restored = read_checkpoint(
        tmp_path, rank=1, model=other[0], optimizer=other[1], scheduler=other[2], scaler=other[3]
    )
    assert restored == progress == read_progress(tmp_path)
    assert state_digest(other[0]) == state_digest(model)
    assert other[2].last_epoch == 3
    assert other[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    momentum = next(iter(optimizer.state.values()))["momentum_buffer"]
    assert torch.equal(next(iter(other[1].state.values()))["momentum_buffer"], momentum)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_directory_without_a_checkpoint_is_refused(tmp_path):
    model, optimizer, scheduler, scaler = parts(seed=0)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        read_checkpoint(
            tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
        )


def test_stream_seeds_differ_by_rank_and_step():
    seeds = {stream_seed(0, rank, step) for rank in range(4) for step in range(4)}
    assert len(seeds) == 16
    assert stream_seed(0, 1, 2) == stream_seed(0, 1, 2)


def test_loss_window_averages_over_steps():
    window = LossWindow(torch.device("cpu"))
    for scale in (1.0, 3.0):
        window.add({name: torch.tensor(scale * (i + 1)) for i, name in enumerate(LOSS_NAMES)})
    means = window.reduce(world=1)
    assert means["loss_objectness"] == pytest.approx(2.0)
    assert means["loss_mask"] == pytest.approx(10.0)
    assert means["loss"] == pytest.approx(2.0 * 15)
    window.add({name: torch.tensor(1.0) for name in LOSS_NAMES})
    assert window.reduce(world=1)["loss"] == pytest.approx(5.0)  # a new window


def test_evaluation_time_counts_in_neither_the_rate_nor_the_training_seconds():
    meter = ThroughputMeter()
    meter.add(images=8, wait_s=0.0)
    time.sleep(0.05)
    with meter.paused():  # an evaluation during training
        time.sleep(0.5)
    rate, _ = meter.window()
    overall = meter.overall()
    assert 0.05 <= overall["train_s"] < 0.3, overall
    assert rate > 8 / 0.3 and overall["images_per_s"] > 8 / 0.3, (rate, overall)
    meter.add(images=8, wait_s=0.0)
    time.sleep(0.05)
    rate, _ = meter.window()  # a new window: the pause is not subtracted again
    assert 8 / 0.3 < rate <= 8 / 0.05, rate


def test_progress_line_reads_well():
    losses = {"loss": 1.5, **{name: 0.3 for name in LOSS_NAMES}}
    line = progress_line(
        step=40, steps=100, losses=losses, lr=0.002, images_per_s=8.06, data_wait=0.031, eta_s=3725
    )
    assert line == (
        "step 40/100 | loss 1.500 (obj 0.300 rpn_box 0.300 cls 0.300 box 0.300 mask 0.300) | "
        "lr 2.00e-03 | 8.1 img/s | data wait 3% | ETA 1:02:05"
    )
    assert format_duration(59.6) == "0:01:00"


def test_with_a_bar_the_progress_line_goes_to_the_log_files_only(tmp_path):
    """Rank 0 under the driver's bar: its line in the worker log file, not on the console."""
    root = logging.getLogger()
    to_file, to_console = (
        logging.FileHandler(tmp_path / "worker.log"),
        logging.StreamHandler(io.StringIO()),
    )
    root.addHandler(to_file)
    root.addHandler(to_console)
    try:
        log_to_files("step 1/2 | loss 1.000")
    finally:
        root.removeHandler(to_file)
        root.removeHandler(to_console)
        to_file.close()
    assert (tmp_path / "worker.log").read_text() == "step 1/2 | loss 1.000\n"
    assert to_console.stream.getvalue() == ""


def test_a_checkpoint_with_more_gpu_states_than_this_process_has_resumes(tmp_path):
    """Each rank keeps its own GPU's generator only; an older checkpoint that holds every GPU
    of its node (8 here, from ``get_rng_state_all``) restores on a process that has fewer
    (none here: the CPU) instead of raising IndexError in ``set_rng_state_all``."""
    model, optimizer, scheduler, scaler = parts(seed=0)
    progress = Progress(step=2)
    for rank in (0, 1):
        write_checkpoint(
            tmp_path,
            rank=rank,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            progress=progress,
        )
    saved = torch.load(tmp_path / "rng_rank1.pt", weights_only=False)
    assert "cuda" not in saved  # a CPU rank saves no GPU state
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    torch.save({**saved, "cuda": gpu_states}, tmp_path / "rng_rank1.pt")
    torch.set_rng_state(saved["torch"])
    expected = torch.rand(1)  # the first draw after the save
    torch.rand(5)  # the restore must bring the host stream back
    restored = read_checkpoint(
        tmp_path, rank=1, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )
    assert restored == progress
    torch.testing.assert_close(torch.rand(1), expected)


def test_each_gpu_rank_takes_only_its_own_device_state():
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(device_rng_state(states, torch.device("cuda", 3)), states[3])
    assert device_rng_state(states[:2], torch.device("cuda", 5)) is None  # fewer GPUs now
    assert device_rng_state(states[6], torch.device("cuda", 0)) is states[6]  # one state
    assert device_rng_state(states, torch.device("cpu")) is None
    assert device_rng_state(None, torch.device("cuda", 0)) is None


def test_metrics_wait_while_the_tracking_server_is_away_and_go_in_order():
    away = threading.Event()
    away.set()
    sent: list[tuple[int, int]] = []

    def send(metrics, step, timestamp_ms):
        if away.is_set():
            raise ConnectionError("connection refused")
        sent.append((step, timestamp_ms))

    sender = MetricsSender(send, retry_s=0.05, close_timeout_s=5)
    for step in (1, 2, 3):
        sender.put({"loss": 1.0}, step)
    time.sleep(0.3)
    assert sent == [] and sender.failures >= 2  # retried, never dropped
    away.clear()
    sender.put({"loss": 0.5}, 4)
    assert sender.close() == 0
    assert [step for step, _ in sent] == [1, 2, 3, 4]
    assert sender.late >= 3
    first = sent[0][1]
    assert first <= sent[-1][1] and time.time() * 1000 - first >= 250  # the time it was queued


def test_metrics_never_sent_are_counted_when_training_ends(caplog):
    def send(metrics, step, timestamp_ms):
        raise OSError("no route to host")

    sender = MetricsSender(send, retry_s=0.05, close_timeout_s=0.3)
    sender.put({"loss": 1.0}, 7)
    sender.put({"loss": 1.0}, 8)
    assert sender.close() == 2
    assert "2 metric rows (steps 7-8) were not logged" in caplog.text
