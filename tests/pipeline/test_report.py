"""The end-of-demo summary: figures from the stage outputs, and what is missing when a stage
has not run."""

from __future__ import annotations

import json

from stages.report import report_lines


def test_missing_outputs_are_named(tmp_path):
    lines = report_lines(tmp_path)
    assert lines == [
        f"no training metrics in {tmp_path / 'train'}",
        f"no evaluation metrics in {tmp_path / 'evaluate'}",
    ]


def test_a_challenger_is_reported_as_such(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "register").mkdir()
    scores = {"num_images": 5, "bbox_AP": 0.5, "bbox_AP50": 0.75, "segm_AP": 0.25,
              "segm_AP50": 0.5, "per_class": {"segm": {"circle": 0.3, "ring": 0.2}}}  # fmt: skip
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps(scores))
    decision = {"model_name": "m", "version": 3, "champion": False, "reason": "worse"}
    (tmp_path / "register" / "decision.json").write_text(json.dumps(decision))
    lines = report_lines(tmp_path)
    assert lines[1:] == [
        "val (5 images): bbox AP 0.500 (AP50 0.750), segm AP 0.250 (AP50 0.500)",
        "segm AP per class: circle 0.30, ring 0.20",
        "registry: m v3 is challenger (worse)",
    ]


def test_the_training_line_counts_its_workers(tmp_path):
    (tmp_path / "train").mkdir()
    train = {"step": 600, "train_s": 456.0, "images_per_s": 10.52, "num_workers": 1,
             "global_batch": 8, "loss": 0.4879}  # fmt: skip
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(train))
    assert report_lines(tmp_path)[0] == (
        "trained 600 steps in 7.6 min (10.5 images/s, 1 worker, global batch 8), final loss 0.488"
    )
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({**train, "num_workers": 2}))
    assert "(10.5 images/s, 2 workers," in report_lines(tmp_path)[0]
