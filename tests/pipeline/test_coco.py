"""Reading good COCO data: label mapping, polygons and both RLE forms, image formats, EXIF
orientation, and masks and boxes at a resized scale."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.coco.masks import (
    compressed_rle_counts,
    decode_rle,
    encode_rle,
    encode_rles,
    masks_to_boxes,
    rasterize_polygons,
    uncompressed_rle_counts,
)
from pipeline.coco.reader import instance_boxes, instance_masks, load_image, read_coco
from pipeline.coco.validate import clip_to_rectangle, polygon_area
from pipeline.io.images import resized_size


def _read(ds):
    return read_coco(ds.annotation_file, ds.images_dir)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_categories_get_contiguous_labels_in_id_order(tiny_coco):
    ds = tiny_coco()
    index = _read(ds)
    assert index.categories == [
        {"id": 3, "name": "three", "label": 1},
        {"id": 10, "name": "ten", "label": 2},
    ]
    labels = {i.ann_id: (i.category_id, i.label) for r in index.records for i in r.instances}
    assert labels == {1: (3, 1), 2: (10, 2), 3: (3, 1)}
    assert index.sha256 == hashlib.sha256(ds.annotation_file.read_bytes()).hexdigest()


def test_records_keep_images_without_annotations_and_crowds(tiny_coco):
    index = _read(tiny_coco())
    assert index.skipped == []
    assert [(r.image_id, len(r.instances)) for r in index.records] == [(1, 2), (2, 1), (3, 0)]
    two = index.records[1]
    assert two.file_name == "sub/two.jpg" and two.path == index.images_dir / "sub/two.jpg"
    assert two.instances[0].iscrowd and not index.records[0].instances[0].iscrowd
    assert two.instances[0].bbox == (3.0, 5.0, 28.0, 30.0)  # COCO x, y, w, h -> x1, y1, x2, y2


def test_masks_of_polygon_compressed_and_uncompressed_rle(tiny_coco):
    ds = tiny_coco()
    index = _read(ds)
    for record in index.records:
        masks = instance_masks(record, scale=1.0)
        assert masks.shape == (len(record.instances), record.height, record.width)
        for mask, instance in zip(masks, record.instances, strict=True):
            np.testing.assert_array_equal(mask, ds.reference_masks[instance.ann_id])


def test_box_is_derived_from_the_segmentation_when_absent(tiny_coco):
    ds = tiny_coco()
    for ann in ds.data["annotations"]:
        del ann["bbox"]
    ds.write_json()
    boxes = {i.ann_id: i.bbox for r in _read(ds).records for i in r.instances}
    assert boxes[1] == (4.0, 4.0, 40.0, 36.0)  # the triangle's extreme points
    assert boxes[2] == (44.0, 20.0, 60.0, 40.0)  # the RLE blob's pixel edges
    assert boxes[3] == (3.0, 5.0, 28.0, 30.0)


@pytest.mark.parametrize("scale", [2.0, 0.5, 0.73])
def test_masks_and_boxes_at_another_scale(tiny_coco, scale):
    record = _read(tiny_coco()).records[0]  # 48 x 64: a polygon and an RLE
    full = instance_masks(record, scale=1.0)
    scaled = instance_masks(record, scale=scale)
    height, width = resized_size(record.height, record.width, scale)
    assert scaled.shape == (2, height, width)
    back = np.stack(
        [
            np.asarray(Image.fromarray(m * 255).resize((64, 48), Image.Resampling.BILINEAR)) >= 128
            for m in scaled
        ]
    )
    for original, restored in zip(full.astype(bool), back, strict=True):
        assert _iou(original, restored) > (0.95 if scale >= 1 else 0.85)
    boxes = instance_boxes(record, scale=scale)
    np.testing.assert_allclose(boxes, masks_to_boxes(scaled), atol=1.5)


def test_resized_size_rounds_each_side():
    assert resized_size(48, 64, 0.5) == (24, 32)
    assert resized_size(333, 500, 512 / 500) == (341, 512)
    assert resized_size(1, 1000, 0.01) == (1, 10)


def test_exif_orientation_is_applied(tiny_coco):
    ds = tiny_coco()
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape, 20 high and 40 wide
    stored[:5, :5] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    ds.write_image("three.png", Image.fromarray(stored))  # keep the file list valid
    ds.write_image("rotated.jpg", Image.fromarray(stored), exif=exif, quality=95)
    ds.data["images"].append({"id": 4, "file_name": "rotated.jpg", "height": 40, "width": 20})
    ds.write_json()
    record = next(r for r in _read(ds).records if r.image_id == 4)
    pixels = load_image(record)
    assert pixels.shape == (40, 20, 3)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60)
    rows, cols = np.nonzero(red)
    assert rows.max() < 8 and cols.min() >= 12  # it is now in the top-right corner


def _mode_images():
    grey = np.full((12, 16), 100, np.uint8)
    palette = Image.fromarray(grey).convert("P")
    palette.putpalette([100, 100, 100] * 256)
    return [
        ("L", Image.fromarray(grey), ".png", (100, 100, 100)),
        ("LA", Image.fromarray(np.dstack([grey, grey])).convert("LA"), ".png", (100, 100, 100)),
        ("RGBA", Image.new("RGBA", (16, 12), (10, 20, 30, 40)), ".png", (10, 20, 30)),
        ("CMYK", Image.new("CMYK", (16, 12), (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
        ("P", palette, ".png", (100, 100, 100)),
        ("I;16", Image.fromarray(np.full((12, 16), 25700, np.uint16)), ".png", (100, 100, 100)),
        ("1", Image.new("1", (16, 12), 1), ".png", (255, 255, 255)),
    ]


@pytest.mark.parametrize("mode, image, suffix, rgb", _mode_images(), ids=lambda v: str(v)[:6])
def test_image_modes_become_rgb(tiny_coco, mode, image, suffix, rgb):
    ds = tiny_coco()
    path = ds.write_image(f"mode{suffix}", image)
    with Image.open(path) as written:
        assert written.mode == mode  # the file really holds that mode
    ds.data["images"].append({"id": 5, "file_name": f"mode{suffix}", "height": 12, "width": 16})
    ds.write_json()
    pixels = load_image(next(r for r in _read(ds).records if r.image_id == 5))
    assert pixels.shape == (12, 16, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(axis=0), rgb, atol=3)


def test_rle_round_trip_and_batch_encoding():
    masks = (np.random.default_rng(0).random((3, 17, 23)) > 0.6).astype(np.uint8)
    counts = encode_rles(masks)
    assert counts == [encode_rle(m) for m in masks]
    for mask, c in zip(masks, counts, strict=True):
        np.testing.assert_array_equal(decode_rle(c, 17, 23), mask)
        assert sum(compressed_rle_counts(c)) == 17 * 23
        assert sum(compressed_rle_counts(c)[1::2]) == mask.sum()
    masks[0, 0, 0] = 1  # foreground first: the runs start with an empty background run
    for mask in masks:
        rle = {"size": [17, 23], "counts": uncompressed_rle_counts(mask)}
        np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, 17, 23)), mask)
    with pytest.raises(ValueError, match="cover 391 pixels, not 17x24"):
        decode_rle(counts[0], 17, 24)


def test_masks_to_boxes_uses_pixel_edges():
    masks = np.zeros((2, 10, 12), np.uint8)
    masks[0, 2:5, 3:9] = 1
    np.testing.assert_array_equal(masks_to_boxes(masks), [[3, 2, 9, 5], [0, 0, 0, 0]])


def test_polygon_clipping_is_exact():
    square = np.array([[-10, -10], [10, -10], [10, 10], [-10, 10]], np.float64)
    clipped = clip_to_rectangle(square, 32, 32)
    assert polygon_area(clipped) == pytest.approx(100.0)
    star = np.array(
        [[16, -8], [20, 12], [40, 16], [20, 20], [16, 40], [12, 20], [-8, 16], [12, 12]], np.float64
    )
    clipped = clip_to_rectangle(star, 32, 32)
    inside = rasterize_polygons([clipped.ravel().tolist()], 32, 32)
    whole = rasterize_polygons([star.ravel().tolist()], 32, 32)
    assert _iou(inside.astype(bool), whole.astype(bool)) > 0.98  # same pixels in the image
    assert clip_to_rectangle(clipped, 32, 32) is clipped  # already inside: returned as is


def test_a_dataset_on_storage_uris_reads_like_the_local_one(tiny_coco, memory_dir):
    ds = tiny_coco()
    local = _read(ds)
    assert read_coco(ds.annotation_file.as_uri(), ds.images_dir.as_uri()) == local
    annotation, images = ds.copy_to(memory_dir)
    remote = read_coco(annotation, images)
    assert (remote.annotation_file, remote.images_dir) == (annotation, images)
    assert (remote.sha256, remote.categories) == (local.sha256, local.categories)
    for here, there in zip(local.records, remote.records, strict=True):
        assert there.path == f"{images}/{here.file_name}"
        assert replace(there, images_dir=here.images_dir) == here
        np.testing.assert_array_equal(load_image(there), load_image(here))


def test_a_used_category_id_0_is_a_class_not_the_background(tiny_coco):
    # Some exports number real classes from 0: category 0 gets label 1 like any lowest id; the
    # model's label 0 stays the background.
    ds = tiny_coco()
    ds.data["categories"].append({"id": 0, "name": "zero"})
    ds.annotation(1)["category_id"] = 0
    ds.write_json()
    index = _read(ds)
    assert index.skipped == []
    assert [(c["id"], c["label"]) for c in index.categories] == [(0, 1), (3, 2), (10, 3)]
    labels = {i.ann_id: (i.category_id, i.label) for r in index.records for i in r.instances}
    assert labels == {1: (0, 1), 2: (10, 3), 3: (3, 2)}
