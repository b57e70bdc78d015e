"""BatchNorm whose batch statistics span every process of a distributed run (``norm: syncbn``).

With 2 workers of 4 images, plain BatchNorm normalises over 4 images while a one-process loop
of batch 8 normalises over 8; detectron2 trains such models with synchronised BN for this
reason. torch's ``SyncBatchNorm`` refuses CPU tensors, and DDP refuses a CPU model holding one,
so the layer is a ``BatchNorm2d`` that runs torch's synchronised forward where torch supports
the device, and elsewhere (CPU, gloo) all-reduces the per-channel sums, sums of squares and the
sample count itself: one collective per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _torch_syncs(device: torch.device) -> bool:
    """Devices that torch's own ``SyncBatchNorm`` supports."""
    return device.type in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group, forward and backward: every rank's loss depends on every
    rank's input through the shared statistics, so the gradients are summed the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """torch's ``SyncBatchNorm`` forward where it supports the device, an all-reduce of the
    batch statistics elsewhere; plain BatchNorm in eval and outside a process group of two or
    more. Its parameters and buffers are BatchNorm2d's, so its checkpoints load into a ``bn``
    model."""

    process_group: dist.ProcessGroup | None = None  # None: the whole world, as torch's
    # what torch's forward, borrowed below, asks of its layer beyond BatchNorm2d's
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, x: Tensor) -> Tensor:
        if _torch_syncs(x.device):
            return nn.SyncBatchNorm.forward(self, x)  # type: ignore[arg-type]
        group = self.process_group or dist.group.WORLD
        syncing = self.training and dist.is_available() and dist.is_initialized()
        if not syncing or dist.get_world_size(group) < 2:
            return super().forward(x)
        return self._all_reduced(x, group)

    def _all_reduced(self, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // channels)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]), group)
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(total))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.reshape(shape)) * (var + self.eps).rsqrt().reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out

    def _update_running_stats(self, mean: Tensor, var: Tensor, total: float) -> None:
        """As BatchNorm does: the unbiased variance, momentum or (momentum None) a running mean."""
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (total / max(total - 1.0, 1.0))
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased, momentum)
