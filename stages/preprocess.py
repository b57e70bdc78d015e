"""Stage preprocess: COCO-format splits -> Parquet shards with precomputed RPN targets."""

from __future__ import annotations

import argparse
import logging

from pipeline.config.errors import command
from pipeline.config.params import load_params, model_config, setup_logging
from pipeline.config.settings import PreprocessSettings
from pipeline.io import storage
from pipeline.io.ray_runtime import ensure_ray
from pipeline.shards.preprocess import preprocess_split

log = logging.getLogger("stages.preprocess")

SPLITS = ("train", "val")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = params.settings(PreprocessSettings)
    # Matching depends on the anchors and RPN thresholds only, not on the class count.
    config = model_config(params, num_classes=2)
    ensure_ray(params.ray_address)
    shards_dir = params.data_path("shards_dir")
    for split in SPLITS:
        manifest = preprocess_split(
            annotation_file=params.data_path(f"{split}_annotations"),
            images_dir=params.data_path(f"{split}_images"),
            out_dir=storage.join(shards_dir, split),
            model_config=config,
            ray_address=params.ray_address,
            **settings.to_dict(),
        )
        counts = manifest["counts"]
        log.info("%s: %s", split, {k: v for k, v in counts.items() if k != "skipped"})


if __name__ == "__main__":
    main()
