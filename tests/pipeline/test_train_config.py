"""TrainSettings: learning-rate scaling, params round trip, clear errors on bad values, and the
warning about settings that are slow on this machine."""

import logging

import pytest

from pipeline.config.settings import TrainSettings
from pipeline.training.trainer import _warn_about_slow_settings


def test_lr_scales_linearly_with_the_global_batch():
    base = TrainSettings(base_lr=0.02, lr_reference_batch=16, batch_per_worker=2)
    assert base.global_batch == 2
    assert base.lr == pytest.approx(0.02 * 2 / 16)
    wide = TrainSettings(base_lr=0.02, lr_reference_batch=16, batch_per_worker=2,
                         num_workers=4, grad_accum=2)  # fmt: skip
    assert wide.global_batch == 16
    assert wide.lr == pytest.approx(0.02)


def test_round_trips_through_a_params_dict():
    settings = TrainSettings(steps=50, milestones=(20, 40), schedule="multistep", amp="bf16")
    data = settings.to_dict()
    data["milestones"] = list(data["milestones"])  # as YAML gives it
    assert TrainSettings.from_dict(data) == settings


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="stepz"):
        TrainSettings.from_dict({"stepz": 10})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"schedule": "linear"}, "schedule"),
        ({"milestones": (50, 20)}, "milestones"),
        ({"steps": 10, "milestones": (10,)}, "milestones"),
        ({"amp": "fp16"}, "fp16 needs use_gpu"),
        ({"amp": "fp8"}, "amp"),
        ({"init": "coco"}, "weights_path"),
        ({"init": "random"}, "init"),
        ({"warmup_factor": 0.0}, "warmup_factor"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"run_name": "a/b"}, "run_name"),
        ({"placement_strategy": "ANYWHERE"}, "placement_strategy"),
        ({"optimizer": "adam"}, "optimizer"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kwargs)


def test_fp16_is_accepted_on_gpu():
    assert TrainSettings(amp="fp16", use_gpu=True).amp == "fp16"


@pytest.mark.parametrize(
    ("amp", "cpu_has_bf16", "warned"),
    [("bf16", False, True), ("bf16", True, False), ("none", False, False)],
)
def test_bf16_on_cpu_is_warned_about_only_without_bf16_instructions(
    caplog, amp, cpu_has_bf16, warned
):
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        _warn_about_slow_settings(TrainSettings(amp=amp), cpu_has_bf16=cpu_has_bf16)
    assert ("without bf16 instructions" in caplog.text) is warned
