"""COCO scoring: the ground truth scores 1.0, known perturbations score what the IoU rule says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.evaluation.cocoeval import (
    flat_metrics,
    load_ground_truth,
    pr_curve_rows,
    score,
    score_all,
    summary_table,
    to_coco_results,
)

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}, {"id": 9, "name": "unused"}]
LABEL_TO_CATEGORY = {1: 3, 2: 7, 3: 9}
CATEGORY_TO_LABEL = {v: k for k, v in LABEL_TO_CATEGORY.items()}
H, W = 160, 200


def _disk(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


@pytest.fixture(scope="module")
def annotation_file(tmp_path_factory):
    """Three images with a square (polygon) and a disk (RLE) far apart, and one empty image."""
    images, annotations = [], []
    for image_id in (1, 2, 3, 4):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": H, "width": W})
        if image_id == 4:
            continue
        x, y, s = 10 + 5 * image_id, 20, 40 + 4 * image_id
        square = [x, y, x + s, y, x + s, y + s, x, y + s]
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 3,
                "segmentation": [square],
                "bbox": [x, y, s, s],
                "area": s * s,
                "iscrowd": 0,
            }
        )
        disk = _disk(140, 90 + 3 * image_id, 25)
        rle = mask_utils.encode(np.asfortranarray(disk))
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 7,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)),
                "iscrowd": 0,
            }
        )
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def gt(annotation_file):
    return load_ground_truth(annotation_file)


def _ground_truth_detections(gt, *, shift: float = 0.0) -> list[dict]:
    """The annotations as model-style detections (xyxy boxes), boxes shifted right by a fraction."""
    results = []
    for image_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        if not anns:
            continue
        boxes = np.array(
            [
                [x + shift * w, y, x + w + shift * w, y + h]
                for x, y, w, h in (a["bbox"] for a in anns)
            ],
            dtype=np.float32,
        ).reshape(-1, 4)
        detection = {
            "boxes": boxes,
            "labels": np.array([CATEGORY_TO_LABEL[a["category_id"]] for a in anns], dtype=np.int64),
            "scores": np.linspace(0.9, 0.5, len(anns), dtype=np.float32),
            "masks": np.stack([gt.annToMask(a) for a in anns]),
        }
        results += to_coco_results(image_id, detection, LABEL_TO_CATEGORY)
    return results


def test_ground_truth_as_predictions_scores_one(gt):
    results = _ground_truth_detections(gt)
    assert len(results) == 6
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    json.dumps(results)  # COCO results format, as written to predictions.json
    scores = score_all(gt, results)
    for iou_type in ("bbox", "segm"):
        summary = scores[iou_type].summary
        assert summary["AP"] == pytest.approx(1.0), (iou_type, summary)
        assert summary["AP50"] == pytest.approx(1.0)
        assert summary["AR100"] == pytest.approx(1.0)
        assert summary["APs"] is None  # no small objects: COCO leaves it undefined
        assert scores[iou_type].per_class == {"square": 1.0, "disk": 1.0, "unused": None}
        assert np.allclose(scores[iou_type].precision["iou50_95"], 1.0)


def test_scoring_prints_nothing_even_where_print_is_replaced(gt, monkeypatch, capsys):
    """In a Ray Train worker ``print`` is Ray's own, which logs past a stdout redirect: the
    COCOeval summary of every evaluation during training would flood the training log."""
    printed = []
    monkeypatch.setattr("builtins.print", lambda *objects, **_: printed.append(objects))
    score_all(gt, _ground_truth_detections(gt))
    assert printed == [] and capsys.readouterr().out == ""


def test_shifted_boxes_lower_bbox_ap_only(gt):
    # Shifting a box by a fifth of its width gives IoU (1 - 0.2) / (1 + 0.2) = 2/3: a match at the
    # thresholds 0.50..0.65 (4 of 10), a miss from 0.70 up. The masks are untouched.
    scores = score_all(gt, _ground_truth_detections(gt, shift=0.2))
    bbox, segm = scores["bbox"].summary, scores["segm"].summary
    assert bbox["AP50"] == pytest.approx(1.0)
    assert bbox["AP75"] == pytest.approx(0.0)
    assert bbox["AP"] == pytest.approx(0.4, abs=1e-6)
    assert segm["AP"] == pytest.approx(1.0)
    curve = scores["bbox"].precision
    assert np.allclose(curve["iou50"], 1.0) and np.allclose(curve["iou75"], 0.0)


def test_zero_predictions_score_zero_without_crash(gt):
    scores = score_all(gt, [])
    for s in scores.values():
        assert s.summary["AP"] == 0.0 and s.summary["AR100"] == 0.0
        assert s.per_class["square"] == 0.0 and s.per_class["unused"] is None
    rows = pr_curve_rows(scores)
    assert len(rows) == 101 and all(row["segm_iou50"] == 0.0 for row in rows)
    assert "square" in summary_table(scores)


def test_one_class_right_one_missing_halves_ap(gt):
    results = [r for r in _ground_truth_detections(gt) if r["category_id"] == 7]
    s = score(gt, results, iou_type="segm")
    assert s.per_class == {"square": 0.0, "disk": 1.0, "unused": None}
    assert s.summary["AP"] == pytest.approx(0.5)


def test_image_subset_and_flat_metrics(gt):
    results = [r for r in _ground_truth_detections(gt) if r["image_id"] == 1]
    assert score(gt, results, iou_type="bbox", image_ids=[1]).summary["AP"] == pytest.approx(1.0)
    metrics = flat_metrics(score_all(gt, results))  # images 2 and 3 missed
    assert 0.0 < metrics["bbox_AR100"] < 0.5
    assert set(metrics["per_class"]) == {"bbox", "segm"}
    json.dumps(metrics)


def test_bad_input_is_a_clear_error(gt, tmp_path):
    with pytest.raises(ValueError, match="not in the annotation file"):
        score(
            gt,
            [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}],
            iou_type="bbox",
        )
    with pytest.raises(ValueError, match="label 5"):
        bad = {
            "boxes": np.zeros((1, 4)),
            "labels": np.array([5]),
            "scores": np.ones(1),
            "masks": np.zeros((1, H, W), np.uint8),
        }
        to_coco_results(1, bad, LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="does not exist"):
        load_ground_truth(tmp_path / "missing.json")
