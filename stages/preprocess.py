"""Stage preprocess: COCO-format splits -> Parquet shards with precomputed RPN targets."""

from __future__ import annotations

import argparse
import logging

from pipeline.config.errors import UserError, command
from pipeline.config.params import Params, load_params, model_config, setup_logging
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
    parser.add_argument("--verbose", action="store_true", help="Ray's own INFO lines too")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = params.settings(PreprocessSettings)
    # Matching depends on the anchors and RPN thresholds only, not on the class count.
    config = model_config(params, num_classes=2)
    _check_inputs_exist(params)  # both splits, before the first one takes minutes
    shards_dir = params.data_path("shards_dir")
    ensure_ray(params.ray_address, verbose=args.verbose)
    for split in SPLITS:
        manifest = preprocess_split(
            annotation_file=params.data_path(f"{split}_annotations"),
            images_dir=params.data_path(f"{split}_images"),
            out_dir=storage.join(shards_dir, split),
            model_config=config,
            ray_address=params.ray_address,
            **settings.to_dict(),  # progress: a bar on a terminal, else a line every few seconds
        )
        counts = manifest["counts"]
        log.info("%s: %s", split, {k: v for k, v in counts.items() if k != "skipped"})


def _check_inputs_exist(params: Params) -> None:
    keys = [f"{split}_{kind}" for split in SPLITS for kind in ("annotations", "images")]
    missing = [
        f"data.{key} = {params.data_path(key)}"
        for key in keys
        if not storage.exists(params.data_path(key))
    ]
    if missing:
        raise UserError(
            f"{params.source}: not found: {'; '.join(missing)}. Point data.* at your COCO "
            "files, or run the synthesize stage for the built-in dataset (dvc repro synthesize)"
        )


if __name__ == "__main__":
    main()
