"""Stage evaluate: batch inference on the val shards, COCO mAP (bbox, segm), PR curves, overlays."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.config.params import load_params, setup_logging
from pipeline.evaluation.evaluate import evaluate
from pipeline.io import storage

log = logging.getLogger("stages.evaluate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train", required=True, help="the train stage's output directory")
    parser.add_argument("--out", required=True, help="directory for metrics, curves, overlays")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    train_dir = Path(params.path(args.train))
    metrics = evaluate(
        model_path=train_dir / "model.pt",
        shards_dir=storage.join(params.data_path("shards_dir"), "val"),
        annotation_file=params.data_path("val_annotations"),
        images_dir=params.data_path("val_images"),
        out_dir=params.path(args.out),
        ray_address=params.ray_address,
        tracking_run=json.loads((train_dir / "run.json").read_text()),
        **params.section("evaluate"),
    )
    log.info("bbox AP %.3f, segm AP %.3f", metrics["bbox_AP"], metrics["segm_AP"])


if __name__ == "__main__":
    main()
