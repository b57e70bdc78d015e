"""Stage synthesize: write the built-in synthetic COCO-format dataset (params: shapes)."""

from __future__ import annotations

import argparse
import logging

from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.errors import command
from pipeline.config.params import load_params, setup_logging
from pipeline.config.settings import ShapesSettings

log = logging.getLogger("stages.synthesize")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="dataset root (images/ and annotations/)")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = params.settings(ShapesSettings)
    summary = write_shapes_dataset(params.path(args.out), **settings.to_dict())
    log.info("synthetic dataset written to %s: %s", args.out, summary)


if __name__ == "__main__":
    main()
