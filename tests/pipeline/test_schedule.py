"""The learning-rate schedule: warmup, step decay, cosine, and what the optimizer sees."""

import math

import pytest
import torch

from pipeline.config.settings import TrainSettings
from pipeline.training.schedule import lr_factor, make_optimizer, make_scheduler


def factor(step, **overrides):
    kwargs = dict(schedule="multistep", steps=100, warmup_steps=10, warmup_factor=0.1,
                  milestones=(60, 80), gamma=0.1)  # fmt: skip
    kwargs.update(overrides)
    return lr_factor(step, **kwargs)


def test_warmup_is_linear_from_the_warmup_factor_to_one():
    assert factor(0) == pytest.approx(0.1)
    assert factor(5) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(1.0)


def test_multistep_decays_by_gamma_at_each_milestone():
    assert factor(59) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1)
    assert factor(80) == pytest.approx(0.01)


def test_cosine_goes_from_one_to_zero_at_the_last_step():
    assert factor(10, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert factor(50, schedule="cosine") == pytest.approx(0.5)
    assert factor(100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="poly"):
        factor(0, schedule="poly")


def test_scheduler_drives_the_optimizer_and_resumes_on_the_same_lr():
    settings = TrainSettings(base_lr=0.16, lr_reference_batch=2, batch_per_worker=1, steps=20,
                             warmup_steps=4, warmup_factor=0.5, milestones=(10,))  # fmt: skip
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=settings.lr)
    sched = make_scheduler(opt, settings)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.08 * 0.5)
    lrs = []
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(0.08)  # after 4 steps: warmup over
    assert lrs[9] == pytest.approx(0.008)  # after 10 steps: first milestone

    opt2 = torch.optim.SGD([param], lr=settings.lr)
    sched2 = make_scheduler(opt2, settings)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_is_the_configured_one_at_the_peak_lr(name, kind):
    settings = TrainSettings(optimizer=name, base_lr=0.004, lr_reference_batch=4,
                             batch_per_worker=2, weight_decay=0.05)  # fmt: skip
    param = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([param], settings)
    assert type(opt) is kind
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.002) and group["weight_decay"] == 0.05
    param.grad = torch.ones(3)
    opt.step()
    assert torch.all(param < 1)  # it steps downhill
