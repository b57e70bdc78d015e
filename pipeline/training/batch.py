"""A collated training batch as one flat dict of tensors, so that it can be pinned and moved.

Ray Data pins and moves a tensor or a dict of tensors, not ``(images, list[dict])``; and one
``.to(device, non_blocking=True)`` per key from pinned memory replaces six unpinned copies per
image in the training thread. Per-instance tensors (boxes, labels, mask crops and their boxes)
are concatenated over the batch, with ``counts`` (instances per image); the RPN sample has the
same length in every image and is stacked. ``unpack_batch`` gives back the model's targets.

Masks travel as ``mask_crops`` [N, M, M] uint8 + ``mask_boxes`` (``maskrcnn.mask_crops``):
N * M^2 bytes instead of N * S^2 for full-canvas masks.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from maskrcnn.config import ModelConfig
from maskrcnn.mask_crops import fit_crop

__all__ = [
    "INSTANCE_KEYS",
    "crop_targets",
    "decode_crop",
    "mask_crop_size",
    "pack_batch",
    "prefetch_batches",
    "to_device",
    "unpack_batch",
]

INSTANCE_KEYS = ("boxes", "labels", "iscrowd", "masks", "mask_crops", "mask_boxes")
# Left on the host by ``to_device``: the split needs Python ints, and reading them from the
# device would wait for the copy.
HOST_KEYS = ("counts",)


def mask_crop_size(config: ModelConfig) -> int:
    """M of the shipped crops: twice the mask head's output (itself twice the pooled size), so
    that RoIAlign of a 28 x 28 target reads each crop pixel about once (2 samples per bin)."""
    return 4 * config.roi.mask_pool_size


def decode_crop(crop: bytes | np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """A stored mask crop's pixels at its canvas rectangle (x1, y1, x2, y2): RLE decoded at
    the rectangle's size, pixels already decoded as they are, and no pixels for an empty
    rectangle (an instance that vanished at this size). Not validated: preprocess wrote it."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1:
        return np.zeros((0, 0), np.uint8)
    if isinstance(crop, np.ndarray):
        return crop
    return mask_utils.decode({"size": [y2 - y1, x2 - x1], "counts": crop})


def crop_targets(
    crops: list[bytes | np.ndarray], rects: np.ndarray, width: int, size: int, *, flip: bool
) -> dict[str, Tensor]:
    """``mask_crops`` [N, size, size] and ``mask_boxes`` [N, 4] from the stored crops (RLE, or
    pixels already decoded) at their canvas rectangles, mirrored about ``width`` when flipped."""
    fitted, boxes = [], []
    for crop, (x1, y1, x2, y2) in zip(crops, rects, strict=True):
        pixels = decode_crop(crop, (x1, y1, x2, y2))
        if flip:
            pixels, (x1, x2) = pixels[:, ::-1], (width - x2, width - x1)
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        crop_pixels, box = fit_crop(pixels, (int(x1), int(y1), int(x2), int(y2)), size)
        fitted.append(crop_pixels)
        boxes.append(box)
    if not fitted:
        return {
            "mask_crops": torch.zeros((0, size, size), dtype=torch.uint8),
            "mask_boxes": torch.zeros((0, 4)),
        }
    return {"mask_crops": torch.stack(fitted), "mask_boxes": torch.stack(boxes)}


def pack_batch(
    images: Tensor, targets: list[dict[str, Tensor]], *, pin_memory: bool = False
) -> dict[str, Tensor]:
    """``(images, targets)`` -> one dict of tensors (pinned when ``pin_memory``: only with a
    CUDA device, pinning allocates page-locked host memory through the CUDA driver)."""
    batch = {"images": images, "counts": torch.tensor([len(t["boxes"]) for t in targets])}
    for key in targets[0] if targets else ():
        parts = [t[key] for t in targets]
        batch[key] = torch.cat(parts) if key in INSTANCE_KEYS else torch.stack(parts)
    if pin_memory:
        batch = {k: v if k in HOST_KEYS else v.pin_memory() for k, v in batch.items()}
    return batch


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor but ``counts`` on ``device``, copied without blocking (asynchronous from
    pinned memory, so the copies overlap the previous step's kernels)."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


def unpack_batch(batch: dict[str, Tensor]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """A packed batch -> ``images`` and the model's per-image target dicts (views, no copy)."""
    counts = batch["counts"].tolist()
    targets: list[dict[str, Tensor]] = [{} for _ in counts]
    for key, value in batch.items():
        if key in ("images", *HOST_KEYS):
            continue
        parts = value.split(counts) if key in INSTANCE_KEYS else value.unbind()
        for target, part in zip(targets, parts, strict=True):
            target[key] = part
    return batch["images"], targets


def prefetch_batches(setting: int | None, device: torch.device) -> int:
    """Batches Ray Data prepares ahead: the setting, or by default 1 on the CPU (where only
    the shard rows are read ahead: the training thread collates them) and 2 on a GPU (one being
    copied while one is collated, so the device never waits on the host)."""
    if setting is not None:
        return setting
    return 2 if device.type == "cuda" else 1
