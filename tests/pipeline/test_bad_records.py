"""The bad-input cases of docs/data.md that real exports produce (labelme, CVAT and others):
category lists, image entries, symbolic links, annotation fields, encodings. Each is a DataError
naming file, record and reason, or a counted Skip with its reason; test_bad_input.py has the
image files, the geometry and the whole-file cases."""

from __future__ import annotations

import json

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


# --- categories ---------------------------------------------------------------------------------


def test_duplicate_category_id_is_an_error(tiny_coco):
    ds = tiny_coco()
    ds.data["categories"].append({"id": 3, "name": "three again"})
    ds.write_json()
    with pytest.raises(DataError) as error:
        _read(ds)
    assert (error.value.file, error.value.record) == (str(ds.annotation_file), "category id=3")
    assert error.value.reason == "duplicate category id (listed 2 times)"


@pytest.mark.parametrize("bad_id", ["3", 3.0, None, True])
def test_non_integer_category_id_is_an_error(tiny_coco, bad_id):
    ds = tiny_coco()
    ds.data["categories"][1]["id"] = bad_id
    ds.write_json()
    with pytest.raises(DataError) as error:
        _read(ds)
    assert error.value.record == "categories[1]"
    assert error.value.reason == f"a category needs an integer 'id', got {bad_id!r}"


def test_no_categories_is_an_error(tiny_coco):
    ds = tiny_coco()
    ds.data["categories"] = []
    ds.write_json()
    with pytest.raises(DataError, match=r"instances\.json: categories: the list is empty"):
        _read(ds)


def test_unused_category_id_0_is_read_like_any_other(tiny_coco):
    # labelme lists {"id": 0, "name": "_background_"} and no annotation uses it. It is an ordinary
    # category: labels follow the sorted ids, so the mapping depends only on the category list
    # (train and val files listing the same categories get the same labels), and 0 stays the
    # model's background, never a user's category.
    ds = tiny_coco()
    ds.data["categories"].append({"id": 0, "name": "_background_"})
    ds.write_json()
    index = _read(ds)
    assert index.skipped == []
    assert index.categories == [
        {"id": 0, "name": "_background_", "label": 1},
        {"id": 3, "name": "three", "label": 2},
        {"id": 10, "name": "ten", "label": 3},
    ]
    labels = {i.ann_id: (i.category_id, i.label) for r in index.records for i in r.instances}
    assert labels == {1: (3, 2), 2: (10, 3), 3: (3, 2)}


# --- image entries: counted skips ---------------------------------------------------------------


@pytest.mark.parametrize("file_name", [None, "", "  ", 7])
def test_missing_file_name_skips_the_image(tiny_coco, file_name):
    ds = tiny_coco()
    if file_name is None:
        del ds.image(1)["file_name"]
    else:
        ds.image(1)["file_name"] = file_name
    ds.write_json()
    index = _read(ds)
    skip = _only_skip(index)
    assert skip.record == "image_id=1"
    assert skip.reason == "no file_name (2 annotations dropped with it)"
    assert [r.image_id for r in index.records] == [2, 3]


@pytest.mark.parametrize(
    "key, value", [("height", 0), ("width", -32), ("height", 48.5), ("width", "64")]
)
def test_non_positive_or_non_integer_size_skips_the_image(tiny_coco, key, value):
    ds = tiny_coco()
    ds.image(1)[key] = value
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "image_id=1"
    assert skip.reason == (
        f"{key} is not a positive integer: {value!r} (2 annotations dropped with it)"
    )


def test_symlink_to_a_file_outside_the_images_dir_is_refused(tiny_coco, tmp_path):
    ds = tiny_coco()
    outside = tmp_path / "secret.png"
    outside.write_bytes((ds.images_dir / "one.png").read_bytes())
    (ds.images_dir / "one.png").unlink()
    (ds.images_dir / "one.png").symlink_to(outside)
    index = _read(ds)
    skip = _only_skip(index)
    assert skip.record == "image_id=1"
    assert "'one.png' leads through a symbolic link to" in skip.reason
    assert "outside the images directory (2 annotations dropped with it)" in skip.reason
    assert [r.image_id for r in index.records] == [2, 3]


