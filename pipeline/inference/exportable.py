"""The model's eval forward for one image, in a form that ``torch.export`` can trace.

``MaskRCNN``'s eval path branches on data-dependent sizes (torchvision's ``batched_nms`` picks
its algorithm by the number of boxes, mask pasting loops over the detections, several steps read
sizes with ``len()``), which ``torch.export`` and so ``torch.onnx.export`` cannot trace.
``ExportableMaskRCNN`` runs the same modules with the same weights, step for step as the model
(normalise, backbone, RPN top-k / decode / clip / small-box removal / NMS, multi-level RoIAlign,
box head and per-class NMS, mask head, paste onto the canvas), with three closed forms:

- grouped NMS: boxes of different groups (FPN levels, classes) are moved apart by a multiple of
  the canvas size before one NMS. Every box lies inside the canvas, so groups never overlap: the
  kept set is the per-group one, as in torchvision's own "coordinate trick";
- RoIAlign per level: ``torch.where`` per level and an indexed write, no host-side sizes;
- mask pasting: ``rows @ mask @ cols^T`` with torchvision's padded mask, expanded integer box and
  bilinear (``align_corners=False``) resize weights, zero outside the box.

The ONNX test compares it, run by onnxruntime, with the model's own eval forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes, roi_align

from maskrcnn.anchors import STRIDES
from maskrcnn.box_ops import decode_boxes
from maskrcnn.model import MaskRCNN
from maskrcnn.rpn import flatten_head_outputs

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
_UNIT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
_PASTE_PADDING = 1  # torchvision pads each mask by one cell before resizing it into its box


class ExportableMaskRCNN(nn.Module):
    """``images [1, 3, S, S]`` (uint8 or float in [0, 1]) -> boxes ``[N, 4]``, labels ``[N]``,
    scores ``[N]``, masks ``[N, 1, S, S]`` (probabilities), as ``MaskRCNN`` in eval mode."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model.eval()
        self.canvas = model.config.canvas
        anchors, levels = model.rpn.anchors_and_levels(torch.device("cpu"))
        # Buffers, so that the export holds them as constants and not as cached tensors.
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.register_buffer("anchor_levels", levels.clone(), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        features = list(model.backbone(model.normalize(images)).values())  # P2..P6
        objectness, deltas = flatten_head_outputs(*model.rpn.head(features))
        proposals = self.propose(objectness[0].float(), deltas[0].float())
        heads = model.roi_heads
        pooled = self.pool(heads.box_pool, features[:4], proposals)
        class_logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
        boxes, labels, scores = self.select(class_logits.float(), box_deltas.float(), proposals)
        pooled = self.pool(heads.mask_pool, features[:4], boxes)
        probs = heads.mask_predictor(heads.mask_head(pooled)).float().sigmoid()
        probs = probs[torch.arange(labels.shape[0], device=labels.device), labels][:, None]
        return boxes, labels, scores, paste_masks_dense(probs, boxes, self.canvas)

    def propose(self, objectness: Tensor, deltas: Tensor) -> Tensor:
        """One image's proposals: ``RPN.propose`` with the grouped NMS in closed form."""
        cfg = self.model.rpn.config
        top, offset = [], 0
        for level_scores in objectness.split(self.model.rpn.level_sizes):
            k = min(cfg.pre_nms_top_n_test, level_scores.shape[0])
            top.append(level_scores.topk(k).indices + offset)
            offset += level_scores.shape[0]
        top_idx = torch.cat(top)
        scores = objectness[top_idx].sigmoid()
        boxes = decode_boxes(deltas[top_idx][:, None], self.anchors[top_idx], _UNIT_WEIGHTS)[:, 0]
        boxes = clip_boxes_to_image(boxes, (self.canvas, self.canvas))
        levels = self.anchor_levels[top_idx]
        keep = remove_small_boxes(boxes, cfg.min_size)
        keep = keep[scores[keep] >= cfg.score_thresh]
        keep = keep[self.grouped_nms(boxes[keep], scores[keep], levels[keep], cfg.nms_thresh)]
        return boxes[keep[: cfg.post_nms_top_n_test]]

    def select(
        self, class_logits: Tensor, box_deltas: Tensor, proposals: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``select_detections`` for one image: boxes, labels, scores of the kept detections."""
        cfg = self.model.roi_heads.config
        num_classes = class_logits.shape[-1]
        boxes = decode_boxes(
            box_deltas.reshape(box_deltas.shape[0], num_classes, 4), proposals, cfg.bbox_reg_weights
        )
        scores = F.softmax(class_logits, -1)
        boxes = clip_boxes_to_image(boxes, (self.canvas, self.canvas))[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, num_classes, device=scores.device).repeat(scores.shape[0])
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > cfg.score_thresh)[0]
        keep = keep[remove_small_boxes(boxes[keep], cfg.min_size)]
        keep = keep[self.grouped_nms(boxes[keep], scores[keep], labels[keep], cfg.nms_thresh)]
        keep = keep[: cfg.detections_per_img]
        return boxes[keep], labels[keep], scores[keep]

    def grouped_nms(
        self, boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float
    ) -> Tensor:
        """``batched_nms`` for boxes inside the canvas: groups moved apart, then one NMS."""
        offsets = groups.to(boxes.dtype) * (self.canvas + 1)
        return nms(boxes + offsets[:, None], scores, threshold)

    @staticmethod
    def pool(pooler: nn.Module, features: list[Tensor], boxes: Tensor) -> Tensor:
        """``MultiLevelRoIAlign`` for one image's boxes ``[R, 4]``: each from its FPN level."""
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
        levels = pooler.levels(boxes)
        first = features[0]
        pooled = first.new_zeros((boxes.shape[0], first.shape[1], *pooler.output_size))
        for level, (feature, stride) in enumerate(zip(features, STRIDES[:4], strict=True)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(
                feature,
                rois[index],
                pooler.output_size,
                1.0 / stride,
                pooler.sampling_ratio,
                aligned=False,
            )
        return pooled


def paste_masks_dense(masks: Tensor, boxes: Tensor, canvas: int) -> Tensor:
    """torchvision's ``paste_masks_in_image`` onto an S x S canvas as two matrix products per
    mask: ``[N, 1, M, M]`` probabilities in ``boxes [N, 4]`` -> ``[N, 1, S, S]``."""
    size = masks.shape[-1] + 2 * _PASTE_PADDING
    padded = F.pad(masks[:, 0], (_PASTE_PADDING,) * 4)
    corners = expand_boxes(boxes, size / masks.shape[-1]).to(torch.int64)
    rows = _resize_weights(corners[:, 1], corners[:, 3], size, canvas)
    cols = _resize_weights(corners[:, 0], corners[:, 2], size, canvas)
    return torch.matmul(torch.matmul(rows, padded), cols.transpose(1, 2))[:, None]


def _resize_weights(first: Tensor, last: Tensor, size: int, canvas: int) -> Tensor:
    """``[N, canvas, size]``: how each canvas pixel along one axis reads a ``size``-cell mask
    resized bilinearly onto pixels ``first..last`` (ATen's source index ``(i + 0.5) * size /
    length - 0.5`` clamped at 0, in float32); zero outside those pixels."""
    length = (last - first + 1).clamp(min=1)
    offset = torch.arange(canvas, device=first.device)[None, :] - first[:, None]
    inside = (offset >= 0) & (offset < length[:, None])
    ratio = size / length.to(torch.float32)
    source = (ratio[:, None] * (offset.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = source.floor().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    frac = source - low
    cells = torch.arange(size, device=first.device, dtype=torch.float32)
    weights = (1 - frac)[..., None] * (cells == low[..., None]) + frac[..., None] * (
        cells == high[..., None]
    )
    return weights * inside[..., None]
