"""Detections on any image: letterbox it onto the model's canvas, run, map back to its pixels.

``Detector`` is the one inference path: the evaluate stage feeds it images already resized by
preprocess (from the shards), the predict command and the MLflow pyfunc feed it image files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from maskrcnn.checkpoints import load_model, read_model_info
from maskrcnn.model import MaskRCNN
from maskrcnn.postprocess import to_original
from pipeline.coco.masks import encode_rles
from pipeline.inference.overlay import draw_detections, save_overlay
from pipeline.io.images import canvas_scale, read_rgb, resized_size

log = logging.getLogger(__name__)

Detection = dict[str, np.ndarray]  # boxes [N,4] x1y1x2y2, labels [N], scores [N], masks [N,H,W]


def letterbox(image: np.ndarray, canvas: int) -> tuple[np.ndarray, float]:
    """The image resized so that its longer side is ``canvas`` (unpadded), and the scale used.

    The same rule and resampling as preprocess: ``resized_size`` and bilinear.
    """
    height, width = image.shape[:2]
    scale = canvas_scale(height, width, canvas)
    new_h, new_w = resized_size(height, width, scale)
    if (new_h, new_w) == (height, width):
        return image, scale
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized), scale


def conv_layout(device: torch.device) -> torch.memory_format:
    """The model's memory layout: channels_last on CPU, where oneDNN's convolutions then skip
    a reorder of every feature map (docs/benchmarks.md, "CPU levers"); elsewhere the default,
    which is not measured against it."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


class Detector:
    """A model in eval mode and its classes: images in, detections in original pixels out.

    ``categories`` is ``[{id, name, label}]`` as stored with the shards; without it a label is
    its own category id and is named ``class <label>``.
    """

    def __init__(
        self,
        model: MaskRCNN,
        *,
        categories: Sequence[Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        mask_threshold: float = 0.5,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device, memory_format=conv_layout(self.device)).eval()
        self.canvas = model.config.canvas
        self.mask_threshold = mask_threshold
        labels = range(1, model.config.num_classes)
        self.names = {label: f"class {label}" for label in labels}
        self.category_ids = {label: label for label in labels}
        for c in categories or ():
            self.names[int(c["label"])] = str(c["name"])
            self.category_ids[int(c["label"])] = int(c["id"])

    @classmethod
    def from_file(
        cls,
        model_path: str | os.PathLike,
        *,
        categories: Sequence[Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
    ) -> Detector:
        """Load a model file (``save_model``); categories from the argument, else those the
        file stores (the train stage writes the shards' categories into it)."""
        _, stored = read_model_info(model_path)
        model = load_model(model_path, map_location="cpu")
        return cls(model, categories=categories or stored, device=device)

    @torch.inference_mode()
    def detect_resized(
        self,
        images: Sequence[np.ndarray],
        *,
        scales: Sequence[float],
        sizes: Sequence[tuple[int, int]],
        score_threshold: float = 0.0,
    ) -> list[Detection]:
        """Images already resized onto the canvas (HxWx3 uint8, unpadded), their scales and
        original (height, width) -> one detection dict per image, in original pixels."""
        if not images:
            return []
        batch = torch.zeros((len(images), 3, self.canvas, self.canvas), dtype=torch.uint8)
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            if image.ndim != 3 or image.shape[2] != 3 or h > self.canvas or w > self.canvas:
                raise ValueError(
                    f"image {i}: expected HxWx3 within the model's canvas {self.canvas}, "
                    f"got shape {image.shape}"
                )
            batch[i, :, :h, :w] = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)
        # On CPUs each mask is pasted once, inside its box, at the original size; on accelerators
        # on the canvas in one batched call (no host sync per detection), then resized.
        outputs = self.model(batch.to(self.device), paste_masks=self.device.type != "cpu")
        results = []
        for output, scale, (height, width) in zip(outputs, scales, sizes, strict=True):
            keep = output["scores"] >= score_threshold
            kept = {key: value[keep] for key, value in output.items()}
            original = to_original(
                kept,
                scale=float(scale),
                height=int(height),
                width=int(width),
                mask_threshold=self.mask_threshold,
            )
            results.append({key: value.cpu().numpy() for key, value in original.items()})
        return results

    def detect(
        self, images: Sequence[np.ndarray], *, score_threshold: float = 0.0
    ) -> list[Detection]:
        """Images of any size (HxWx3 uint8 RGB) -> detections in their own pixels."""
        boxed = [letterbox(image, self.canvas) for image in images]
        return self.detect_resized(
            [resized for resized, _ in boxed],
            scales=[scale for _, scale in boxed],
            sizes=[image.shape[:2] for image in images],
            score_threshold=score_threshold,
        )

    def to_record(self, detection: Detection) -> dict[str, Any]:
        """One image's detections as JSON-ready lists, masks as COCO compressed RLE."""
        masks = detection["masks"]  # [N, H, W], also when N is 0
        height, width = masks.shape[1:]
        labels = [int(v) for v in detection["labels"]]
        return {
            "boxes": [[round(float(v), 2) for v in box] for box in detection["boxes"]],
            "labels": labels,
            "category_ids": [self.category_ids.get(label, label) for label in labels],
            "category_names": [self.names.get(label, f"class {label}") for label in labels],
            "scores": [round(float(v), 5) for v in detection["scores"]],
            "masks": [
                {"size": [int(height), int(width)], "counts": c.decode()}
                for c in encode_rles(masks)
            ],
        }

    def overlay(self, image: np.ndarray, detection: Detection) -> Image.Image:
        return draw_detections(
            image,
            boxes=detection["boxes"],
            labels=detection["labels"],
            scores=detection["scores"],
            masks=detection["masks"],
            names=self.names,
        )


def check_images(images: Sequence[str | os.PathLike]) -> list[Path]:
    """The image paths, or a ValueError naming the missing ones (before any model work)."""
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no images given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"image files not found: {', '.join(missing)}")
    return paths


def predict_files(
    *,
    detector: Detector,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    score_threshold: float = 0.5,
    batch_size: int = 1,
) -> Path:
    """Detect on image files; write ``detections.json`` and ``overlays/<name>.png`` to out_dir.

    Missing files are reported before any model work; an unreadable one when its batch comes.
    """
    paths = check_images(images)
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    names: set[str] = set()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = [_read(path) for path in chunk]
        detections = detector.detect(pixels, score_threshold=score_threshold)
        for path, image, detection in zip(chunk, pixels, detections, strict=True):
            name = path.stem if path.stem not in names else f"{path.stem}_{len(records)}"
            names.add(name)
            overlay = save_overlay(
                detector.overlay(image, detection), out / "overlays" / f"{name}.png"
            )
            height, width = image.shape[:2]
            records.append(
                {
                    "file": str(path),
                    "height": height,
                    "width": width,
                    **detector.to_record(detection),
                    "overlay": str(overlay),
                }
            )
            log.info("%s: %d detections", path, len(detection["scores"]))
    target = out / "detections.json"
    target.write_text(json.dumps(records, indent=1) + "\n")
    return target


def _read(path: Path) -> np.ndarray:
    try:
        return read_rgb(path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
