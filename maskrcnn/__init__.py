"""Mask R-CNN on a fixed canvas: torch + torchvision only (no Ray, MLflow or DVC)."""

from .anchors import AnchorGrid, anchor_config_hash, anchor_grid, canvas_anchors
from .checkpoints import (
    LoadResult,
    load_imagenet_backbone,
    load_model,
    load_torchvision_maskrcnn,
    save_model,
)
from .config import AnchorConfig, ModelConfig, RoIConfig, RPNConfig
from .model import MaskRCNN
from .postprocess import to_original
from .rpn_targets import RPNSample, RPNTargets, build_rpn_targets, sample_rpn_targets

__all__ = [
    "AnchorConfig",
    "AnchorGrid",
    "LoadResult",
    "MaskRCNN",
    "ModelConfig",
    "RPNConfig",
    "RPNSample",
    "RPNTargets",
    "RoIConfig",
    "anchor_config_hash",
    "anchor_grid",
    "build_rpn_targets",
    "canvas_anchors",
    "load_imagenet_backbone",
    "load_model",
    "load_torchvision_maskrcnn",
    "sample_rpn_targets",
    "save_model",
    "to_original",
]
