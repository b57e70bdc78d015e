"""COCO scoring, as the evaluate stage imports it: the code lives in ``pipeline.coco.cocoeval``,
a layer below training, so that evaluation during training scores with exactly the same code
(``pipeline.training.periodic_eval``) without training importing the evaluation layer."""

from pipeline.coco.cocoeval import (
    IOU_TYPES,
    PR_CURVES,
    SUMMARY_KEYS,
    CocoScores,
    flat_metrics,
    ground_truth_from_bytes,
    load_ground_truth,
    pr_curve_rows,
    score,
    score_all,
    summary_table,
    to_coco_results,
)

__all__ = [
    "IOU_TYPES",
    "PR_CURVES",
    "SUMMARY_KEYS",
    "CocoScores",
    "flat_metrics",
    "ground_truth_from_bytes",
    "load_ground_truth",
    "pr_curve_rows",
    "score",
    "score_all",
    "summary_table",
    "to_coco_results",
]
