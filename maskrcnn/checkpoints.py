"""Weights in and out: torchvision Mask R-CNN and ImageNet ResNet files, and our own format.

Every loader reads a local file with ``torch.load(weights_only=True)`` and compares its keys and
shapes with the model before loading, so a wrong file fails with a ValueError naming the file and
the keys that do not fit, instead of a half-loaded model. BatchNorm's ``num_batches_tracked``
counters are ignored both ways (FrozenBatchNorm2d has none).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .model import MaskRCNN

FORMAT = "maskrcnn-pipeline/1"
CLASS_SPECIFIC = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")
_SHOWN = 8
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


@dataclass(frozen=True)
class LoadResult:
    """What a loader did: how many tensors it loaded, which file keys it left out, and why."""

    path: str
    loaded: int
    skipped: tuple[str, ...] = ()
    note: str = ""


def load_torchvision_maskrcnn(model: MaskRCNN, path: str | os.PathLike) -> LoadResult:
    """Load a torchvision ``maskrcnn_resnet50_fpn`` state dict (optionally under ``"model"``).

    When the file has another number of classes, everything but the class-specific predictor
    layers is loaded; those keep their initialisation and the result says so.
    """
    return load_maskrcnn_state(
        model,
        _read_state_dict(path),
        source=str(path),
        what="a torchvision Mask R-CNN state dict for this model",
    )


def load_maskrcnn_state(
    model: MaskRCNN,
    state: Mapping[str, Tensor],
    *,
    source: str,
    same_classes: bool = True,
    what: str = "a Mask R-CNN state dict for this model",
) -> LoadResult:
    """Load a whole Mask R-CNN state dict (a parent model to fine-tune, a torchvision file).

    The class-specific predictor layers (``CLASS_SPECIFIC``) keep their initialisation when
    their shapes differ (another class count) or the caller says the classes differ
    (``same_classes=False``: same count, other categories); the note names those layers and
    both class counts. Every other tensor loads strictly: a missing, unexpected or misshapen
    one is a ValueError naming ``source`` and the tensor.
    """
    state = dict(state)
    missing, unexpected, mismatched = _compare(model.state_dict(), state)
    fresh = [k for k in mismatched if _class_specific(k)]
    mismatched = [k for k in mismatched if not _class_specific(k)]
    _raise_if_unfit(source, what, missing, unexpected, mismatched)
    skipped: list[str] = []
    note = ""
    if fresh or not same_classes:
        skipped = sorted(k for k in state if _class_specific(k))
        old = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        why = "num_classes differs" if fresh else "the categories differ"
        note = (
            f"{why} (file {old}, model {model.config.num_classes}): "
            f"{', '.join(p.rstrip('.') for p in CLASS_SPECIFIC)} start fresh"
        )
    kept = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(kept, strict=not skipped)
    return LoadResult(path=source, loaded=len(kept), skipped=tuple(skipped), note=note)


def read_model_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a model file written by ``save_model`` (to fine-tune from it)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        raise ValueError(f"{path}: cannot read a model file ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model file")
    return dict(payload["state_dict"])


def load_imagenet_backbone(model: MaskRCNN, path: str | os.PathLike) -> LoadResult:
    """Load a torchvision ImageNet ResNet state dict into ``backbone.body`` (``fc.*`` ignored).

    A GroupNorm backbone takes the affine weights; the file's running statistics are skipped.
    """
    state = _read_state_dict(path)
    skipped = [k for k in state if k.startswith("fc.")]
    if model.config.norm == "gn":
        skipped += [k for k in state if k.endswith(_NORM_STATS)]
    kept = {k: v for k, v in state.items() if k not in skipped}
    body = model.backbone.body
    missing, unexpected, mismatched = _compare(body.state_dict(), kept)
    _raise_if_unfit(
        path, f"an ImageNet {model.config.backbone} state dict", missing, unexpected, mismatched
    )
    body.load_state_dict(kept, strict=True)
    note = "fc.* is the classifier, not part of the backbone"
    if model.config.norm == "gn":
        note += "; GroupNorm has no running statistics"
    return LoadResult(path=str(path), loaded=len(kept), skipped=tuple(sorted(skipped)), note=note)


def save_model(
    model: MaskRCNN,
    path: str | os.PathLike,
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write ``{"format", "config", "state_dict"}`` to one torch file (atomically), plus
    ``"categories"`` ([{id, name, label}], label 1..num_classes-1) when given, so that the
    file alone names its classes (predict, register)."""
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
    }
    if categories is not None:
        payload["categories"] = _checked_categories(categories, model.config.num_classes, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_model_info(path: str | os.PathLike) -> tuple[ModelConfig, list[dict[str, Any]] | None]:
    """A model file's configuration and its categories ([{id, name, label}]) if it stores
    them, without building the model (the tensors are memory-mapped, not read)."""
    if not Path(path).is_file():
        raise ValueError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _UNREADABLE as err:
        raise ValueError(f"{path}: cannot read a model file ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model file")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot read a model file ({err})") from err
    categories = payload.get("categories")
    return config, [dict(c) for c in categories] if categories else None


def _checked_categories(
    categories: Sequence[Mapping[str, Any]], num_classes: int, path: Path
) -> list[dict[str, Any]]:
    """Plain ``{id, name, label}`` dicts (what ``weights_only`` loading accepts), or a
    ValueError naming the entry that lacks a key or has a label the model cannot output."""
    out = []
    for i, category in enumerate(categories):
        try:
            entry = {
                "id": int(category["id"]),
                "name": str(category["name"]),
                "label": int(category["label"]),
            }
        except (KeyError, TypeError, ValueError) as err:
            reason = f"category {i} {category!r} needs an int id, a name and an int label"
            raise ValueError(f"{path}: {reason} ({err})") from None
        if not 1 <= entry["label"] < num_classes:
            raise ValueError(
                f"{path}: category {i} has label {entry['label']}, outside 1..{num_classes - 1} "
                f"of a model with num_classes={num_classes}"
            )
        out.append(entry)
    return out


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> MaskRCNN:
    """A model written by ``save_model``, with its exact configuration."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as err:
        raise ValueError(f"{path}: cannot read a model file ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model file")
    model = MaskRCNN(ModelConfig.from_dict(payload["config"]))
    missing, unexpected, mismatched = _compare(model.state_dict(), payload["state_dict"])
    _raise_if_unfit(path, "a state dict matching its own config", missing, unexpected, mismatched)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location)


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        raise ValueError(
            f"{path}: not a torch checkpoint readable with weights_only=True ({err})"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    return state


def _compare(
    expected: dict[str, Tensor], given: dict[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Keys the model needs but the file lacks, keys the model lacks, and shape mismatches."""
    want = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    have = {k: v for k, v in given.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(
        f"{k} (file {tuple(have[k].shape)}, model {tuple(want[k].shape)})"
        for k in set(want) & set(have)
        if have[k].shape != want[k].shape
    )
    return missing, unexpected, mismatched


def _class_specific(key: str) -> bool:
    return key.startswith(CLASS_SPECIFIC)


def _raise_if_unfit(
    path: str | os.PathLike,
    what: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> None:
    parts = [
        f"{label} ({len(keys)}): {keys[:_SHOWN]}{' ...' if len(keys) > _SHOWN else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if parts:
        raise ValueError(f"{path} is not {what}: " + "; ".join(parts))
