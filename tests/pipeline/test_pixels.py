"""One decoder, one pixel contract: PIL's pixels for every format, the same pixels in training,
evaluation and serving."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import nn

from maskrcnn.anchors import anchor_grid
from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.reader import read_coco
from pipeline.evaluation.inference import ShardPredictor
from pipeline.inference.shard_scoring import ROW_COLUMNS
from pipeline.io.images import ImageReadError, decode_chw, decode_rgb
from pipeline.registry.pyfunc import decode_image
from pipeline.shards.preprocess import encode_record
from pipeline.shards.schema import rows_to_table
from pipeline.training.loader import decode_batch

_RNG = np.random.default_rng(7)
_BASE = np.asarray(  # smooth colours, as photos have, so JPEG keeps detail to get wrong
    Image.fromarray(_RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)).resize(
        (52, 36), Image.Resampling.BILINEAR
    )
)
_GREY = _BASE[..., 0]
_PALETTE = Image.fromarray(_BASE).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
_RGBA = np.dstack([_BASE, _GREY])
_CASES = {
    "jpeg 4:2:0": (Image.fromarray(_BASE), "JPEG", {"quality": 90, "subsampling": 2}),
    "jpeg 4:2:2": (Image.fromarray(_BASE), "JPEG", {"quality": 90, "subsampling": 1}),
    "jpeg 4:4:4": (Image.fromarray(_BASE), "JPEG", {"quality": 90, "subsampling": 0}),
    "jpeg progressive": (Image.fromarray(_BASE), "JPEG", {"quality": 90, "progressive": True}),
    "jpeg grey": (Image.fromarray(_GREY), "JPEG", {"quality": 90}),
    "jpeg cmyk": (Image.fromarray(_BASE).convert("CMYK"), "JPEG", {"quality": 90}),
    "png rgb": (Image.fromarray(_BASE), "PNG", {}),
    "png grey": (Image.fromarray(_GREY), "PNG", {}),
    "png 1-bit": (Image.fromarray(_GREY > 128), "PNG", {}),
    "png palette": (_PALETTE, "PNG", {}),
    "png palette transparency": (_PALETTE, "PNG", {"transparency": 3}),
    "png rgba": (Image.fromarray(_RGBA), "PNG", {}),
    "png grey alpha": (Image.fromarray(np.dstack([_GREY, _GREY])).convert("LA"), "PNG", {}),
    "gif": (_PALETTE, "GIF", {}),
    "bmp": (Image.fromarray(_BASE), "BMP", {}),
}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pil_reference(data: bytes) -> np.ndarray:
    """What PIL shows: upright, palette through RGBA (its transparency), then RGB."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        if upright.mode in ("P", "PA"):
            upright = upright.convert("RGBA")
        return np.asarray(upright.convert("RGB"))


@pytest.mark.parametrize("case", list(_CASES))
def test_the_decoder_gives_pils_pixels_in_every_format_and_orientation(case):
    image, fmt, options = _CASES[case]
    orientations = range(1, 9) if fmt in ("JPEG", "PNG") else [None]
    for orientation in orientations:
        if orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = orientation
            options = {**options, "exif": exif}
        data = _encode(image, fmt, **options)
        pixels = decode_rgb(data)
        assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous
        np.testing.assert_array_equal(pixels, _pil_reference(data), err_msg=f"{orientation=}")
        channels_first = decode_chw(data)
        assert channels_first.dtype == torch.uint8 and channels_first.shape[0] == 3
        assert torch.equal(channels_first.permute(1, 2, 0), torch.from_numpy(pixels))


_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _orientation_elsewhere() -> dict[str, tuple[str, dict]]:
    """Orientation 6 ("rotate 90 clockwise") kept where torchvision does not look."""
    png_xmp = PngImagePlugin.PngInfo()
    png_xmp.add_itxt("XML:com.adobe.xmp", _XMP)
    raw = Image.Exif()
    raw[0x0112] = 6
    profile = raw.tobytes()
    png_raw = PngImagePlugin.PngInfo()
    png_raw.add_text(
        "Raw profile type exif", f"\nexif\n{len(profile):8d}\n{profile.hex()}\n", zip=True
    )
    return {
        "jpeg xmp": ("JPEG", {"quality": 95, "xmp": _XMP.encode()}),
        "png xmp": ("PNG", {"pnginfo": png_xmp}),
        "png raw exif profile": ("PNG", {"pnginfo": png_raw}),
    }


@pytest.mark.parametrize("case", list(_orientation_elsewhere()))
def test_orientation_that_only_pil_reads_is_applied(case):
    fmt, options = _orientation_elsewhere()[case]
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape
    stored[:5, :5] = (255, 0, 0)
    data = _encode(Image.fromarray(stored), fmt, **options)
    pixels = decode_rgb(data)
    assert pixels.shape == (40, 20, 3)  # shown upright: portrait
    np.testing.assert_array_equal(pixels, _pil_reference(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_or_foreign_bytes_are_an_image_read_error(fmt):
    data = _encode(Image.fromarray(_BASE), fmt)
    with pytest.raises(ImageReadError, match="truncated"):
        decode_rgb(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="unreadable"):
        decode_chw(b"not an image" + data[:16])


def test_the_pyfunc_decodes_bytes_and_base64_as_the_others_do():
    data = _encode(Image.fromarray(_BASE), "JPEG", quality=90)
    np.testing.assert_array_equal(decode_image(data), decode_rgb(data))
    text = base64.b64encode(data).decode()
    np.testing.assert_array_equal(decode_image(text, row=2), decode_rgb(data))
    with pytest.raises(ValueError, match="row 3: not a readable image"):
        decode_image(data[:100], row=3)


class _Recorder(nn.Module):
    """Keeps the batch the evaluation hands to the model, then runs the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.seen: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, **options) -> list[dict[str, torch.Tensor]]:
        self.seen = images.clone()
        return self.model(images, **options)


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_loader_and_evaluation_see_the_same_pixels_for_a_shard_row(
    shapes_dataset, tmp_path, image_format
):
    root, summary = shapes_dataset
    split = summary["val"]
    index = read_coco(root / split["annotation_file"], root / split["images_dir"])
    config = ModelConfig.from_dict(
        {
            "num_classes": len(index.categories) + 1,
            "backbone": "resnet18",
            "canvas": 128,
            "fpn_channels": 16,
            "roi": {"representation_size": 32, "mask_layers": [16]},
            "rpn": {"pre_nms_top_n_test": 20, "post_nms_top_n_test": 10},
        }
    )
    rows = [
        encode_record(record, model_config=config, image_format=image_format, jpeg_quality=90)
        for record in index.records
    ]
    table = rows_to_table(rows)
    trained_on, _ = decode_batch(
        table, canvas=config.canvas, num_anchors=anchor_grid(128, config.anchors).num_anchors
    )

    model_path = tmp_path / "model.pt"
    save_model(MaskRCNN(config), model_path)
    threads = torch.get_num_threads()
    try:
        predictor = ShardPredictor(
            model=model_path.read_bytes(), categories=[], score_threshold=0.0, threads=1
        )
        recorder = _Recorder(predictor.detector.model)
        predictor.detector.model = recorder
        predictor(_ray_numpy_batch(table))  # the columns as Ray Data's numpy batches give them
    finally:
        torch.set_num_threads(threads)
    assert recorder.seen is not None and recorder.seen.shape == trained_on.shape
    assert torch.equal(recorder.seen, trained_on)
    assert trained_on.amax() > 0  # the comparison is about real pixels


def _ray_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy(zero_copy_only=False) for name in ROW_COLUMNS}
