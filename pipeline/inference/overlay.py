"""Detections drawn on their image: translucent masks with outlines, boxes, "class score" labels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (Tableau 10), one per class label, cycling past ten.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def class_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def draw_detections(
    image: np.ndarray,
    *,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    names: Mapping[int, str],
    alpha: float = 0.45,
) -> Image.Image:
    """The HxWx3 uint8 ``image`` with each detection drawn, the highest score on top.

    ``boxes`` [N, 4] x1y1x2y2 and ``masks`` [N, H, W] (0/1) in the image's own pixels;
    ``names`` maps a label to its class name.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections wants an HxWx3 image, got shape {image.shape}")
    height, width = image.shape[:2]
    order = np.argsort(np.asarray(scores), kind="stable")  # lowest first, so the best is on top
    canvas = image.astype(np.float32)
    if masks is not None:
        for i in order:
            mask = np.asarray(masks[i]).astype(bool)
            colour = np.array(class_colour(labels[i]), np.float32)
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
            canvas[_outline(mask)] = colour
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(height, width) / 250))
    font = _font(max(10, round(min(height, width) / 32)))
    for i in order:
        colour = class_colour(labels[i])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        caption = f"{names.get(int(labels[i]), f'class {int(labels[i])}')} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left + 2 * line, bottom - top + 2 * line
        ty = y1 - text_h if y1 - text_h >= 0 else y1  # above the box, or inside it at the top
        tx = min(max(0.0, x1), max(0.0, width - text_w))
        draw.rectangle((tx, ty, tx + text_w, ty + text_h), fill=colour)
        draw.text((tx + line - left, ty + line - top), caption, fill=_ink(colour), font=font)
    return out


def save_overlay(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
