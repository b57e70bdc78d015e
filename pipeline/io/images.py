"""Encoded image bytes -> uint8 RGB pixels: the one decoder every stage uses.

Preprocess (original files), the training loader and evaluation (shard images), predict and
the MLflow pyfunc (files or request bytes) all call ``decode_chw`` or its channels-last view
``decode_rgb``, so an image gives the same pixels in training, evaluation and serving.

The pixel contract: EXIF orientation applied (a phone photo stored sideways is shown upright,
and its COCO height/width describe the upright image), every pixel format brought to 8-bit RGB
(alpha dropped, palettes expanded, 16-bit grey scaled to 8 bits, grey repeated), as PIL shows
it. RGB or grey JPEG and 8-bit RGB or grey PNG go through torchvision's decoder instead
(channels-first without PIL's extra copies, docs/benchmarks.md, "Loader"), which gives PIL's
pixels for them (tests/pipeline/test_pixels.py), unless their orientation sits where only PIL
reads it (XMP, PNG text chunks). Everything else, and every error message, comes from PIL.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG = (b"\x08\x00", b"\x08\x02")  # IHDR bit depth 8; colour type grey, RGB
_EXIF, _PIL_ONLY = "exif", "pil only"  # where an image keeps its orientation


class ImageReadError(ValueError):
    """The file is missing, not an image, truncated or in a format that has no RGB meaning."""


def read_rgb(source: Path | bytes) -> np.ndarray:
    """The HxWx3 uint8 RGB pixels of an image file (a local path, or the file's bytes when it
    was read from object storage), as ``decode_rgb`` gives them."""
    if isinstance(source, Path):
        if not source.is_file():
            raise ImageReadError("image file not found")
        try:
            source = source.read_bytes()
        except OSError as error:
            raise ImageReadError(f"cannot read the image file: {error}") from None
    return decode_rgb(source)


def decode_rgb(data: bytes) -> np.ndarray:
    """HxWx3 uint8 RGB (C-contiguous) of encoded image bytes: ``decode_chw``, channels last."""
    return np.ascontiguousarray(decode_chw(data).permute(1, 2, 0).numpy())


def decode_chw(data: bytes) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB of encoded image bytes; ImageReadError when they are not one.

    The result may be a view (strided or expanded): copy it before writing into it.
    """
    fast = _decode_torchvision(bytes(data))
    if fast is not None:
        return fast
    return torch.from_numpy(_decode_pil(bytes(data))).permute(2, 0, 1)


def _decode_torchvision(data: bytes) -> torch.Tensor | None:
    """8-bit RGB or grey JPEG/PNG via torchvision, or None to leave the bytes to PIL."""
    if data.startswith(_JPEG):
        orientation = _jpeg_orientation(data)
    elif _plain_png(data):
        orientation = _png_orientation(data)
    else:
        return None
    if orientation == _PIL_ONLY:
        return None
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        # Reading EXIF costs torchvision ~15 % of a JPEG decode: only asked for when present.
        pixels = decode_image(
            encoded, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=orientation == _EXIF
        )
    except RuntimeError:
        return None  # truncated, corrupt or unsupported: PIL decodes it or says why not
    if pixels.dtype != torch.uint8 or pixels.shape[0] not in (1, 3):
        return None  # 16-bit, alpha, CMYK: PIL's conversions define those
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


def _plain_png(data: bytes) -> bool:
    """A PNG of 8-bit grey or RGB samples, by its header (IHDR: bit depth, colour type).

    Palette PNGs are left to PIL: torchvision returns their palette indices unchanged.
    """
    return data.startswith(_PNG) and data[12:16] == b"IHDR" and data[24:26] in _PLAIN_PNG


def _jpeg_orientation(data: bytes) -> str | None:
    """Where a JPEG may keep its orientation: ``_EXIF``, ``_PIL_ONLY`` (XMP, which PIL honours
    when EXIF has none and torchvision ignores) or None. Walks the segment headers only."""
    found, at = None, 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more metadata
            break
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xE1:  # APP1: EXIF or XMP
            body = data[at + 4 : end]
            if b"tiff:Orientation" in body:
                return _PIL_ONLY
            if body.startswith(b"Exif\x00\x00"):
                found = _EXIF
        at = end
    return found


def _png_orientation(data: bytes) -> str | None:
    """Where a PNG may keep its orientation: ``_EXIF`` (an eXIf chunk before the pixels),
    ``_PIL_ONLY`` (text chunks: XMP, ImageMagick's raw EXIF profile; or an eXIf chunk after
    the pixels) or None. Walks the chunk headers only."""
    found, at, seen_pixels = None, 8, False
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        if kind in (b"tEXt", b"zTXt", b"iTXt") and data[at + 8 : at + 8 + length].startswith(
            (b"Raw profile type exif", b"XML:com.adobe.xmp")
        ):
            return _PIL_ONLY
        if kind == b"eXIf":
            if seen_pixels:
                return _PIL_ONLY
            found = _EXIF
        if kind == b"IEND":
            break
        seen_pixels |= kind == b"IDAT"
        at += 12 + length
    return found


def _decode_pil(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd metadata it then handles
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes now, so a truncated file fails here, not later
                return _pil_to_rgb(ImageOps.exif_transpose(image))
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"unreadable or truncated image: {error}") from None


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
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


def canvas_scale(height: int, width: int, canvas: int) -> float:
    """Canvas pixels per original pixel, the longer side becoming ``canvas``; rounded to
    float32 as the shards store it, so that preprocess and predict resize identically."""
    return float(np.float32(canvas / max(height, width)))
