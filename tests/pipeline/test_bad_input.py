"""One test per bad-input case of docs/data.md: a DataError naming file, record and reason, or a
counted Skip with its reason, and never a silent drop."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.coco.reader import DataError, instance_masks, load_image, read_coco


def _read(ds):
    return read_coco(ds.annotation_file, ds.images_dir)


def _only_skip(index):
    assert len(index.skipped) == 1, index.skipped
    return index.skipped[0]


def _record(index, image_id):
    return next(r for r in index.records if r.image_id == image_id)


# --- image files: found when loading (preprocess counts these as skips) -------------------------


def test_missing_image_file(tiny_coco):
    ds = tiny_coco()
    (ds.images_dir / "one.png").unlink()
    with pytest.raises(DataError) as error:
        load_image(_record(_read(ds), 1))
    assert error.value.file.endswith("one.png")
    assert error.value.record == "image_id=1"
    assert "not found" in error.value.reason


def test_unreadable_image(tiny_coco):
    ds = tiny_coco()
    (ds.images_dir / "one.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"one\.png: image_id=1: unreadable"):
        load_image(_record(_read(ds), 1))


@pytest.mark.parametrize("file_name, image_id", [("one.png", 1), ("sub/two.jpg", 2)])
def test_truncated_image(tiny_coco, file_name, image_id):
    ds = tiny_coco()
    path = ds.images_dir / file_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as error:
        load_image(_record(_read(ds), image_id))
    assert error.value.record == f"image_id={image_id}"


def test_image_size_differs_from_json(tiny_coco):
    ds = tiny_coco()
    ds.image(1)["height"] = 50
    ds.write_json()
    with pytest.raises(DataError, match="image is 48x64 .* says 50x64"):
        load_image(_record(_read(ds), 1))


# --- annotations: counted skips -------------------------------------------------------------------


def test_annotation_on_unknown_image_id(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["image_id"] = 99
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=1 (image_id=99)"
    assert "unknown image id 99" in skip.reason
    assert skip.file == str(ds.annotation_file)


def test_category_not_in_categories(tiny_coco):
    ds = tiny_coco()
    ds.annotation(2)["category_id"] = 4
    ds.write_json()
    index = _read(ds)
    assert "category id 4 is not in categories" in _only_skip(index).reason
    assert [i.ann_id for i in _record(index, 1).instances] == [1]


def test_box_and_polygon_partly_outside_are_clipped(tiny_coco):
    ds = tiny_coco()
    ann = ds.annotation(1)  # image 1 is 48 high, 64 wide
    ann["bbox"] = [-10, 30, 40, 30]
    ann["segmentation"] = [[-20.0, 10.0, 30.0, 10.0, 30.0, 60.0, -20.0, 60.0]]
    ds.write_json()
    index = _read(ds)
    assert index.skipped == []
    instance = _record(index, 1).instances[0]
    assert instance.bbox == (0.0, 30.0, 30.0, 48.0)
    points = np.asarray(instance.segmentation[0]).reshape(-1, 2)
    assert points.min() >= 0 and points[:, 0].max() <= 64 and points[:, 1].max() <= 48
    mask = instance_masks(_record(index, 1), scale=1.0)[0]
    assert abs(int(mask.sum()) - 30 * 38) <= 30  # the visible 30 x 38 rectangle


def test_box_wholly_outside_is_skipped(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["bbox"] = [70, 5, 10, 10]
    ds.write_json()
    assert "box [70.0, 5.0, 10.0, 10.0] lies wholly outside" in _only_skip(_read(ds)).reason


def test_polygon_wholly_outside_is_skipped(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["segmentation"] = [[70.0, 5.0, 90.0, 5.0, 80.0, 30.0]]
    ds.write_json()
    assert "polygon lies wholly outside the 48x64 image" in _only_skip(_read(ds)).reason


def test_zero_area_box_is_skipped(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["bbox"] = [4, 4, 0, 32]
    ds.write_json()
    assert "zero-area box" in _only_skip(_read(ds)).reason


@pytest.mark.parametrize(
    "polygon, reason",
    [
        ([4.0, 4.0, 40.0, 6.0], "polygon with fewer than 3 points (2)"),
        ([4.0, 4.0, 10.0, 10.0, 20.0, 20.0], "zero-area polygon"),
    ],
)
def test_degenerate_polygon_is_skipped(tiny_coco, polygon, reason):
    ds = tiny_coco()
    ds.annotation(1)["segmentation"] = [polygon]
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert reason in skip.reason
    assert skip.record == "annotation id=1 (image_id=1)"


@pytest.mark.parametrize(
    "rle, reason",
    [
        ({"size": [40, 64], "counts": [0, 2560]}, "differs from the image's [48, 64]"),
        ({"size": [48, 64], "counts": [10, 20]}, "RLE runs cover 30 pixels, not 48x64"),
        ({"size": [48, 64], "counts": [3072]}, "zero-area RLE mask"),
        ({"size": [48, 64], "counts": "0`0"}, "RLE runs cover 16 pixels"),
    ],
)
def test_bad_rle_is_skipped(tiny_coco, rle, reason):
    ds = tiny_coco()
    ds.annotation(2)["segmentation"] = rle
    ds.write_json()
    assert reason in _only_skip(_read(ds)).reason


def test_duplicate_annotation_id_keeps_the_first(tiny_coco):
    ds = tiny_coco()
    ds.annotation(3)["id"] = 1
    ds.write_json()
    index = _read(ds)
    assert "duplicate annotation id" in _only_skip(index).reason
    assert _record(index, 2).instances == ()


# --- image entries and whole files --------------------------------------------------------------


def test_duplicate_image_ids_are_an_error(tiny_coco):
    ds = tiny_coco()
    ds.image(3)["id"] = 2
    ds.write_json()
    with pytest.raises(DataError, match="duplicate image id") as error:
        _read(ds)
    assert error.value.record == "image_id=2"
    assert error.value.file == str(ds.annotation_file)


@pytest.mark.parametrize(
    "file_name",
    ["../outside.png", "sub/../../x.png", "/etc/passwd", "C:\\images\\one.png", "..\\one.png"],
)
def test_file_name_escaping_the_images_dir_is_refused(tiny_coco, file_name):
    ds = tiny_coco()
    ds.image(1)["file_name"] = file_name
    ds.write_json()
    index = _read(ds)
    skip = _only_skip(index)
    assert skip.record == "image_id=1"
    assert "escapes the images directory" in skip.reason
    assert "(2 annotations dropped with it)" in skip.reason
    assert [r.image_id for r in index.records] == [2, 3]


def test_empty_annotation_file(tiny_coco):
    ds = tiny_coco()
    ds.annotation_file.write_text("  \n")
    with pytest.raises(DataError, match="instances.json: file: the annotation file is empty"):
        _read(ds)


def test_malformed_annotation_file_names_line_and_column(tiny_coco):
    ds = tiny_coco()
    ds.annotation_file.write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(DataError, match="line 2 column 12: malformed JSON") as error:
        _read(ds)
    assert error.value.file == str(ds.annotation_file)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "top level: expected a JSON object"),
        ('{"images": [], "annotations": []}', "categories: 'categories' is missing"),
    ],
)
def test_annotation_file_of_the_wrong_shape(tiny_coco, content, match):
    ds = tiny_coco()
    ds.annotation_file.write_text(content)
    with pytest.raises(DataError, match=match):
        _read(ds)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        read_coco(tmp_path / "nope.json", tmp_path)


def test_split_with_no_usable_images(tiny_coco):
    ds = tiny_coco()
    for image in ds.data["images"]:
        image["file_name"] = "../" + image["file_name"]
    ds.write_json()
    with pytest.raises(DataError, match="images: no usable images .*escapes the images directory"):
        _read(ds)


def test_data_error_names_all_three_and_survives_pickling():
    error = DataError("a/b.json", "image_id=7", "broken")
    assert str(error) == "a/b.json: image_id=7: broken"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.file, copy.record, copy.reason) == ("a/b.json", "image_id=7", "broken")
    assert isinstance(copy, ValueError)


def test_missing_or_unreadable_image_on_object_storage(tiny_coco, memory_dir):
    ds = tiny_coco()
    (ds.images_dir / "one.png").unlink()
    (ds.images_dir / "three.png").write_bytes(b"this is not an image at all")
    annotation, images = ds.copy_to(memory_dir)
    index = read_coco(annotation, images)
    with pytest.raises(DataError) as error:
        load_image(_record(index, 1))
    assert (error.value.file, error.value.record) == (f"{images}/one.png", "image_id=1")
    assert "not found" in error.value.reason
    with pytest.raises(DataError, match=r"three\.png: image_id=3: unreadable"):
        load_image(_record(index, 3))


def test_missing_annotation_file_or_unknown_protocol_on_storage_uris(tiny_coco, memory_dir):
    with pytest.raises(DataError, match=r"^memory://.*nope\.json: file: annotation file not found"):
        read_coco(f"{memory_dir}/nope.json", memory_dir)
    with pytest.raises(ValueError, match="nosuch://"):  # before any image is opened
        read_coco(tiny_coco().annotation_file, "nosuch://bucket/images")
