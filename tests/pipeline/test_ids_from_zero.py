"""COCO exports whose ids start at 0 (labelme, CVAT) score exactly: ground truth submitted as
predictions gives bbox and segm AP 1.0.

pycocotools marks "no match" with 0, so an annotation with id 0 was never found until the ground
truth was renumbered. The dataset also lists category 0 as labelme's unused ``_background_``,
and writes ``iscrowd`` as strings, as some exporters do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.config import ModelConfig
from pipeline.coco.masks import decode_rle, encode_rle, uncompressed_rle_counts
from pipeline.coco.reader import read_coco
from pipeline.evaluation.cocoeval import (
    ground_truth_from_bytes,
    load_ground_truth,
    score_all,
    to_coco_results,
)
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest, shard_files

CATEGORIES = [
    {"id": 0, "name": "_background_", "supercategory": None},
    {"id": 1, "name": "cat"},
    {"id": 2, "name": "dog"},
]


def _annotation(ann_id, image_id, category_id, segmentation, iscrowd, height, width):
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": [height, width], "counts": segmentation["counts"].encode()}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": iscrowd,
    }


def write_dataset(root: Path) -> tuple[Path, Path]:
    """Images 0..2 (longest side 64, so a canvas of 64 keeps their size), annotations 0..4."""
    blob = np.zeros((48, 64), np.uint8)
    blob[20:40, 40:60] = 1
    crowd = np.zeros((64, 40), np.uint8)
    crowd[40:60, 5:35] = 1
    images = [
        {"id": 0, "file_name": "zero.png", "height": 48, "width": 64},
        {"id": 1, "file_name": "one.png", "height": 64, "width": 40},
        {"id": 2, "file_name": "two.png", "height": 48, "width": 64},
    ]
    annotations = [
        _annotation(0, 0, 1, [[4.0, 4.0, 36.0, 6.0, 20.0, 36.0]], 0, 48, 64),
        _annotation(1, 0, 2, {"size": [48, 64], "counts": encode_rle(blob).decode()}, "0", 48, 64),
        _annotation(2, 1, 2, [[5.0, 5.0, 35.0, 5.0, 35.0, 30.0, 5.0, 30.0]], "0", 64, 40),
        _annotation(
            3, 1, 1, {"size": [64, 40], "counts": uncompressed_rle_counts(crowd)}, "1", 64, 40
        ),
        _annotation(4, 2, 1, [[30.0, 10.0, 60.0, 10.0, 45.0, 44.0]], 0, 48, 64),
    ]
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image in images:
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / image["file_name"])
    annotation_file = root / "instances.json"
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    annotation_file.write_text(json.dumps(coco))
    return annotation_file, images_dir


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    return write_dataset(tmp_path)


def _label_to_category(categories) -> dict[int, int]:
    return {int(c["label"]): int(c["id"]) for c in categories}


def _assert_exact(scores) -> None:
    for iou_type in ("bbox", "segm"):
        summary = scores[iou_type].summary
        assert summary["AP"] == 1.0, (iou_type, summary)
        assert summary["AR100"] == 1.0, (iou_type, summary)
        assert scores[iou_type].per_class == {"_background_": None, "cat": 1.0, "dog": 1.0}


def test_ground_truth_with_ids_from_0_scores_exactly_one(dataset):
    annotation_file, images_dir = dataset
    index = read_coco(annotation_file, images_dir)
    assert index.skipped == []
    gt = load_ground_truth(annotation_file)
    label_of = {c["id"]: c["label"] for c in index.categories}
    results = []
    for record in index.records:
        anns = [a for a in json.loads(annotation_file.read_text())["annotations"]]
        anns = [a for a in anns if a["image_id"] == record.image_id and a["iscrowd"] != "1"]
        detection = {
            "boxes": np.array(
                [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64
            ).reshape(-1, 4),
            "labels": np.array([label_of[a["category_id"]] for a in anns], np.int64),
            "scores": np.full(len(anns), 0.9),
            "masks": np.stack([gt.annToMask(a) for a in anns])
            if anns
            else np.zeros((0, record.height, record.width), np.uint8),
        }
        results += to_coco_results(record.image_id, detection, _label_to_category(index.categories))
    assert {r["image_id"] for r in results} == {0, 1, 2}
    assert {r["category_id"] for r in results} == {1, 2}  # the user's ids, never 0
    _assert_exact(score_all(gt, results))


def test_iscrowd_written_as_the_string_0_is_an_object_to_find(dataset):
    # pycocotools' truth test would make "0" a crowd, an ignored region: missing it would cost
    # nothing. Scored as preprocess reads it, the dog of image 1 (annotation 2) is a miss.
    annotation_file, _ = dataset
    gt = load_ground_truth(annotation_file)
    dog = json.loads(annotation_file.read_text())["annotations"][1]  # image 0, compressed RLE
    found = {"image_id": 0, "category_id": 2, "score": 0.9, "segmentation": dog["segmentation"]}
    scores = score_all(gt, [found], image_ids=[0, 1])
    # Recall 1/2 for dog: precision 1 at the 51 recall thresholds 0.00..0.50 of COCO's 101.
    assert scores["segm"].per_class["dog"] == pytest.approx(51 / 101, abs=1e-6)
    assert scores["segm"].summary["AR100"] == pytest.approx((0.0 + 0.5) / 2)  # cat, dog
    assert [a["iscrowd"] for a in gt.dataset["annotations"]] == [0, 0, 0, 1, 0]
    assert [a["id"] for a in gt.dataset["annotations"]] == [1, 2, 3, 4, 5]  # renumbered


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _stored_instances_as_detections(split_dir) -> tuple[list[int], list[dict]]:
    """The shards' non-crowd instances as score-1 detections (scale 1: no resizing back)."""
    label_to_category = _label_to_category(read_manifest(split_dir)["categories"])
    image_ids, results = [], []
    filesystem, paths = shard_files(split_dir)
    for path in paths:
        for row in pq.read_table(path, filesystem=filesystem).to_pylist():
            assert row["scale"] == 1.0
            image_ids.append(row["image_id"])
            keep = ~np.array(row["iscrowd"], dtype=bool)
            masks = [
                decode_rle(counts, row["height"], row["width"])
                for counts, kept in zip(row["masks"], keep, strict=True)
                if kept
            ]
            detection = {
                "boxes": np.array(row["boxes"], np.float64).reshape(-1, 4)[keep],
                "labels": np.array(row["labels"], np.int64)[keep],
                "scores": np.ones(int(keep.sum())),
                "masks": np.stack(masks)
                if masks
                else np.zeros((0, row["height"], row["width"]), np.uint8),
            }
            results += to_coco_results(row["image_id"], detection, label_to_category)
    return image_ids, results


def test_preprocessed_ground_truth_scores_exactly_one_as_the_evaluate_stage_scores(
    dataset, tmp_path, ray_runtime
):
    # The evaluate stage's path after inference: the manifest's label -> category mapping,
    # the annotation file's bytes as ground truth, scored over the split's image ids.
    annotation_file, images_dir = dataset
    out_dir = tmp_path / "shards" / "val"
    manifest = preprocess_split(
        annotation_file=annotation_file,
        images_dir=images_dir,
        out_dir=out_dir,
        model_config=ModelConfig(num_classes=len(CATEGORIES) + 1, canvas=64),
        progress=False,
    )
    assert manifest["counts"]["instances"] == 5 and manifest["counts"]["crowd"] == 1
    assert [c["label"] for c in manifest["categories"]] == [1, 2, 3]
    image_ids, results = _stored_instances_as_detections(out_dir)
    assert sorted(image_ids) == [0, 1, 2] and len(results) == 4
    gt = ground_truth_from_bytes(annotation_file.read_bytes())
    _assert_exact(score_all(gt, results, image_ids=image_ids))
