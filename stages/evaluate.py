"""Stage evaluate: batch inference on the val shards, COCO mAP (bbox, segm), PR curves, overlays."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.config.errors import command
from pipeline.config.params import load_params, setup_logging
from pipeline.config.settings import EvaluateSettings
from pipeline.evaluation.evaluate import evaluate
from pipeline.io import storage
from pipeline.io.outputs import TRAIN
from pipeline.registry.tracking import RunRef, check_server

log = logging.getLogger("stages.evaluate")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--verbose", action="store_true", help="Ray's own INFO lines too")
    parser.add_argument("--train", required=True, help="the train stage's output directory")
    parser.add_argument("--out", required=True, help="directory for metrics, curves, overlays")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = params.settings(EvaluateSettings)
    train_dir = Path(params.path(args.train))
    model_path = TRAIN.find(train_dir, TRAIN.model)
    run_file = TRAIN.find(train_dir, TRAIN.run)
    run = RunRef.read(run_file)
    check_server(run.tracking_uri, setting=f"tracking_uri in {run_file}")
    metrics = evaluate(
        model_path=model_path,
        shards_dir=storage.join(params.data_path("shards_dir"), "val"),
        annotation_file=params.data_path("val_annotations"),
        images_dir=params.data_path("val_images"),
        out_dir=params.path(args.out),
        ray_address=params.ray_address,
        verbose=args.verbose,
        tracking_run=run.to_dict(),
        tracking_step=_model_step(train_dir),
        **settings.to_dict(),
    )
    log.info("bbox AP %.3f, segm AP %.3f", metrics["bbox_AP"], metrics["segm_AP"])


def _model_step(train_dir: Path) -> int:
    """The training step of the model the train stage wrote (the best one's with select: best)."""
    metrics = json.loads(TRAIN.find(train_dir, TRAIN.metrics).read_text())
    return int(metrics.get("selected_step", metrics.get("step", 0)))


if __name__ == "__main__":
    main()
