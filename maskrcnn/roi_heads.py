"""Box and mask heads: their modules (torchvision's, for the state-dict keys), losses, inference.

Training samples proposals against the ground truth (``roi_sampling``) and returns the
classifier, box-regression and mask losses; evaluation turns proposals into detections with
canvas-sized mask probabilities. Both follow torchvision's ``RoIHeads`` numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes, roi_align

from . import postprocess
from .box_ops import decode_boxes
from .config import ModelConfig, RoIConfig
from .mask_crops import crop_mask_targets
from .pooling import MultiLevelRoIAlign
from .roi_sampling import RoISample, sample_proposals

# An image's gt masks: full-canvas ``masks`` [N, S, S], or (``mask_crops``, ``mask_boxes``).
GtMasks = Tensor | tuple[Tensor, Tensor]
Instances = tuple[list[Tensor], list[Tensor], list[GtMasks]]


def non_crowd_instances(targets: list[dict[str, Tensor]]) -> Instances:
    """Boxes, labels and masks of each image, without crowd instances when ``iscrowd`` is given."""
    boxes, labels, masks = [], [], []
    for t in targets:
        # One index for the tensors: a boolean mask would sync with the host once per tensor.
        keep = torch.where(~t["iscrowd"].bool())[0] if "iscrowd" in t else slice(None)
        boxes.append(t["boxes"][keep])
        labels.append(t["labels"][keep])
        if "masks" in t:
            masks.append(t["masks"][keep])
        else:
            masks.append((t["mask_crops"][keep], t["mask_boxes"][keep]))
    return boxes, labels, masks


def box_losses(
    class_logits: Tensor, box_deltas: Tensor, sample: RoISample
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sample; smooth-L1 of the gt class's deltas over the positives / R."""
    classifier = F.cross_entropy(class_logits, sample.labels)
    rows = sample.positive_index
    deltas = box_deltas.reshape(len(box_deltas), -1, 4)[rows, sample.labels[rows]]
    box_reg = (
        F.smooth_l1_loss(deltas, sample.regression_targets, beta=1 / 9, reduction="sum")
        / sample.labels.numel()
    )
    return classifier, box_reg


