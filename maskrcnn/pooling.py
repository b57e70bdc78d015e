"""Multi-scale RoIAlign over P2..P5 with the FPN paper's level assignment.

torchvision's ``MultiScaleRoIAlign`` infers each level's scale from the feature and image sizes
on its first call; on a fixed canvas the scales are simply 1/4 .. 1/32, so this module knows them
up front. Numerics are torchvision's: level ``floor(k0 + log2(sqrt(area) / 224) + 1e-6)``
clamped to P2..P5, ``roi_align`` with ``aligned=False`` (its CPU backward is ours, see
``roi_align_cpu``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_area

from .anchors import STRIDES
from .roi_align_cpu import roi_align_fast_grad

POOLED_STRIDES = STRIDES[:4]  # P2..P5; P6 only feeds the RPN
_LEVEL_EPS = 1e-6


def rois_with_image_index(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes -> ``[R, 5]`` rows (image index, x1, y1, x2, y2), as ``roi_align`` takes.

    The index is filled per image from the host-known lengths: ``repeat_interleave`` with
    counts on the device would read its output size back (a host sync)."""
    concat = torch.cat(boxes)
    index = torch.cat([b.new_full((len(b), 1), i) for i, b in enumerate(boxes)]).to(concat.dtype)
    return torch.cat([index, concat], dim=1)


class MultiLevelRoIAlign(nn.Module):
    """Pool each box from the FPN level that matches its size."""

    def __init__(
        self,
        *,
        output_size: int,
        sampling_ratio: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.min_level = 2  # P2 has stride 4 = 2**2
        self.max_level = self.min_level + len(POOLED_STRIDES) - 1

    def levels(self, boxes: Tensor) -> Tensor:
        """Index into P2..P5 of each box ``[R, 4]``."""
        size = torch.sqrt(box_area(boxes))
        level = torch.floor(
            self.canonical_level
            + torch.log2(size / self.canonical_scale)
            + torch.tensor(_LEVEL_EPS, dtype=size.dtype)
        )
        level = torch.clamp(level, min=self.min_level, max=self.max_level)
        return level.to(torch.int64) - self.min_level

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """``features`` P2..P5 ``[B, C, H, W]``; ``boxes`` per image -> ``[R, C, out, out]``.

        The RoIs are sorted by level once and the level sizes read back in one host sync
        (a ``torch.where`` per level would take one each)."""
        rois = rois_with_image_index(boxes)
        levels = self.levels(rois[:, 1:])
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=len(POOLED_STRIDES)).tolist()
        pooled = [
            roi_align_fast_grad(
                feature, rois[index], self.output_size, 1.0 / stride, self.sampling_ratio
            )
            for feature, stride, index in zip(
                features, POOLED_STRIDES, order.split(counts), strict=True
            )
        ]
        by_level = torch.cat([p.to(features[0].dtype) for p in pooled])
        return torch.empty_like(by_level).index_copy(0, order, by_level)
