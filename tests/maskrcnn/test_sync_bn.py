"""``norm: syncbn`` on CPU: two gloo processes of half a batch each, the layer inside DDP as the
training workers wrap the model, normalise, update their running statistics and
back-propagate exactly as one BatchNorm2d over the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from maskrcnn.backbone import build_backbone
from maskrcnn.config import ModelConfig
from maskrcnn.sync_bn import SyncBatchNorm2d

WORLD = 2


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and an upstream gradient with per-channel offsets, so the halves differ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) * 2 + torch.tensor([1.0, -3.0, 0.5]).view(1, 3, 1, 1)
    return x, torch.randn(x.shape, generator=g)


def reference() -> dict[str, torch.Tensor]:
    """Affine parameters other than BatchNorm's initial ones, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return {"weight": torch.rand(3, generator=g) + 0.5, "bias": torch.rand(3, generator=g) - 0.5}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    params = reference()
    bn = SyncBatchNorm2d(3, momentum=0.3)
    bn.load_state_dict(params, strict=False)
    x, grad = batch()
    half = slice(2 * rank, 2 * rank + 2)
    mine = x[half].clone().to(memory_format=torch.channels_last).requires_grad_(True)
    out = nn.parallel.DistributedDataParallel(bn)(mine)  # DDP refuses torch's own on CPU
    out.backward(grad[half])
    torch.save(
        {
            "out": out.detach(),
            "input_grad": mine.grad,
            "weight_grad": bn.weight.grad,
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("syncbn")
    mp.spawn(run_rank, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_two_halves_match_one_batchnorm_over_the_whole_batch(ranks):
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn.load_state_dict(reference(), strict=False)
    x, grad = batch()
    x.requires_grad_(True)
    out = bn(x)
    out.backward(grad)
    got_out = torch.cat([r["out"] for r in ranks])
    torch.testing.assert_close(got_out, out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.cat([r["input_grad"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-5
    )
    # DDP averages the halves' shares of the parameter gradient: each rank holds half the sum.
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def test_outside_a_process_group_it_is_plain_batchnorm_and_loads_a_bn_checkpoint():
    syncbn = build_backbone(ModelConfig(num_classes=2, backbone="resnet18", norm="syncbn"))
    plain = build_backbone(ModelConfig(num_classes=2, backbone="resnet18", norm="bn"))
    assert isinstance(syncbn.body.bn1, SyncBatchNorm2d)
    syncbn.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        syncbn.train(mode), plain.train(mode)
        torch.testing.assert_close(syncbn(x)["0"], plain(x)["0"])
