"""Inference on this machine: forked processes on CPUs give this process's results, and a
worker's failure reaches the caller as an error that says what happened."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from pipeline.config.errors import UserError
from pipeline.evaluation.inference import local_detections, local_processes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Echo:
    """A predictor stand-in: each row's results name the process that made them."""

    def __init__(self, fail: str = ""):
        self.fail = fail

    def detect(self, rows):
        if self.fail == "raise" and any(r["i"] == 5 for r in rows):
            raise ValueError("row 5: not an image")
        if self.fail == "die" and any(r["i"] == 5 for r in rows):
            os._exit(3)  # as the OOM killer would end it: no exception, no message
        return [
            [{"i": r["i"], "pid": os.getpid(), "threads": torch.get_num_threads()}] for r in rows
        ]


def _batches(count, size):
    return [
        [{"i": i} for i in range(start, min(start + size, count))]
        for start in range(0, count, size)
    ]


def test_forked_workers_return_every_batch_in_order_with_one_thread_each():
    with local_detections(Echo(), 2) as detect:
        out = list(detect(_batches(23, 3)))
    assert [r["i"] for rows, _ in out for r in rows] == list(range(23))
    results = [result for _, detected in out for [result] in detected]
    assert [r["i"] for r in results] == list(range(23))
    assert os.getpid() not in {r["pid"] for r in results}
    assert {r["threads"] for r in results} == {1}


def test_one_process_detects_here():
    with local_detections(Echo(), 1) as detect:
        out = list(detect(_batches(4, 3)))
    assert {result["pid"] for _, detected in out for [result] in detected} == {os.getpid()}


def test_a_workers_error_reaches_the_caller_as_raised():
    with (
        pytest.raises(ValueError, match="row 5: not an image"),
        local_detections(Echo("raise"), 2) as detect,
    ):
        list(detect(_batches(12, 2)))


def test_a_worker_that_dies_is_a_user_error_naming_the_setting():
    with (
        pytest.raises(UserError, match="stopped abruptly.*evaluate.processes"),
        local_detections(Echo("die"), 2) as detect,
    ):
        list(detect(_batches(12, 2)))


def test_auto_is_one_process_per_core_on_cpu_and_this_one_on_a_gpu(caplog):
    cores = len(os.sched_getaffinity(0))
    assert local_processes("auto", CPU) == cores
    assert local_processes(3, CPU) == 3
    assert local_processes("auto", CUDA) == 1
    with caplog.at_level(logging.WARNING):
        assert local_processes(4, CUDA) == 1
    assert "evaluate.processes 4 ignored" in caplog.text
