"""COCO scoring with pycocotools: detections in, AP / AR / per-class AP / PR curves out.

pycocotools prints progress on stdout; every call here captures that and sends it to the debug
log, so the stage's own output stays a readable summary table.

The ground truth is handed to pycocotools with its annotation ids renumbered 1..N in file order:
COCOeval marks "no match" with 0 in its match arrays, so an annotation whose id is 0 (labelme and
CVAT exports start at 0) could never count as found, and duplicate ids would collapse in its
index. Image and category ids, the only ids in our outputs, are the user's, untouched.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.coco.validate import Rejected, crowd_flag
from pipeline.io import storage

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# The order of COCOeval.stats for detection.
SUMMARY_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# Precision-recall curves written for `dvc plots`: name -> IoU thresholds averaged over.
PR_CURVES = {"iou50": (0.5,), "iou75": (0.75,), "iou50_95": tuple(np.linspace(0.5, 0.95, 10))}


@dataclass(frozen=True)
class CocoScores:
    """One COCOeval result. ``None`` marks what COCO leaves undefined (no ground truth in range)."""

    iou_type: str
    summary: dict[str, float | None]
    per_class: dict[str, float | None]
    recall: np.ndarray  # [R] recall thresholds (0.00, 0.01, ..., 1.00)
    precision: dict[str, np.ndarray]  # PR_CURVES name -> [R] precision averaged over classes


@contextlib.contextmanager
def _quiet_pycocotools():
    """pycocotools prints its progress: keep it for the debug log. ``print`` itself is swapped
    too, because in a Ray Train worker (evaluation during training) it is Ray's, which logs
    past any redirect of stdout."""
    buffer = io.StringIO()

    def to_buffer(*objects: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        buffer.write(sep.join(map(str, objects)) + end)

    printing, builtins.print = builtins.print, to_buffer
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        builtins.print = printing
    if buffer.getvalue().strip():
        log.debug("pycocotools:\n%s", buffer.getvalue().rstrip())


def load_ground_truth(annotation_file: storage.Location) -> COCO:
    """The original COCO annotation file (a path or a URI), as pycocotools reads it."""
    try:
        raw = storage.read_bytes(annotation_file)
    except FileNotFoundError:
        raise ValueError(f"annotation file {annotation_file} does not exist") from None
    return ground_truth_from_bytes(raw)


def ground_truth_from_bytes(raw: bytes) -> COCO:
    """A COCO annotation file's bytes as pycocotools' ground truth (for a caller that also
    needs the bytes, so that the file is read once)."""
    dataset = json.loads(raw)
    dataset["annotations"] = [
        _scoring_annotation(ann, number)
        for number, ann in enumerate(
            (a for a in dataset.get("annotations", []) if isinstance(a, dict)), start=1
        )
    ]
    with _quiet_pycocotools():
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _scoring_annotation(ann: dict[str, Any], number: int) -> dict[str, Any]:
    """An annotation as COCOeval needs it: id ``number`` (never 0, never repeated) and
    ``iscrowd`` read as preprocess reads it (a string "0" is not a crowd, as pycocotools'
    truth test would make it). An ``iscrowd`` that preprocess refuses marks an ignored region:
    that annotation was left out of training, so a detection on it is neither right nor wrong."""
    try:
        iscrowd = crowd_flag(ann.get("iscrowd", 0))
    except Rejected:
        iscrowd = True
    return {**ann, "id": number, "iscrowd": int(iscrowd)}


def to_coco_results(
    image_id: int,
    detection: Mapping[str, np.ndarray],
    label_to_category: Mapping[int, int],
) -> list[dict[str, Any]]:
    """One image's detections in original coordinates -> COCO results entries.

    ``detection`` holds ``boxes`` [N, 4] x1y1x2y2, ``labels`` [N] contiguous 1..K, ``scores`` [N]
    and ``masks`` [N, H, W] uint8 (0/1). Masks become compressed RLE with ``counts`` as str.
    """
    boxes = np.asarray(detection["boxes"], dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(detection["labels"]).reshape(-1)
    scores = np.asarray(detection["scores"], dtype=np.float64).reshape(-1)
    masks = np.asarray(detection["masks"], dtype=np.uint8)
    if not len(boxes) == len(labels) == len(scores) == len(masks):
        raise ValueError(f"image {image_id}: boxes, labels, scores and masks differ in length")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    results = []
    for box, label, score, rle in zip(boxes, labels, scores, rles, strict=True):
        if int(label) not in label_to_category:
            raise ValueError(f"image {image_id}: label {int(label)} has no category id")
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_category[int(label)]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode(),
                },
            }
        )
    return results


def _load_results(gt: COCO, results: Sequence[dict[str, Any]], iou_type: str) -> COCO:
    """pycocotools' ``loadRes``, which also accepts an empty list (it fails on one)."""
    anns = copy.deepcopy(list(results))
    if iou_type == "segm":
        # Without a bbox, loadRes takes each detection's area from its mask (as detectron2 does),
        # so APs/APm/APl for masks bin by mask area.
        for ann in anns:
            ann.pop("bbox", None)
    if anns:
        with _quiet_pycocotools():
            return gt.loadRes(anns)
    empty = COCO()
    empty.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": gt.dataset["categories"],
        "annotations": [],
    }
    with _quiet_pycocotools():
        empty.createIndex()
    return empty


