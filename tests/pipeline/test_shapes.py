"""The synthetic dataset: deterministic, a real COCO dataset, and annotations that match pixels."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.coco.reader import instance_masks, load_image, read_coco
from pipeline.coco.shapes import write_shapes_dataset

KINDS = ("circle", "square", "triangle", "star", "ring")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _coco(out_dir, split):
    return COCO(str(out_dir / f"annotations/instances_{split}.json"))


def test_same_seed_gives_byte_identical_files(tmp_path):
    options = {"n_train": 4, "n_val": 2, "min_side": 48, "max_side": 96}
    write_shapes_dataset(tmp_path / "a", seed=5, **options)
    write_shapes_dataset(tmp_path / "b", seed=5, **options)
    write_shapes_dataset(tmp_path / "c", seed=6, **options)
    first, second, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 4 + 2 + 2
    assert first == second
    assert first.keys() != other.keys() or any(first[k] != other[k] for k in first)


# sha256 of the annotation files of write_shapes_dataset(seed=3, n_train=6, n_val=2, min_side=48,
# max_side=96) as the code wrote them before object_scale and class_weights existed (the shapes,
# their places and masks come from the same random stream as the pixels).
EARLIER_ANNOTATIONS = "664e4c9482304e54f35dd82209f2040c040ee87d5e49733c543a7cf4d14f4f79"


def test_the_new_knobs_at_their_defaults_leave_the_dataset_as_it_was(tmp_path):
    options = {"n_train": 6, "n_val": 2, "seed": 3, "min_side": 48, "max_side": 96}
    write_shapes_dataset(tmp_path / "implicit", **options)
    write_shapes_dataset(
        tmp_path / "explicit", object_scale=(0.18, 0.42), class_weights=None, **options
    )
    write_shapes_dataset(tmp_path / "equal", class_weights={name: 3 for name in KINDS}, **options)
    implicit = _files(tmp_path / "implicit")
    assert implicit == _files(tmp_path / "explicit") == _files(tmp_path / "equal")
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update(implicit[f"annotations/instances_{split}.json"])
    assert digest.hexdigest() == EARLIER_ANNOTATIONS


def test_a_wide_object_scale_spans_8_px_to_most_of_the_image(tmp_path):
    write_shapes_dataset(tmp_path, n_train=40, n_val=1, seed=0, object_scale=(0.05, 0.75))
    coco = _coco(tmp_path, "train")
    sides, fractions = [], []
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        if not ann["iscrowd"]:
            sides.append(max(ann["bbox"][2:]))
            fractions.append(max(ann["bbox"][2:]) / min(image["height"], image["width"]))
        for polygon in ann["segmentation"] if isinstance(ann["segmentation"], list) else []:
            assert min(polygon) >= 0 and max(polygon[0::2]) <= image["width"]  # fits inside
            assert max(polygon[1::2]) <= image["height"]
    assert min(sides) <= 12 and min(fractions) < 0.08
    assert max(fractions) > 0.65
    assert len([f for f in fractions if f < 0.2]) >= 10  # not one outlier: many small ones


def test_class_weights_make_a_class_as_rare_as_they_say(tmp_path):
    """Stars at weight 0.25 (the others 1): a quarter as many stars as each other kind in the
    train split, within sampling noise (about 40 stars expected: +-0.1 is 2.5 sigma); the val
    split stays balanced."""
    options = {"seed": 0, "min_side": 64, "max_side": 80}
    write_shapes_dataset(tmp_path, n_train=200, n_val=60, class_weights={"star": 0.25}, **options)
    for split, low, high in (("train", 0.15, 0.35), ("val", 0.5, 1.6)):
        anns = _coco(tmp_path, split).dataset["annotations"]
        counts = Counter(a["category_id"] for a in anns if not a["iscrowd"])
        others = [counts[c] for c in (1, 2, 5, 9)]
        assert low < counts[7] / (sum(others) / 4) < high, (split, counts)
        assert min(others) > 0.75 * max(others)


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    write_shapes_dataset(tmp_path, n_train=5, n_val=2, seed=0, min_side=48, max_side=64)
    write_shapes_dataset(tmp_path, n_train=3, n_val=2, seed=0, min_side=48, max_side=64)
    assert len(list((tmp_path / "images/train").iterdir())) == 3


def test_content_covers_what_real_data_holds(shapes_dataset):
    out_dir, summary = shapes_dataset
    coco = _coco(out_dir, "train")
    assert sorted(coco.getCatIds()) == [1, 2, 5, 7, 9]  # non-contiguous on purpose
    images, anns = coco.dataset["images"], coco.dataset["annotations"]
    assert summary["train"]["images"] == len(images) == 16
    suffixes = Counter(i["file_name"].rsplit(".", 1)[1] for i in images)
    assert suffixes["jpg"] > 0 and suffixes["png"] > 0
    assert any(i["height"] != i["width"] for i in images)
    assert len({(i["height"], i["width"]) for i in images}) > 8
    assert any(not coco.getAnnIds(imgIds=i["id"]) for i in images)  # negatives
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    single = [a for a in anns if not a["iscrowd"]]
    kinds = Counter(type(a["segmentation"]).__name__ for a in single)
    assert kinds["list"] > kinds["dict"] > 0  # mostly polygons, some compressed RLE
    assert len({a["category_id"] for a in single}) == 5


def test_annotations_match_masks_and_files(shapes_dataset):
    out_dir, _ = shapes_dataset
    for split in ("train", "val"):
        coco = _coco(out_dir, split)
        for image in coco.dataset["images"]:
            with Image.open(out_dir / "images" / split / image["file_name"]) as file:
                assert file.size == (image["width"], image["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, 1, 1))
            for ann, mask in zip(anns, masks, strict=True):
                assert mask.sum() == ann["area"] > 0
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann["bbox"]
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            # occlusion: each pixel belongs to at most one instance (hidden parts removed)
            assert len(masks) == 0 or masks.sum(axis=0).max() <= 1


def test_shapes_are_large_enough_to_learn(shapes_dataset):
    out_dir, _ = shapes_dataset
    coco = _coco(out_dir, "train")
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        if not ann["iscrowd"]:
            assert max(ann["bbox"][2:]) >= 0.1 * min(image["height"], image["width"])


def test_instances_stand_out_from_the_background(shapes_dataset):
    out_dir, _ = shapes_dataset
    index = read_coco(out_dir / "annotations/instances_val.json", out_dir / "images/val")
    assert index.skipped == []
    assert [c["label"] for c in index.categories] == [1, 2, 3, 4, 5]
    for record in index.records:
        pixels = load_image(record).astype(np.float32)
        masks = instance_masks(record, scale=1.0).astype(bool)
        background = ~masks.any(axis=0)
        for mask, instance in zip(masks, record.instances, strict=True):
            if not instance.iscrowd:
                difference = pixels[mask].mean(0) - pixels[background].mean(0)
                assert np.abs(difference).sum() > 40


def test_invalid_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_side <= max_side"):
        write_shapes_dataset(tmp_path, n_train=1, n_val=1, seed=0, min_side=200, max_side=100)
    with pytest.raises(ValueError, match="object_scale"):
        write_shapes_dataset(tmp_path, n_train=1, n_val=1, object_scale=(0.5, 0.9))
    with pytest.raises(ValueError, match=r"unknown categories \['stars'\]"):
        write_shapes_dataset(tmp_path, n_train=1, n_val=1, class_weights={"stars": 0.1})
    with pytest.raises(ValueError, match="not all 0"):
        write_shapes_dataset(tmp_path, n_train=1, n_val=1, class_weights=dict.fromkeys(KINDS, 0))
