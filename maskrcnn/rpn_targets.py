"""RPN anchor targets, built offline once per image, and the per-step 256-anchor sample.

``build_rpn_targets`` has the semantics of torchvision's
``Matcher(fg, bg, allow_low_quality_matches=True)`` + ``BoxCoder((1, 1, 1, 1))`` applied to the
non-crowd boxes, plus Detectron's crowd rule: crowd boxes never give positives, and an anchor
that a crowd region covers (intersection / anchor area >= ``crowd_ioa_thresh``) is ignored
instead of negative. Its result is small (positives and ignored anchors; every other anchor is
negative), which is what the shards store. ``sample_rpn_targets`` draws the balanced sample the
loss uses, fresh on every call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

from .anchors import STRIDES, AnchorGrid
from .box_ops import UNIT_WEIGHTS, encode_boxes
from .config import RPNConfig


class RPNTargets(NamedTuple):
    """An image's matching result: every anchor not in ``pos`` or ``ignore`` is negative."""

    pos: Tensor  # int64 [P], ascending anchor indices
    pos_deltas: Tensor  # float32 [P, 4], (dx, dy, dw, dh) of each positive
    ignore: Tensor  # int64 [I], ascending anchor indices, disjoint from pos


class RPNSample(NamedTuple):
    """A fixed-size sample of anchors for the RPN loss; stacks into a batch."""

    idx: Tensor  # int64 [batch_size]
    labels: Tensor  # float32 [batch_size]: 1 positive, 0 negative, -1 padding (not sampled)
    deltas: Tensor  # float32 [batch_size, 4]: regression targets, zero where not positive


