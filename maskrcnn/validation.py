"""Input checks at the model boundary: a ValueError that names the problem, not a shape error deep
inside a kernel or a NaN loss many steps later.

Shape and dtype checks are plain Python. Value checks (finite boxes, positive box sizes, label
and anchor-index ranges) are reduced on the tensors' device. On the CPU they are read at once;
on an accelerator they are copied to pinned host memory without waiting, and the model reads
them after the RPN's proposals (which sync anyway, so the copy has landed) and before anything
that indexes with the targets: no extra host sync per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .anchors import anchor_grid
from .config import ModelConfig
from .rpn import RPN_KEYS

# The crop form of a target's masks (maskrcnn.mask_crops), instead of full-canvas ``masks``.
CROP_KEYS = ("mask_crops", "mask_boxes")


def validate_images(images: object, config: ModelConfig) -> None:
    """``images`` must be ``[B, 3, S, S]`` (S = ``config.canvas``), float or uint8."""
    s = config.canvas
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a tensor [B, 3, {s}, {s}], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"images must have rank 4 [B, 3, {s}, {s}], got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
        raise ValueError(
            f"images must be [B, 3, {s}, {s}] (B >= 1, 3 channels, canvas {s}), "
            f"got shape {tuple(images.shape)}"
        )
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")


def validate_targets(targets: object, batch_size: int, config: ModelConfig) -> ValueCheck:
    """Training targets: one dict per image with boxes, labels, masks or mask_crops +
    mask_boxes (+ optional RPN sample).

    Structure errors raise here; the value check comes back to be read with ``raise_if_bad``
    (on the CPU it has already been read)."""
    if not isinstance(targets, Sequence) or isinstance(targets, (str, bytes)):
        raise ValueError("training needs targets: a list with one dict per image")
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
    has_rpn = [_check_structure(t, i, config) for i, t in enumerate(targets)]
    if any(has_rpn) and not all(has_rpn):
        raise ValueError("either every target or none has the rpn_idx/rpn_labels/rpn_deltas sample")
    if all(has_rpn) and len({len(t["rpn_idx"]) for t in targets}) > 1:
        raise ValueError("rpn_idx must have the same length in every target of a batch")
    check = ValueCheck.start(targets, config)
    if check.event is None:
        check.raise_if_bad()
    return check


def _check_structure(target: object, i: int, config: ModelConfig) -> bool:
    """Keys, shapes and dtypes of target ``i``; returns whether it carries the RPN sample."""
    if not isinstance(target, dict):
        raise ValueError(f"target {i} must be a dict, got {type(target).__name__}")
    mask_keys = ("masks",) if "masks" in target or "mask_crops" not in target else CROP_KEYS
    missing = [k for k in ("boxes", "labels", *mask_keys) if k not in target]
    if missing:
        raise ValueError(f"target {i} lacks {missing}")
    boxes, labels = target["boxes"], target["labels"]
    _expect(i, "boxes", boxes, (None, 4))
    n = boxes.shape[0]
    if not boxes.is_floating_point():
        raise ValueError(f"target {i}: boxes must be float, got {boxes.dtype}")
    _expect(i, "labels", labels, (n,))
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"target {i}: labels must be an integer tensor, got {labels.dtype}")
    if "masks" in target:
        _expect(i, "masks", target["masks"], (n, config.canvas, config.canvas))
    else:
        _expect(i, "mask_crops", target["mask_crops"], (n, None, None))
        _expect(i, "mask_boxes", target["mask_boxes"], (n, 4))
    if "iscrowd" in target:
        _expect(i, "iscrowd", target["iscrowd"], (n,))
    present = [k for k in RPN_KEYS if k in target]
    if present and len(present) != len(RPN_KEYS):
        raise ValueError(f"target {i} has {present} but needs all of {list(RPN_KEYS)}")
    if present:
        _expect(i, "rpn_idx", target["rpn_idx"], (None,))
        k = target["rpn_idx"].shape[0]
        _expect(i, "rpn_labels", target["rpn_labels"], (k,))
        _expect(i, "rpn_deltas", target["rpn_deltas"], (k, 4))
        if target["rpn_idx"].is_floating_point():
            raise ValueError(f"target {i}: rpn_idx must be an integer tensor")
    return bool(present)


def _expect(i: int, name: str, value: object, shape: tuple[int | None, ...]) -> None:
    want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
    if not isinstance(value, Tensor):
        raise ValueError(f"target {i}: {name} must be a tensor {want}, got {type(value).__name__}")
    ok = value.dim() == len(shape) and all(
        s is None or s == v for s, v in zip(shape, value.shape, strict=True)
    )
    if not ok:
        raise ValueError(f"target {i}: {name} must have shape {want}, got {tuple(value.shape)}")


@dataclass(frozen=True)
class ValueCheck:
    """``flags [B, 4]`` (bool, on the host): which value check each image fails; ``event``
    marks the end of their copy from the device (None when computed on the CPU)."""

    flags: Tensor
    problems: tuple[str, ...]
    event: torch.cuda.Event | None = None

    @classmethod
    def start(cls, targets: Sequence[dict[str, Tensor]], config: ModelConfig) -> ValueCheck:
        num_anchors = anchor_grid(config.canvas, config.anchors).num_anchors
        problems = (
            "boxes contain NaN or inf",
            "a box has x2 <= x1 or y2 <= y1 (boxes must have positive width and height)",
            f"labels must be in 1..{config.num_classes - 1}",
            f"rpn_idx must be in 0..{num_anchors - 1}",
        )
        flags = torch.stack([_image_flags(t, config.num_classes, num_anchors) for t in targets])
        if flags.device.type != "cuda":
            return cls(flags.cpu(), problems)
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, problems, event)

    def raise_if_bad(self) -> None:
        """A ValueError naming the first image and check that failed, if any."""
        if self.event is not None:
            self.event.synchronize()  # recorded before the model's own syncs: already done
        if self.flags.any():
            image, check = (int(v) for v in self.flags.nonzero()[0])
            raise ValueError(f"target {image}: {self.problems[check]}")


def _image_flags(target: dict[str, Tensor], num_classes: int, num_anchors: int) -> Tensor:
    boxes, labels = target["boxes"], target["labels"]
    finite = torch.isfinite(boxes).all()
    degenerate = ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()
    bad_label = ((labels < 1) | (labels >= num_classes)).any()
    idx = target.get("rpn_idx", labels.new_zeros(0))
    bad_idx = ((idx < 0) | (idx >= num_anchors)).any()
    return torch.stack([c.to(boxes.device) for c in (~finite, degenerate, bad_label, bad_idx)])
