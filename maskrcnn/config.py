"""Typed model configuration.

Defaults are torchvision's ``maskrcnn_resnet50_fpn`` settings, so ``ModelConfig(num_classes=91)``
describes the COCO model. Smaller backbones and heads are just other values, for CPU runs and tests.
The configuration is plain data: it round-trips through JSON (``to_dict`` / ``from_dict``) so that
a saved model carries the exact configuration it was built with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen_bn", "bn", "syncbn", "gn")


@dataclass(frozen=True, kw_only=True)
class AnchorConfig:
    """One anchor size per FPN level (P2..P6) and the aspect ratios (height / width) at each."""

    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        if len(self.sizes) != 5:
            raise ValueError(f"anchors.sizes needs one size per level P2..P6 (5), got {self.sizes}")
        if any(s <= 0 for s in self.sizes) or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError("anchor sizes and aspect ratios must be positive")


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    """Region proposal network: matching (offline), sampling, and proposal selection."""

    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    # An anchor whose intersection with a crowd region covers at least this fraction of the
    # anchor's own area is ignored rather than negative (Detectron's crowd filter).
    crowd_ioa_thresh: float = 0.7
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_iou_thresh <= self.fg_iou_thresh <= 1.0:
            raise ValueError("rpn thresholds need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1")
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ValueError("rpn.positive_fraction must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class RoIConfig:
    """Box and mask heads: proposal sampling, pooling, head sizes and inference thresholds."""

    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_pool_size: int = 7
    mask_pool_size: int = 14
    sampling_ratio: int = 2
    canonical_scale: int = 224
    canonical_level: int = 4
    representation_size: int = 1024
    mask_layers: tuple[int, ...] = (256, 256, 256, 256)
    mask_dilation: int = 1
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float = 1e-2

    def __post_init__(self) -> None:
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ValueError("roi.positive_fraction must be in (0, 1]")
        if not self.mask_layers:
            raise ValueError("roi.mask_layers needs at least one conv layer")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Mask R-CNN on a fixed S x S canvas.

    ``num_classes`` counts the background, as in torchvision (COCO: 80 classes -> 91 ids, and
    ``num_classes=91`` for torchvision's checkpoint). Contiguous labels are 1..num_classes-1.
    """

    num_classes: int
    backbone: str = "resnet50"
    canvas: int = 1024
    norm: str = "frozen_bn"
    trainable_backbone_layers: int = 5
    fpn_channels: int = 256
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes counts the background and must be >= 2, got {self.num_classes}"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.canvas <= 0 or self.canvas % 64:
            raise ValueError(
                f"canvas must be a positive multiple of 64 (P6 has stride 64), got {self.canvas}"
            )
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError("trainable_backbone_layers must be in 0..5")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a (possibly partial) dict, as read from JSON or params.yaml."""
        nested = {"anchors": AnchorConfig, "rpn": RPNConfig, "roi": RoIConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in nested:
                kwargs[key] = _build_section(nested[key], value or {}, key)
            elif isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _build_section(cls: type, data: dict[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown keys in model.{name}: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
