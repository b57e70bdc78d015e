"""Stage register: log the model to MLflow, register a version, gate the champion alias."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config.params import load_params, setup_logging
from pipeline.io import storage
from pipeline.registry.register import register
from pipeline.shards.schema import read_manifest

log = logging.getLogger("stages.register")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train", required=True, help="the train stage's output directory")
    parser.add_argument("--evaluate", required=True, help="the evaluate stage's output directory")
    parser.add_argument("--out", required=True, help="directory for decision.json")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    train_dir, eval_dir = Path(params.path(args.train)), Path(params.path(args.evaluate))
    decision = register(
        model_path=train_dir / "model.pt",
        eval_metrics=eval_dir / "metrics.json",
        run_info=train_dir / "run.json",
        out_path=f"{params.path(args.out)}/decision.json",
        categories=read_manifest(storage.join(params.data_path("shards_dir"), "val"))["categories"],
        **params.section("register"),
    )
    log.info("%s v%s: %s", decision["model_name"], decision["version"], decision["reason"])


if __name__ == "__main__":
    main()
