"""Stage train: Ray Train DDP on the train shards; writes the model, metrics, loss curve, run id."""

from __future__ import annotations

import argparse
import logging

from pipeline.config.params import load_params, model_config, setup_logging
from pipeline.config.settings import TrainSettings
from pipeline.io import storage
from pipeline.registry.tracking import TrackingSettings
from pipeline.shards.schema import read_manifest
from pipeline.training.trainer import train

log = logging.getLogger("stages.train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="directory for model.pt, metrics, loss.csv")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    shards_dir = params.data_path("shards_dir")
    categories = read_manifest(storage.join(shards_dir, "train"))["categories"]
    result = train(
        settings=TrainSettings.from_dict(params.section("train")),
        model_config=model_config(params, num_classes=len(categories) + 1),
        shards_dir=shards_dir,
        tracking=TrackingSettings(**params.section("tracking")),
        out_dir=params.path(args.out),
        ray_address=params.ray_address,
        project_root=params.root,
    )
    log.info("model written to %s (MLflow run %s)", result.model_path, result.run.run_id)


if __name__ == "__main__":
    main()
