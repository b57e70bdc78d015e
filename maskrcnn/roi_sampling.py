"""Training samples for the box and mask heads: match proposals to ground truth, then sample.

torchvision's semantics: the ground-truth boxes join the proposals, ``Matcher(fg, bg)`` without
low-quality matches labels each proposal with its best box's class (background below ``bg``,
ignored in between), and the balanced sampler keeps ``batch_size_per_image`` of them with at most
``positive_fraction`` positives. Positives come first in each image's sample, so the mask head's
proposals are a prefix, and regression targets are encoded for the positives only (the loss uses
no others).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .box_ops import encode_boxes
from .config import RoIConfig


class RoISample(NamedTuple):
    """The sampled proposals of a batch; positives first within each image."""

    proposals: list[Tensor]  # per image [n_i, 4]
    labels: Tensor  # int64 [R], R = sum n_i: class of each sampled proposal, 0 = background
    num_positive: list[int]  # per image: its first num_positive proposals are positive
    positive_index: Tensor  # int64 [P]: rows of the concatenated sample that are positive
    matched_gt: list[Tensor]  # per image, int64 [num_positive]: the gt instance of each positive
    regression_targets: Tensor  # float [P, 4]: box deltas of the positives


def match_labels(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, config: RoIConfig
) -> tuple[Tensor, Tensor]:
    """Per proposal: its class (0 background, -1 ignored) and the index of its best gt box."""
    if len(gt_boxes) == 0:
        zeros = torch.zeros(len(proposals), dtype=torch.int64, device=proposals.device)
        return zeros, zeros
    best_iou, best_gt = box_iou(gt_boxes, proposals).max(dim=0)
    labels = gt_labels[best_gt].to(torch.int64)
    labels[best_iou < config.bg_iou_thresh] = 0
    labels[(best_iou >= config.bg_iou_thresh) & (best_iou < config.fg_iou_thresh)] = -1
    return labels, best_gt


def balanced_sample(
    labels: Tensor, config: RoIConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random positive and negative indices, like torchvision's balanced sampler."""
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(len(positive), int(config.batch_size_per_image * config.positive_fraction))
    num_neg = min(len(negative), config.batch_size_per_image - num_pos)
    pick_pos = torch.randperm(len(positive), device=labels.device, generator=generator)[:num_pos]
    pick_neg = torch.randperm(len(negative), device=labels.device, generator=generator)[:num_neg]
    return positive[pick_pos], negative[pick_neg]


def sample_proposals(
    proposals: list[Tensor],
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    config: RoIConfig,
    generator: torch.Generator | None = None,
) -> RoISample:
    """Match and sample every image's proposals (with its gt boxes appended)."""
    kept, labels, num_positive, matched, matched_boxes, positives = [], [], [], [], [], []
    for props, boxes, classes in zip(proposals, gt_boxes, gt_labels, strict=True):
        props = torch.cat([props, boxes.to(props.dtype)])
        image_labels, best_gt = match_labels(props, boxes, classes, config)
        pos, neg = balanced_sample(image_labels, config, generator)
        index = torch.cat([pos, neg])
        kept.append(props[index])
        labels.append(image_labels[index])
        num_positive.append(len(pos))
        matched.append(best_gt[pos])
        matched_boxes.append(boxes[best_gt[pos]].to(props.dtype))
        positives.append(props[pos])

    # Built on the device from host-known sizes: a copy from pageable host memory would sync.
    device, start, rows = kept[0].device, 0, []
    for sample, n in zip(kept, num_positive, strict=True):
        rows.append(torch.arange(start, start + n, device=device))
        start += len(sample)
    return RoISample(
        proposals=kept,
        labels=torch.cat(labels),
        num_positive=num_positive,
        positive_index=torch.cat(rows),
        matched_gt=matched,
        regression_targets=encode_boxes(
            torch.cat(matched_boxes), torch.cat(positives), config.bbox_reg_weights
        ),
    )
