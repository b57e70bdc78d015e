"""Box delta encoding and decoding with torchvision ``BoxCoder`` numerics.

The arithmetic follows ``torchvision.models.detection._utils.BoxCoder`` operation by operation,
so that decoded proposals and detections match torchvision's to the last bit on the same input.
Unlike ``BoxCoder`` these work on any number of leading dimensions, so callers can decode only
the boxes they keep (the RPN decodes its top-k, not every anchor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Weights = tuple[float, float, float, float]
UNIT_WEIGHTS: Weights = (1.0, 1.0, 1.0, 1.0)  # the RPN's BoxCoder

# torchvision's clamp on dw, dh before exp(): boxes at most 1000/16 times the reference size.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: Weights) -> Tensor:
    """Apply ``deltas [..., K, 4]`` to reference ``boxes [..., 4]``; returns ``[..., K, 4]``.

    ``K`` is the number of predictions per reference box (1 for the RPN, one per class in the
    box head). Boxes are x1, y1, x2, y2.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = (boxes[..., 0] + 0.5 * widths)[..., None]
    ctr_y = (boxes[..., 1] + 0.5 * heights)[..., None]
    widths, heights = widths[..., None], heights[..., None]

    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[..., 3] / wh, max=BBOX_XFORM_CLIP)

    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack(
        (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1
    )


def encode_boxes(targets: Tensor, boxes: Tensor, weights: Weights) -> Tensor:
    """The deltas that take ``boxes [N, 4]`` to matched ``targets [N, 4]``: ``[N, 4]``."""
    wx, wy, ww, wh = weights
    ex_w = boxes[:, 2] - boxes[:, 0]
    ex_h = boxes[:, 3] - boxes[:, 1]
    ex_x = boxes[:, 0] + 0.5 * ex_w
    ex_y = boxes[:, 1] + 0.5 * ex_h
    gt_w = targets[:, 2] - targets[:, 0]
    gt_h = targets[:, 3] - targets[:, 1]
    gt_x = targets[:, 0] + 0.5 * gt_w
    gt_y = targets[:, 1] + 0.5 * gt_h
    return torch.stack(
        (
            wx * (gt_x - ex_x) / ex_w,
            wy * (gt_y - ex_y) / ex_h,
            ww * torch.log(gt_w / ex_w),
            wh * torch.log(gt_h / ex_h),
        ),
        dim=1,
    )


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """``boxes [..., 4]`` (x1, y1, x2, y2) of an image ``width`` pixels wide, mirrored
    horizontally within that width: the boxes of the flipped image."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)
