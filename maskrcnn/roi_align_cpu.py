"""``roi_align`` with a fast CPU backward; the forward is torchvision's, bit for bit.

torchvision's CPU ``roi_align`` backward is a single-threaded loop that recomputes the bilinear
weights of every sample for every channel: several times the forward, about a tenth of a CPU
training step (docs/benchmarks.md, "Model step"). With a fixed sampling grid the gradient is a
sparse matrix product instead: each output bin reads ``sampling_ratio**2`` points, each point four
feature cells with bilinear weights. Those weights are computed once per (RoI, bin) and the
feature gradient is the sparse product ``W^T @ grad_output``, 3-7x faster on one core. On other
devices, or with an adaptive sampling grid, torchvision's own backward runs.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import roi_align


def roi_align_fast_grad(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> Tensor:
    """``torchvision.ops.roi_align(..., aligned=False)``, with a sparse-product CPU backward."""
    if features.device.type != "cpu" or sampling_ratio <= 0 or not features.requires_grad:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)
    return _RoIAlign.apply(features, rois, output_size, spatial_scale, sampling_ratio)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio):  # type: ignore[override]
        ctx.save_for_backward(rois)
        ctx.settings = (features.shape, features.dtype, spatial_scale, sampling_ratio)
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        shape, dtype, spatial_scale, sampling_ratio = ctx.settings
        grad = feature_gradient(
            grad_output.float(), rois.float(), shape, spatial_scale, sampling_ratio
        )
        return grad.to(dtype), None, None, None, None


def feature_gradient(
    grad_output: Tensor, rois: Tensor, shape: torch.Size, spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """d(loss)/d(features) ``[B, C, H, W]`` from ``grad_output [R, C, PH, PW]``."""
    batch, channels, height, width = shape
    num_rois, _, ph, pw = grad_output.shape
    bins, num_cells = num_rois * ph * pw, batch * height * width
    if bins == 0:
        return grad_output.new_zeros(shape)
    cells, weights = bilinear_taps(rois, spatial_scale, (ph, pw), sampling_ratio, (height, width))
    # W^T in CSR form: one row per feature cell, listing the bins (and weights) that read it.
    cells = cells.reshape(-1)
    order = torch.argsort(cells, stable=True)
    crow = torch.zeros(num_cells + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(cells, minlength=num_cells).cumsum(0)
    bin_of_tap = torch.arange(bins).repeat_interleave(cells.numel() // bins)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        transposed = torch.sparse_csr_tensor(
            crow,
            bin_of_tap[order],
            weights.reshape(-1)[order],
            (num_cells, bins),
            check_invariants=False,
        )
    grad_bins = grad_output.permute(0, 2, 3, 1).reshape(bins, channels)
    grad_cells = torch.mm(transposed, grad_bins)  # [B*H*W, C]
    return grad_cells.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def bilinear_taps(
    rois: Tensor,
    spatial_scale: float,
    output_size: tuple[int, int],
    sampling_ratio: int,
    feature_size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Per (RoI, bin): the flat feature cells (``b*H*W + y*W + x``) each sample reads and their
    weights, ``[R, PH, PW, sampling_ratio**2 * 4]``; as torchvision's kernel (weight 0 outside)."""
    ph, pw = output_size
    height, width = feature_size
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale for i in range(1, 5))
    bin_h = torch.clamp(y2 - y1, min=1.0) / ph
    bin_w = torch.clamp(x2 - x1, min=1.0) / pw
    offsets = torch.arange(sampling_ratio, dtype=rois.dtype) + 0.5

    def samples(start: Tensor, bin_size: Tensor, bins: int) -> Tensor:  # [R, bins, ratio]
        index = torch.arange(bins, dtype=rois.dtype)[None, :, None]
        step = bin_size[:, None, None]
        return start[:, None, None] + index * step + offsets * step / sampling_ratio

    y_valid, y_low, y_high, y_frac = _axis(samples(y1, bin_h, ph), height)
    x_valid, x_low, x_high, x_frac = _axis(samples(x1, bin_w, pw), width)

    def rows(t: Tensor) -> Tensor:  # [R, PH, ratio] -> [R, PH, 1, ratio, 1]
        return t[:, :, None, :, None]

    def cols(t: Tensor) -> Tensor:  # [R, PW, ratio] -> [R, 1, PW, 1, ratio]
        return t[:, None, :, None, :]

    base = (rois[:, 0].long() * (height * width))[:, None, None, None, None]
    cells = (
        torch.stack(
            [
                rows(y_low) * width + cols(x_low),
                rows(y_low) * width + cols(x_high),
                rows(y_high) * width + cols(x_low),
                rows(y_high) * width + cols(x_high),
            ],
            dim=-1,
        )
        + base[..., None]
    )
    hy, ly = rows(1 - y_frac), rows(y_frac)
    hx, lx = cols(1 - x_frac), cols(x_frac)
    inside = (rows(y_valid) & cols(x_valid)).to(rois.dtype) / (sampling_ratio * sampling_ratio)
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1) * inside[..., None]
    num_rois = len(rois)
    return cells.reshape(num_rois, ph, pw, -1), weights.reshape(num_rois, ph, pw, -1)


def _axis(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear rules along one axis: validity, low/high cell, fraction."""
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    return valid, low, high, coord - low
