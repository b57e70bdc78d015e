"""Decoding image files to HxWx3 uint8 RGB, the way every stage must see them.

EXIF orientation is applied (a phone photo stored sideways is shown upright, and its COCO
height/width describe the upright image), and every pixel format is brought to 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageReadError(ValueError):
    """The file is missing, not an image, truncated or in a format that has no RGB meaning."""


def read_rgb(source: Path | bytes) -> np.ndarray:
    """The HxWx3 uint8 RGB pixels of an image file, EXIF orientation applied.

    ``source`` is a local path, or the file's bytes when it was read from object storage.
    """
    if isinstance(source, Path) and not source.is_file():
        raise ImageReadError("image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd metadata it then handles
            opened = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(opened) as image:
                image.load()  # decodes now, so a truncated file fails here, not later
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"unreadable or truncated image: {error}") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of any PIL image: alpha dropped, 16-bit grey scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.float64)
        grey8 = np.rint(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if image.mode == "F":
        grey8 = np.rint(np.clip(np.asarray(image), 0, 255)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # honours palette transparency before alpha is dropped
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as error:
        reason = f"image mode {image.mode} cannot be converted to RGB: {error}"
        raise ImageReadError(reason) from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (height, width) of an image resized by ``scale``: round(h * scale), round(w * scale).

    The one definition of the resized size, shared by images, masks and boxes.
    """
    return max(1, round(height * scale)), max(1, round(width * scale))
