"""Region proposal network on the fixed canvas: head, proposals, and the loss.

The anchors never change, so they come from ``maskrcnn.anchors`` once (cached per device) instead
of being generated per image and step. The loss reads the anchor sample the loader drew from the
precomputed targets (``rpn_idx`` / ``rpn_labels`` / ``rpn_deltas``), batched over images; without
those keys it builds and samples the targets online. Proposal selection is torchvision's
(per-level top-k, decode, clip, remove small, per-level NMS, post-NMS top-n), decoding only the
top-k boxes rather than every anchor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from .anchors import AnchorGrid, anchor_grid, anchors_per_level
from .box_ops import decode_boxes
from .config import ModelConfig
from .rpn_targets import RPNSample, build_rpn_targets, sample_rpn_targets

RPN_KEYS = ("rpn_idx", "rpn_labels", "rpn_deltas")
_UNIT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def flatten_head_outputs(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head maps -> objectness ``[B, A]`` and deltas ``[B, A, 4]`` in anchor order."""
    batch = logits[0].shape[0]
    flat_logits = [x.permute(0, 2, 3, 1).reshape(batch, -1) for x in logits]
    flat_deltas = []
    for d in deltas:
        _, a4, h, w = d.shape
        flat_deltas.append(
            d.view(batch, a4 // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        )
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


def rpn_loss(objectness: Tensor, deltas: Tensor, sample: RPNSample) -> tuple[Tensor, Tensor]:
    """torchvision's RPN loss on a batched sample (idx, labels ``[B, K]``; deltas ``[B, K, 4]``).

    BCE averaged over the sampled anchors, smooth-L1 (beta 1/9) summed over the positives and
    divided by the number sampled; labels -1 are padding. Masked sums keep it free of host syncs.
    """
    idx, labels = sample.idx, sample.labels
    logits = objectness.gather(1, idx).float()
    pred = deltas.gather(1, idx[..., None].expand(-1, -1, 4)).float()
    sampled = (labels >= 0).to(logits.dtype)
    positive = (labels > 0).to(logits.dtype)
    num_sampled = sampled.sum()
    bce = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    objectness_loss = (bce * sampled).sum() / num_sampled
    l1 = F.smooth_l1_loss(pred, sample.deltas, beta=1 / 9, reduction="none").sum(-1)
    box_loss = (l1 * positive).sum() / num_sampled
    return objectness_loss, box_loss


class RPN(nn.Module):
    """The RPN head (``rpn.head.*`` keys as torchvision) and what the canvas lets us precompute."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.rpn
        self.canvas = config.canvas
        self.anchor_config = config.anchors
        self.head = RPNHead(config.fpn_channels, len(config.anchors.aspect_ratios))
        self.level_sizes = anchors_per_level(config.canvas, config.anchors)
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def grid(self) -> AnchorGrid:
        return anchor_grid(self.canvas, self.anchor_config)

    def anchors_and_levels(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The canvas anchors ``[A, 4]`` and each one's FPN level ``[A]``, kept on ``device``."""
        if device not in self._device_cache:
            levels = torch.repeat_interleave(
                torch.arange(len(self.level_sizes)), torch.tensor(self.level_sizes)
            )
            self._device_cache[device] = (self.grid.anchors.to(device), levels.to(device))
        return self._device_cache[device]

    def forward(
        self,
        features: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        before_loss: Callable[[], None] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """``features`` P2..P6 -> (proposals per image ``[n_i, 4]``, losses when training).

        ``before_loss`` runs between the proposals (which sync with the host) and the loss
        (whose gathers would fail on the device with an out-of-range anchor index)."""
        objectness, deltas = flatten_head_outputs(*self.head(features))
        proposals = self.propose(objectness.detach().float(), deltas.detach().float())
        if not self.training:
            return proposals, {}
        assert targets is not None, "training needs targets"
        if before_loss is not None:
            before_loss()
        sample = self.anchor_sample(targets, objectness.device)
        loss_objectness, loss_rpn_box_reg = rpn_loss(objectness, deltas, sample)
        return proposals, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}

    def propose(self, objectness: Tensor, deltas: Tensor) -> list[Tensor]:
        """Top-k per level, decode, clip, drop small boxes, NMS per level, keep the best n."""
        cfg = self.config
        pre_n = cfg.pre_nms_top_n_train if self.training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if self.training else cfg.post_nms_top_n_test
        anchors, levels = self.anchors_and_levels(objectness.device)

        top, offset = [], 0
        for level_scores in objectness.split(self.level_sizes, dim=1):
            k = min(pre_n, level_scores.shape[1])
            top.append(level_scores.topk(k, dim=1).indices + offset)
            offset += level_scores.shape[1]
        top_idx = torch.cat(top, dim=1)  # [B, T]

        scores = objectness.gather(1, top_idx).sigmoid()
        picked = deltas.gather(1, top_idx[..., None].expand(-1, -1, 4))
        boxes = decode_boxes(picked[:, :, None], anchors[top_idx], _UNIT_WEIGHTS)[:, :, 0]
        boxes = clip_boxes_to_image(boxes, (self.canvas, self.canvas))
        proposals = []
        for img_boxes, img_scores, img_levels in zip(boxes, scores, levels[top_idx], strict=True):
            keep = remove_small_boxes(img_boxes, cfg.min_size)
            if cfg.score_thresh > 0:  # sigmoid scores are never below 0: skip a host sync
                keep = keep[img_scores[keep] >= cfg.score_thresh]
            keep = keep[
                batched_nms(img_boxes[keep], img_scores[keep], img_levels[keep], cfg.nms_thresh)
            ]
            proposals.append(img_boxes[keep[:post_n]])
        return proposals

    def anchor_sample(self, targets: list[dict[str, Tensor]], device: torch.device) -> RPNSample:
        """The batched anchor sample: the loader's, or built online from the boxes."""
        if all(key in targets[0] for key in RPN_KEYS):
            return RPNSample(
                idx=torch.stack([t["rpn_idx"] for t in targets]).to(device, torch.int64),
                labels=torch.stack([t["rpn_labels"] for t in targets]).to(device, torch.float32),
                deltas=torch.stack([t["rpn_deltas"] for t in targets]).to(device, torch.float32),
            )
        samples = [self.online_sample(t) for t in targets]
        return RPNSample(*(torch.stack(parts).to(device) for parts in zip(*samples, strict=True)))

    def online_sample(self, target: dict[str, Tensor]) -> RPNSample:
        """Match and sample one image's anchors now (slower than the precomputed path)."""
        iscrowd = target.get("iscrowd")
        matched = build_rpn_targets(
            self.grid,
            target["boxes"].detach().cpu(),
            None if iscrowd is None else iscrowd.cpu(),
            self.config,
        )
        return sample_rpn_targets(
            matched,
            self.grid.num_anchors,
            batch_size=self.config.batch_size_per_image,
            positive_fraction=self.config.positive_fraction,
        )
