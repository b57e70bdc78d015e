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

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_area

from .config import RPNConfig

# Above this many IoU entries, the matrix is built one chunk of anchors at a time.
_CHUNK_ELEMENTS = 1 << 22


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


def encode_deltas(gt: Tensor, anchors: Tensor) -> Tensor:
    """torchvision ``BoxCoder(weights=(1, 1, 1, 1)).encode`` for matched pairs of boxes."""
    aw = anchors[:, 2] - anchors[:, 0]
    ah = anchors[:, 3] - anchors[:, 1]
    ax = anchors[:, 0] + 0.5 * aw
    ay = anchors[:, 1] + 0.5 * ah
    gw = gt[:, 2] - gt[:, 0]
    gh = gt[:, 3] - gt[:, 1]
    gx = gt[:, 0] + 0.5 * gw
    gy = gt[:, 1] + 0.5 * gh
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], 1)


def _pairwise_inter(boxes: Tensor, anchors: Tensor) -> Tensor:
    lt = torch.max(boxes[:, None, :2], anchors[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], anchors[None, :, 2:])
    wh = (rb - lt).clamp_(min=0)
    return wh[..., 0] * wh[..., 1]


def _max_iou(boxes: Tensor, anchors: Tensor, anchor_area: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: best IoU and its box (first on ties, as ``Tensor.max``); per box: best IoU."""
    box_area_ = box_area(boxes)
    n, a = len(boxes), len(anchors)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    best_val = torch.empty(a)
    best_idx = torch.empty(a, dtype=torch.int64)
    best_per_box = torch.zeros(n)
    for start in range(0, a, step):
        sl = slice(start, start + step)
        inter = _pairwise_inter(boxes, anchors[sl])
        iou = inter / (box_area_[:, None] + anchor_area[None, sl] - inter)
        best_val[sl], best_idx[sl] = iou.max(dim=0)
        best_per_box = torch.maximum(best_per_box, iou.max(dim=1).values)
    return best_val, best_idx, best_per_box


def _low_quality_anchors(
    boxes: Tensor, anchors: Tensor, anchor_area: Tensor, best_per_box: Tensor
) -> Tensor:
    """Anchors whose IoU with some box equals that box's best IoU (torchvision's rule)."""
    box_area_ = box_area(boxes)
    n, a = len(boxes), len(anchors)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    hits = torch.zeros(a, dtype=torch.bool)
    for start in range(0, a, step):
        sl = slice(start, start + step)
        inter = _pairwise_inter(boxes, anchors[sl])
        iou = inter / (box_area_[:, None] + anchor_area[None, sl] - inter)
        hits[sl] = (iou == best_per_box[:, None]).any(dim=0)
    return hits


def _crowd_covered(crowd: Tensor, anchors: Tensor, anchor_area: Tensor, thresh: float) -> Tensor:
    covered = torch.zeros(len(anchors), dtype=torch.bool)
    step = max(1, _CHUNK_ELEMENTS // max(len(crowd), 1))
    for start in range(0, len(anchors), step):
        sl = slice(start, start + step)
        ioa = _pairwise_inter(crowd, anchors[sl]) / anchor_area[None, sl]
        covered[sl] = (ioa >= thresh).any(dim=0)
    return covered


@torch.no_grad()
def build_rpn_targets(
    anchors: Tensor, boxes: Tensor, iscrowd: Tensor | None = None, config: RPNConfig | None = None
) -> RPNTargets:
    """Match an image's boxes (canvas pixels) to the canvas anchors.

    ``anchors`` is ``canvas_anchors(...)``; ``boxes`` is ``[N, 4]`` x1, y1, x2, y2 with positive
    width and height; ``iscrowd`` is ``[N]`` bool (all False when omitted).
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
    anchors = anchors.float()
    anchor_area = box_area(anchors)
    gt, crowd = boxes[~crowd_mask], boxes[crowd_mask]

    positive = torch.zeros(len(anchors), dtype=torch.bool)
    ignored = torch.zeros(len(anchors), dtype=torch.bool)
    deltas = torch.zeros(0, 4)
    if len(gt):
        best_val, best_idx, best_per_box = _max_iou(gt, anchors, anchor_area)
        positive = best_val >= config.fg_iou_thresh
        positive |= _low_quality_anchors(gt, anchors, anchor_area, best_per_box)
        ignored = (best_val >= config.bg_iou_thresh) & ~positive
        pos_idx = positive.nonzero().squeeze(1)
        deltas = encode_deltas(gt[best_idx[pos_idx]], anchors[pos_idx])
    if len(crowd):
        ignored |= _crowd_covered(crowd, anchors, anchor_area, config.crowd_ioa_thresh) & ~positive
    return RPNTargets(
        pos=positive.nonzero().squeeze(1),
        pos_deltas=deltas.float(),
        ignore=ignored.nonzero().squeeze(1),
    )


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
    num_pos = min(len(pos), int(batch_size * positive_fraction))
    pick = torch.randperm(len(pos), generator=generator)[:num_pos]

    allowed = torch.ones(num_anchors, dtype=torch.bool)
    allowed[pos] = False
    allowed[torch.as_tensor(targets.ignore, dtype=torch.int64)] = False
    negatives = allowed.nonzero().squeeze(1)
    num_neg = min(len(negatives), batch_size - num_pos)
    neg = negatives[_choose(len(negatives), num_neg, generator)]

    idx = torch.zeros(batch_size, dtype=torch.int64)
    labels = torch.full((batch_size,), -1.0)
    deltas = torch.zeros(batch_size, 4)
    idx[:num_pos] = pos[pick]
    labels[:num_pos] = 1.0
    deltas[:num_pos] = pos_deltas[pick]
    idx[num_pos : num_pos + num_neg] = neg
    labels[num_pos : num_pos + num_neg] = 0.0
    return RPNSample(idx=idx, labels=labels, deltas=deltas)


def _choose(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` distinct indices below ``n``, uniformly; cheap when ``k`` is much smaller than ``n``."""
    if k >= n // 4:
        return torch.randperm(n, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.int64)
    while len(chosen) < k:
        draw = torch.randint(n, (2 * k,), generator=generator)
        chosen = torch.cat([chosen, draw])
        chosen = _unique_in_order(chosen)
    return chosen[:k]


def _unique_in_order(values: Tensor) -> Tensor:
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return values[first.sort().values]