def score(
    gt: COCO,
    results: Sequence[dict[str, Any]],
    *,
    iou_type: str,
    image_ids: Iterable[int] | None = None,
) -> CocoScores:
    """Run COCOeval for ``iou_type`` over ``image_ids`` (default: every image in ``gt``)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    known = set(gt.getImgIds())
    ids = sorted(known if image_ids is None else {int(i) for i in image_ids})
    unknown = sorted({int(r["image_id"]) for r in results} - known) + sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the annotation file")
    dt = _load_results(gt, results, iou_type)
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.imgIds = ids
    with _quiet_pycocotools():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]; -1 where a class has no ground truth
    summary = {k: _defined(v) for k, v in zip(SUMMARY_KEYS, evaluator.stats, strict=True)}
    names = {c["id"]: c["name"] for c in gt.loadCats(evaluator.params.catIds)}
    per_class = {
        names[cat_id]: _mean_defined(precision[:, :, k, 0, -1])
        for k, cat_id in enumerate(evaluator.params.catIds)
    }
    curves = {}
    for name, thresholds in PR_CURVES.items():
        rows = [int(np.argmin(np.abs(evaluator.params.iouThrs - t))) for t in thresholds]
        curve = precision[rows, :, :, 0, -1]  # [t, R, K]
        valid = curve > -1
        counts = valid.sum(axis=(0, 2))
        sums = np.where(valid, curve, 0.0).sum(axis=(0, 2))
        curves[name] = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return CocoScores(
        iou_type=iou_type,
        summary=summary,
        per_class=per_class,
        recall=np.asarray(evaluator.params.recThrs, dtype=np.float64),
        precision=curves,
    )


def _defined(value: float) -> float | None:
    return None if value < 0 else round(float(value), 6)


def _mean_defined(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return None if valid.size == 0 else round(float(valid.mean()), 6)


def score_all(
    gt: COCO, results: Sequence[dict[str, Any]], *, image_ids: Iterable[int] | None = None
) -> dict[str, CocoScores]:
    """bbox and segm scores for the same results."""
    ids = None if image_ids is None else list(image_ids)
    return {t: score(gt, results, iou_type=t, image_ids=ids) for t in IOU_TYPES}


def flat_metrics(scores: Mapping[str, CocoScores]) -> dict[str, Any]:
    """metrics.json: ``{"bbox_AP": .., "segm_AP50": .., "per_class": {"segm": {name: AP}}}``."""
    metrics: dict[str, Any] = {}
    for iou_type, s in scores.items():
        metrics.update({f"{iou_type}_{key}": value for key, value in s.summary.items()})
    metrics["per_class"] = {iou_type: dict(s.per_class) for iou_type, s in scores.items()}
    return metrics


def pr_curve_rows(scores: Mapping[str, CocoScores]) -> list[dict[str, float]]:
    """One row per recall threshold, a precision column per (iou type, curve): for dvc plots."""
    first = next(iter(scores.values()))
    rows = []
    for r, recall in enumerate(first.recall):
        row = {"recall": round(float(recall), 4)}
        for iou_type, s in scores.items():
            for name, curve in s.precision.items():
                row[f"{iou_type}_{name}"] = round(float(curve[r]), 6)
        rows.append(row)
    return rows


def summary_table(scores: Mapping[str, CocoScores]) -> str:
    """A small fixed-width table of the headline figures and the per-class AP."""

    def fmt(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:6.2f}"

    headline = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    lines = ["type  " + " ".join(f"{k:>6}" for k in headline)]
    for iou_type, s in scores.items():
        lines.append(f"{iou_type:<5} " + " ".join(fmt(s.summary[k]) for k in headline))
    names = list(next(iter(scores.values())).per_class)
    if names:
        width = max(12, *(len(n) for n in names))
        lines.append("")
        lines.append(f"{'class':<{width}} " + " ".join(f"{t:>6}" for t in scores))
        for name in names:
            values = " ".join(fmt(s.per_class[name]) for s in scores.values())
            lines.append(f"{name:<{width}} {values}")
    return "\n".join(lines)