def test_symlinked_folder_outside_the_images_dir_is_refused(tiny_coco, tmp_path):
    ds = tiny_coco()
    (ds.images_dir / "sub").rename(tmp_path / "elsewhere")
    (ds.images_dir / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    skip = _only_skip(_read(ds))
    assert skip.record == "image_id=2"
    assert "'sub/two.jpg' leads through a symbolic link to" in skip.reason


def test_symlinks_that_stay_inside_the_images_dir_are_followed(tiny_coco, tmp_path):
    ds = tiny_coco()
    (ds.images_dir / "alias.png").symlink_to(ds.images_dir / "one.png")
    ds.image(1)["file_name"] = "alias.png"
    ds.write_json()
    linked_root = tmp_path / "linked_images"  # the images directory itself may be a link
    linked_root.symlink_to(ds.images_dir, target_is_directory=True)
    index = read_coco(ds.annotation_file, linked_root)
    assert index.skipped == []
    assert load_image(_record(index, 1)).shape == (48, 64, 3)


# --- annotations: counted skips -----------------------------------------------------------------


@pytest.mark.parametrize(
    "counts, reason",
    [
        (
            "0`0 1",
            "malformed compressed RLE: compressed RLE holds an invalid character ' ' at byte 3",
        ),
        ("0`o", "malformed compressed RLE: compressed RLE ends in the middle of a run"),
        ("0é1", "malformed compressed RLE: compressed RLE holds a non-ASCII character at byte 1"),
        ("", "RLE runs cover 0 pixels, not 48x64"),
    ],
)
def test_malformed_compressed_rle_is_skipped(tiny_coco, counts, reason):
    ds = tiny_coco()
    ds.annotation(2)["segmentation"] = {"size": [48, 64], "counts": counts}
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=2 (image_id=1)"
    assert skip.reason == reason


@pytest.mark.parametrize(
    "bad_part",
    [
        [30.0, 30.0, 40.0, 40.0],
        [4.0, 40.0, 8.0, 44.0, 12.0, 48.0],
        [70.0, 5.0, 90.0, 5.0, 80.0, 9.0],
    ],
    ids=["2 points", "zero area", "wholly outside"],
)
def test_degenerate_part_of_a_multi_part_polygon_is_dropped_and_the_instance_kept(
    tiny_coco, bad_part
):
    ds = tiny_coco()
    triangle = ds.annotation(1)["segmentation"][0]
    ds.annotation(1)["segmentation"] = [triangle, bad_part]
    ds.write_json()
    index = _read(ds)
    assert index.skipped == []
    instance = _record(index, 1).instances[0]
    assert instance.ann_id == 1 and instance.segmentation == [triangle]
    mask = instance_masks(_record(index, 1), scale=1.0)[0]
    np.testing.assert_array_equal(mask, ds.reference_masks[1])


def test_non_utf8_annotation_file_is_an_error(tiny_coco):
    ds = tiny_coco()
    ds.data["categories"][0]["name"] = "caf\u00e9"
    text = json.dumps(ds.data, ensure_ascii=False)
    ds.annotation_file.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as error:
        _read(ds)
    assert error.value.record == f"byte {text.index('caf') + 3}"
    assert error.value.reason == "the annotation file is not UTF-8 (save it as UTF-8)"


def test_utf8_with_a_byte_order_mark_is_read(tiny_coco):
    ds = tiny_coco()
    ds.annotation_file.write_bytes(b"\xef\xbb\xbf" + json.dumps(ds.data).encode())
    assert [r.image_id for r in _read(ds).records] == [1, 2, 3]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinity_in_a_bbox_is_skipped(tiny_coco, value):
    ds = tiny_coco()
    ds.annotation(1)["bbox"] = [4, 4, value, 32]
    ds.write_json()  # json writes NaN / Infinity, which Python's json (and pycocotools) reads
    assert "Infinity" in ds.annotation_file.read_text() or "NaN" in ds.annotation_file.read_text()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=1 (image_id=1)"
    assert skip.reason == f"bbox is not 4 finite numbers: [4, 4, {value!r}, 32]"


def test_nan_in_a_polygon_is_skipped(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["segmentation"] = [[4.0, 4.0, float("nan"), 6.0, 20.0, 36.0]]
    ds.write_json()
    assert _only_skip(_read(ds)).reason.startswith("polygon is not a list of finite numbers: [4.0")


def test_polygon_with_an_odd_number_of_coordinates_is_skipped(tiny_coco):
    ds = tiny_coco()
    ds.annotation(1)["segmentation"] = [[4.0, 4.0, 40.0, 6.0, 20.0, 36.0, 5.0]]
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=1 (image_id=1)"
    assert skip.reason == "polygon has an odd number of coordinates (7)"


@pytest.mark.parametrize("segmentation", ["absent", None, [], "polygons"], ids=str)
def test_missing_segmentation_is_skipped(tiny_coco, segmentation):
    ds = tiny_coco()
    if segmentation == "absent":
        del ds.annotation(1)["segmentation"]
    else:
        ds.annotation(1)["segmentation"] = segmentation
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=1 (image_id=1)"
    assert skip.reason == "no segmentation (neither polygons nor RLE): a mask is needed to train"


@pytest.mark.parametrize(
    "value, crowd",
    [("0", False), ("1", True), (0, False), (1, True), (False, False), (True, True)],
    ids=repr,
)
def test_iscrowd_as_string_or_bool_is_read_as_its_value(tiny_coco, value, crowd):
    ds = tiny_coco()
    ds.annotation(1)["iscrowd"] = value
    ds.write_json()
    index = _read(ds)
    assert index.skipped == []
    assert _record(index, 1).instances[0].iscrowd is crowd


def test_missing_iscrowd_means_not_crowd(tiny_coco):
    ds = tiny_coco()
    del ds.annotation(1)["iscrowd"]
    ds.write_json()
    assert _record(_read(ds), 1).instances[0].iscrowd is False


@pytest.mark.parametrize("value", ["yes", 2, -1, 0.5, None, [0]])
def test_iscrowd_other_than_0_or_1_is_skipped(tiny_coco, value):
    ds = tiny_coco()
    ds.annotation(1)["iscrowd"] = value
    ds.write_json()
    skip = _only_skip(_read(ds))
    assert skip.record == "annotation id=1 (image_id=1)"
    assert skip.reason == f"iscrowd must be 0 or 1 (or the string '0' or '1'), got {value!r}"
