"""One test per bad-input case of docs/data.md: a DataError naming file, record and reason, or a
counted Skip with its reason, and never a silent drop."""

from __future__ import annotations

import json
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
