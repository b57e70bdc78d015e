"""Stage train: Ray Train DDP on the train shards; writes the model, metrics, loss curve, run id."""

from __future__ import annotations

import argparse
import logging

from pipeline.config.errors import command
from pipeline.config.params import load_params, model_config, setup_logging
from pipeline.config.settings import PreprocessSettings, TrackingSettings, TrainSettings
from pipeline.io import storage
from pipeline.shards.schema import read_manifest
from pipeline.training.trainer import train

log = logging.getLogger("stages.train")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--verbose", action="store_true", help="Ray's own INFO lines too")
    parser.add_argument("--out", required=True, help="directory for model.pt, metrics, loss.csv")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    shards_dir = params.data_path("shards_dir")
    manifest = read_manifest(storage.join(shards_dir, "train"))  # the class count; read once
    result = train(
        settings=params.settings(TrainSettings),
        model_config=model_config(params, num_classes=len(manifest["categories"]) + 1),
        shards_dir=shards_dir,
        tracking=params.settings(TrackingSettings),
        out_dir=params.path(args.out),
        ray_address=params.ray_address,
        project_root=params.root,
        train_manifest=manifest,
        val_annotations=params.data_path("val_annotations"),  # train.eval_every scores on it
        train_scales=params.settings(PreprocessSettings).train_scales,  # the shards must match
        verbose=args.verbose,
    )
    log.info("model written to %s (MLflow run %s)", result.model_path, result.run.run_id)


if __name__ == "__main__":
    main()
