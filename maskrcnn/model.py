"""Mask R-CNN on a fixed S x S canvas, with torchvision's module names and numerics.

Inputs are already on the canvas (no resize, no padding step): the model normalises them and
runs backbone -> RPN -> RoI heads. ``model(images, targets)`` returns the five losses in training
and ``list[dict(boxes, labels, scores, masks)]`` in evaluation, as torchvision's ``MaskRCNN``;
``model(images, paste_masks=False)`` gives each detection's mask probabilities over its own box
(``mask_probs [N, 1, M, M]``) instead, for a caller that pastes them at another size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import build_backbone
from .config import ModelConfig
from .roi_heads import RoIHeads
from .rpn import RPN
from .validation import validate_images, validate_targets

Detections = list[dict[str, Tensor]]


class MaskRCNN(nn.Module):
    """``backbone`` (ResNet-FPN), ``rpn`` and ``roi_heads``; state-dict keys as torchvision's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.rpn = RPN(config)
        self.roi_heads = RoIHeads(config)
        # Not persistent: torchvision's checkpoints have no such keys.
        self.register_buffer(
            "image_mean", torch.tensor(config.image_mean)[:, None, None], persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(config.image_std)[:, None, None], persistent=False
        )

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] float images -> mean/std normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        *,
        paste_masks: bool = True,
    ) -> dict[str, Tensor] | Detections:
        """``images [B, 3, S, S]``; ``targets`` (training only) as in docs/design.md;
        ``paste_masks`` (evaluation): masks on the canvas, else ``mask_probs`` per box."""
        validate_images(images, self.config)
        check = validate_targets(targets, images.shape[0], self.config) if self.training else None
        features = list(self.backbone(self.normalize(images)).values())  # P2..P6
        # An accelerator's value check is read once the RPN's proposals have synced anyway.
        proposals, rpn_losses = self.rpn(
            features, targets, before_loss=check.raise_if_bad if check else None
        )
        detections, roi_losses = self.roi_heads(
            features[:4], proposals, targets, paste_masks=paste_masks
        )
        return {**rpn_losses, **roi_losses} if self.training else detections
