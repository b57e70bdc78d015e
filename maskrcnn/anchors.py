"""Anchors of a fixed S x S canvas, in torchvision ``AnchorGenerator`` order.

Every image is placed on the same canvas, so the anchors are computed once per configuration.
Preprocessing stores anchor *indices* in the shards; the RPN head's flattened outputs
(level by level, row-major over the feature map, then over the anchors of a cell) use the same
order, so the stored indices address its outputs directly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .config import AnchorConfig

STRIDES = (4, 8, 16, 32, 64)  # P2..P6


def feature_sizes(canvas: int) -> list[int]:
    """Side of each FPN level's (square) feature map on the canvas."""
    if canvas % STRIDES[-1]:
        raise ValueError(f"canvas must be a multiple of {STRIDES[-1]}, got {canvas}")
    return [canvas // s for s in STRIDES]


def cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> Tensor:
    """The anchors centred on (0, 0) of one level, rounded as torchvision rounds them."""
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def anchors_per_level(canvas: int, config: AnchorConfig) -> list[int]:
    per_cell = len(config.aspect_ratios)
    return [n * n * per_cell for n in feature_sizes(canvas)]


@dataclass(frozen=True, eq=False)
class AnchorGrid:
    """The anchors of one canvas, with the per-level geometry that generated them."""

    canvas: int
    anchors: Tensor  # [A, 4] float32, torchvision order; shared, do not modify
    cell_anchors: tuple[Tensor, ...]  # per level: [K, 4] anchors centred on (0, 0)
    level_offsets: tuple[int, ...]  # index of each level's first anchor in ``anchors``

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)


def anchor_grid(canvas: int, config: AnchorConfig) -> AnchorGrid:
    """The (cached) anchor grid of a canvas."""
    return _anchor_grid(canvas, config.sizes, config.aspect_ratios)


@lru_cache(maxsize=8)
def _anchor_grid(canvas: int, sizes: tuple[int, ...], ratios: tuple[float, ...]) -> AnchorGrid:
    cells = tuple(cell_anchors(size, ratios) for size in sizes)
    counts = anchors_per_level(canvas, AnchorConfig(sizes=sizes, aspect_ratios=ratios))
    offsets = tuple(sum(counts[:i]) for i in range(len(counts)))
    return AnchorGrid(
        canvas=canvas,
        anchors=_canvas_anchors(canvas, sizes, ratios),
        cell_anchors=cells,
        level_offsets=offsets,
    )


def canvas_anchors(canvas: int, config: AnchorConfig) -> Tensor:
    """All anchors of the canvas as ``[A, 4]`` float32 (x1, y1, x2, y2); cached, do not modify."""
    return _canvas_anchors(canvas, config.sizes, config.aspect_ratios)


@lru_cache(maxsize=8)
def _canvas_anchors(canvas: int, sizes: tuple[int, ...], ratios: tuple[float, ...]) -> Tensor:
    levels = []
    for size, stride, n in zip(sizes, STRIDES, feature_sizes(canvas), strict=True):
        shifts = torch.arange(n, dtype=torch.float32) * stride
        shift_y, shift_x = torch.meshgrid(shifts, shifts, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts4 = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
        levels.append((shifts4[:, None, :] + cell_anchors(size, ratios)[None]).reshape(-1, 4))
    anchors = torch.cat(levels)
    anchors.requires_grad_(False)
    return anchors


def anchor_signature(canvas: int, config: AnchorConfig) -> dict:
    """What the stored RPN targets depend on, as plain JSON-able data."""
    return {
        "canvas": canvas,
        "sizes": list(config.sizes),
        "aspect_ratios": list(config.aspect_ratios),
        "strides": list(STRIDES),
        "num_anchors": sum(anchors_per_level(canvas, config)),
    }


def anchor_config_hash(canvas: int, config: AnchorConfig, *, matching: dict | None = None) -> str:
    """A short hash of the anchor grid (and matching thresholds) that shards are built for."""
    payload = {"anchors": anchor_signature(canvas, config), "matching": matching or {}}
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