def _pair_iou(boxes: Tensor, box_area_: Tensor, anchors: Tensor, anchor_area: Tensor) -> Tensor:
    """IoU of matched rows, with the same operations (and rounding) as torchvision's box_iou."""
    lt = torch.max(boxes[..., :2], anchors[..., :2])
    rb = torch.min(boxes[..., 2:], anchors[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area_ + anchor_area - inter)


def _level_windows(grid: AnchorGrid, box: Tensor, box_area_: float, floor: float) -> list[Tensor]:
    """Per level, the anchors that can overlap ``box``, skipping levels that cannot matter.

    IoU is at most min(a, b) / max(a, b) for areas a, b. A level whose best such bound is below
    ``min(floor, best IoU found so far)`` cannot hold a positive, an ignored anchor or the box's
    best anchor, so it is skipped; levels are visited best bound first. Every skipped anchor is
    negative for this box, as the dense matcher would find.
    """
    bounds = []
    for cells in grid.cell_anchors:
        areas = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
        ratio = torch.minimum(areas, torch.tensor(box_area_)) / torch.maximum(
            areas, torch.tensor(box_area_)
        )
        bounds.append(float(ratio.max()))
    x1, y1, x2, y2 = box.tolist()
    windows, best = [], 0.0
    for level in sorted(range(len(bounds)), key=lambda i: -bounds[i]):
        if bounds[level] < min(floor, best):
            break
        idx = _window(grid, level, x1, y1, x2, y2)
        if len(idx):
            a = grid.anchors[idx]
            iou = _pair_iou(box, box_area_, a, box_area(a))
            best = max(best, float(iou.max()))
        windows.append(idx)
    return windows


def _window(grid: AnchorGrid, level: int, x1: float, y1: float, x2: float, y2: float) -> Tensor:
    """Anchor indices of the cells of ``level`` whose anchors can intersect the box."""
    cells = grid.cell_anchors[level]
    stride = STRIDES[level]
    n = grid.canvas // stride
    lo_x = max(0, math.floor((x1 - float(cells[:, 2].max())) / stride))
    hi_x = min(n - 1, math.ceil((x2 - float(cells[:, 0].min())) / stride))
    lo_y = max(0, math.floor((y1 - float(cells[:, 3].max())) / stride))
    hi_y = min(n - 1, math.ceil((y2 - float(cells[:, 1].min())) / stride))
    if lo_x > hi_x or lo_y > hi_y:
        return torch.empty(0, dtype=torch.int64)
    cols = torch.arange(lo_x, hi_x + 1)
    rows = torch.arange(lo_y, hi_y + 1)
    k = len(cells)
    cell_idx = (rows[:, None] * n + cols[None, :]).reshape(-1)
    return grid.level_offsets[level] + (cell_idx[:, None] * k + torch.arange(k)).reshape(-1)


def _near_anchors(grid: AnchorGrid, box: Tensor) -> Tensor:
    """Every anchor, on every level, that can intersect ``box``."""
    x1, y1, x2, y2 = box.tolist()
    return torch.cat([_window(grid, level, x1, y1, x2, y2) for level in range(len(STRIDES))])


def _match(grid: AnchorGrid, gt: Tensor, config: RPNConfig) -> tuple[Tensor, Tensor, Tensor] | None:
    """Sparse matching: (positive mask, ignored mask, matched box per positive), or None.

    None means some box overlaps no anchor at all, where torchvision's low-quality rule turns
    every zero-IoU anchor positive; the dense matcher reproduces that quirk.
    """
    num = grid.num_anchors
    areas = box_area(gt)
    pair_box, pair_anchor = [], []
    for i, box in enumerate(gt):
        idx = torch.cat(_level_windows(grid, box, float(areas[i]), config.bg_iou_thresh))
        pair_box.append(torch.full((len(idx),), i, dtype=torch.int64))
        pair_anchor.append(idx)
    box_idx, anchor_idx = torch.cat(pair_box), torch.cat(pair_anchor)
    a = grid.anchors[anchor_idx]
    iou = _pair_iou(gt[box_idx], areas[box_idx], a, box_area(a))
    best_per_box = torch.zeros(len(gt)).scatter_reduce(0, box_idx, iou, reduce="amax")
    if (best_per_box <= 0).any():
        return None
    best_per_anchor = torch.zeros(num).scatter_reduce(0, anchor_idx, iou, reduce="amax")
    positive = best_per_anchor >= config.fg_iou_thresh
    positive[anchor_idx[iou == best_per_box[box_idx]]] = True
    ignored = (best_per_anchor >= config.bg_iou_thresh) & ~positive
    pos_idx = positive.nonzero().squeeze(1)
    # The argmax box of each positive over all boxes (first on ties, as torchvision's max).
    matched = box_iou(gt, grid.anchors[pos_idx]).max(dim=0).indices
    return positive, ignored, gt[matched]


def _match_dense(anchors: Tensor, gt: Tensor, config: RPNConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Reference matcher over the full IoU matrix (torchvision's Matcher, step by step)."""
    iou = box_iou(gt, anchors)
    best_val, best_idx = iou.max(dim=0)
    positive = best_val >= config.fg_iou_thresh
    positive |= (iou == iou.max(dim=1).values[:, None]).any(dim=0)
    ignored = (best_val >= config.bg_iou_thresh) & ~positive
    return positive, ignored, gt[best_idx[positive]]


def _crowd_covered(crowd: Tensor, anchors: Tensor, thresh: float) -> Tensor:
    lt = torch.max(crowd[:, None, :2], anchors[None, :, :2])
    rb = torch.min(crowd[:, None, 2:], anchors[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    ioa = wh[..., 0] * wh[..., 1] / box_area(anchors)[None]
    return (ioa >= thresh).any(dim=0)


@torch.no_grad()
def build_rpn_targets(
    grid: AnchorGrid,
    boxes: Tensor,
    iscrowd: Tensor | None = None,
    config: RPNConfig | None = None,
    *,
    dense: bool = False,
) -> RPNTargets:
    """Match an image's boxes (canvas pixels) to the canvas anchors of ``grid``.

    ``boxes`` is ``[N, 4]`` x1, y1, x2, y2; ``iscrowd`` is ``[N]`` bool (all False when omitted).
    Only anchors near each box are examined, so the cost follows the boxes, not the ~262k
    anchors of a 1024 canvas; ``dense=True`` uses the full IoU matrix (the reference).
    """
    config = config or RPNConfig()
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    crowd_mask = (
        torch.zeros(len(boxes), dtype=torch.bool)
        if iscrowd is None
        else torch.as_tensor(iscrowd, dtype=torch.bool).reshape(-1)
    )
    if len(crowd_mask) != len(boxes):
        raise ValueError(f"iscrowd has {len(crowd_mask)} entries for {len(boxes)} boxes")
    gt, crowd = boxes[~crowd_mask], boxes[crowd_mask]

    positive = torch.zeros(grid.num_anchors, dtype=torch.bool)
    ignored = torch.zeros(grid.num_anchors, dtype=torch.bool)
    matched = torch.zeros(0, 4)
    if len(gt):
        result = None if dense else _match(grid, gt, config)
        positive, ignored, matched = result or _match_dense(grid.anchors, gt, config)
    pos_idx = positive.nonzero().squeeze(1)
    deltas = encode_boxes(matched, grid.anchors[pos_idx], UNIT_WEIGHTS)
    if len(crowd):
        near = torch.cat([_near_anchors(grid, c) for c in crowd]).unique()
        covered = torch.zeros(grid.num_anchors, dtype=torch.bool)
        covered[near] = _crowd_covered(crowd, grid.anchors[near], config.crowd_ioa_thresh)
        ignored |= covered & ~positive
    return RPNTargets(pos=pos_idx, pos_deltas=deltas.float(), ignore=ignored.nonzero().squeeze(1))


def sample_rpn_targets(
    targets: RPNTargets,
    num_anchors: int,
    *,
    batch_size: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> RPNSample:
    """Draw up to ``batch_size`` anchors, at most ``positive_fraction`` of them positive.

    The same balance as torchvision's ``BalancedPositiveNegativeSampler``: all positives if there
    are fewer than the quota, negatives for the rest. Unused slots (only when the canvas has too
    few negative anchors) are padding with label -1.
    """
    pos = torch.as_tensor(targets.pos, dtype=torch.int64)
    pos_deltas = torch.as_tensor(targets.pos_deltas, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.as_tensor(targets.ignore, dtype=torch.int64)
    num_pos = min(len(pos), int(batch_size * positive_fraction))
    pick = torch.randperm(len(pos), generator=generator)[:num_pos]
    num_neg = min(num_anchors - len(pos) - len(ignore), batch_size - num_pos)
    neg = _draw_negatives(num_anchors, pos, ignore, num_neg, generator)

    idx = torch.zeros(batch_size, dtype=torch.int64)
    labels = torch.full((batch_size,), -1.0)
    deltas = torch.zeros(batch_size, 4)
    idx[:num_pos] = pos[pick]
    labels[:num_pos] = 1.0
    deltas[:num_pos] = pos_deltas[pick]
    idx[num_pos : num_pos + num_neg] = neg
    labels[num_pos : num_pos + num_neg] = 0.0
    return RPNSample(idx=idx, labels=labels, deltas=deltas)


def _draw_negatives(
    num_anchors: int, pos: Tensor, ignore: Tensor, k: int, generator: torch.Generator | None
) -> Tensor:
    """``k`` distinct anchors in neither ``pos`` nor ``ignore``, uniformly, in random order.

    On real images nearly every anchor is negative, so rejection sampling (draw anchors, drop
    the excluded ones and repeats) costs O(k) instead of a pass over every anchor: 0.13 ms
    instead of 0.3-1.0 ms per image at canvas 256-1024 (docs/benchmarks.md, "Loader").
    """
    num_negatives = num_anchors - len(pos) - len(ignore)
    if 2 * num_negatives < num_anchors or 4 * k > num_negatives:
        allowed = torch.ones(num_anchors, dtype=torch.bool)
        allowed[pos] = False
        allowed[ignore] = False
        negatives = allowed.nonzero().squeeze(1)
        return negatives[torch.randperm(len(negatives), generator=generator)[:k]]
    chosen: dict[int, None] = {}  # insertion-ordered: the first k distinct draws
    while len(chosen) < k:
        draw = torch.randint(num_anchors, (2 * k,), generator=generator)
        draw = draw[~(_isin_sorted(draw, pos) | _isin_sorted(draw, ignore))]
        chosen.update(dict.fromkeys(draw.tolist()))
    return torch.tensor(list(chosen)[:k], dtype=torch.int64)


def _isin_sorted(values: Tensor, ascending: Tensor) -> Tensor:
    """``torch.isin(values, ascending)`` by binary search, for an ascending ``ascending``."""
    if len(ascending) == 0:
        return torch.zeros(len(values), dtype=torch.bool)
    at = torch.searchsorted(ascending, values).clamp_(max=len(ascending) - 1)
    return ascending[at] == values