def mask_targets(
    gt_masks: list[GtMasks], positives: list[Tensor], matched: list[Tensor], size: int
) -> Tensor:
    """Each positive's gt mask cropped to its box and resized to ``size`` (image by image), in
    float32 also under autocast: the targets are soft at the edges, half precision rounds them.
    An image's masks are canvas-sized, or crops with their boxes (``mask_crops``)."""
    crops = []
    device = positives[0].device
    with torch.autocast(device.type, enabled=False):
        for masks, boxes, index in zip(gt_masks, positives, matched, strict=True):
            if isinstance(masks, tuple):
                crops.append(crop_mask_targets(*masks, boxes, index, size))
                continue
            boxes = boxes.float()
            rois = torch.cat([index[:, None].to(boxes.dtype), boxes], dim=1)
            crops.append(roi_align(masks[:, None].float(), rois, (size, size), 1.0)[:, 0])
    return torch.cat(crops)


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel BCE of the gt class's mask, in float32; zero (with a graph) when there are no
    positives."""
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(len(labels), device=labels.device), labels].float()
    return F.binary_cross_entropy_with_logits(picked, targets.float())


def select_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: list[Tensor],
    *,
    canvas: int,
    config: RoIConfig,
) -> list[dict[str, Tensor]]:
    """Per-class boxes -> score threshold, small-box removal, per-class NMS, top detections."""
    num_classes = class_logits.shape[-1]
    boxes = decode_boxes(
        box_deltas.reshape(len(box_deltas), num_classes, 4),
        torch.cat(proposals),
        config.bbox_reg_weights,
    )
    scores = F.softmax(class_logits, -1)
    sizes = [len(p) for p in proposals]
    detections = []
    for img_boxes, img_scores in zip(boxes.split(sizes), scores.split(sizes), strict=True):
        img_boxes = clip_boxes_to_image(img_boxes, (canvas, canvas))[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, num_classes, device=scores.device).repeat(len(img_scores))
        img_scores = img_scores[:, 1:].reshape(-1)
        keep = torch.where(img_scores > config.score_thresh)[0]
        keep = keep[remove_small_boxes(img_boxes[keep], config.min_size)]
        keep = keep[batched_nms(img_boxes[keep], img_scores[keep], labels[keep], config.nms_thresh)]
        keep = keep[: config.detections_per_img]
        detections.append(
            {"boxes": img_boxes[keep], "labels": labels[keep], "scores": img_scores[keep]}
        )
    return detections


class RoIHeads(nn.Module):
    """``roi_heads.{box_head, box_predictor, mask_head, mask_predictor}`` with their own paths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        roi, channels = config.roi, config.fpn_channels
        self.config = roi
        self.canvas = config.canvas
        pool = {
            "sampling_ratio": roi.sampling_ratio,
            "canonical_scale": roi.canonical_scale,
            "canonical_level": roi.canonical_level,
        }
        self.box_pool = MultiLevelRoIAlign(output_size=roi.box_pool_size, **pool)
        self.mask_pool = MultiLevelRoIAlign(output_size=roi.mask_pool_size, **pool)
        self.box_head = TwoMLPHead(channels * roi.box_pool_size**2, roi.representation_size)
        self.box_predictor = FastRCNNPredictor(roi.representation_size, config.num_classes)
        self.mask_head = MaskRCNNHeads(channels, list(roi.mask_layers), roi.mask_dilation)
        last = roi.mask_layers[-1]
        self.mask_predictor = MaskRCNNPredictor(last, last, config.num_classes)

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        paste_masks: bool = True,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``features`` P2..P5 -> (detections in eval, losses in training)."""
        if self.training:
            assert targets is not None, "training needs targets"
            return [], self.losses(features, proposals, targets)
        return self.detect(features, proposals, paste_masks=paste_masks), {}

    def box_outputs(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(self.box_pool(features, boxes)))

    def mask_logits(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        return self.mask_predictor(self.mask_head(self.mask_pool(features, boxes)))

    def losses(
        self, features: list[Tensor], proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        gt_boxes, gt_labels, gt_masks = non_crowd_instances(targets)
        sample = sample_proposals(proposals, gt_boxes, gt_labels, self.config)
        loss_classifier, loss_box_reg = box_losses(
            *self.box_outputs(features, sample.proposals), sample
        )

        positives = [p[:n] for p, n in zip(sample.proposals, sample.num_positive, strict=True)]
        size = 2 * self.config.mask_pool_size  # the predictor's deconv doubles the pooled size
        targets_m = mask_targets(gt_masks, positives, sample.matched_gt, size)
        labels = sample.labels[sample.positive_index]
        loss_mask = mask_loss(self.mask_logits(features, positives), labels, targets_m)
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask,
        }

    def detect(
        self, features: list[Tensor], proposals: list[Tensor], *, paste_masks: bool = True
    ) -> list[dict[str, Tensor]]:
        """Detections with ``masks`` on the canvas, or (``paste_masks`` False) with each one's
        mask probabilities over its box, ``mask_probs [N, 1, M, M]``."""
        class_logits, box_deltas = self.box_outputs(features, proposals)
        detections = select_detections(
            class_logits.float(),
            box_deltas.float(),
            proposals,
            canvas=self.canvas,
            config=self.config,
        )
        boxes = [d["boxes"] for d in detections]
        probs = self.mask_logits(features, boxes).float().sigmoid()
        labels = torch.cat([d["labels"] for d in detections])
        probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
        for det, img_probs in zip(detections, probs.split([len(b) for b in boxes]), strict=True):
            if paste_masks:
                canvas = (self.canvas, self.canvas)
                det["masks"] = postprocess.paste_masks(img_probs, det["boxes"], canvas)
            else:
                det["mask_probs"] = img_probs
        return detections
