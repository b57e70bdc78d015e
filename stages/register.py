"""Stage register: log the model to MLflow, register a version, gate the champion alias."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config.errors import command
from pipeline.config.params import load_params, setup_logging
from pipeline.config.settings import RegisterSettings
from pipeline.io.outputs import EVALUATE, REGISTER, TRAIN
from pipeline.registry.register import register
from pipeline.registry.tracking import RunRef, check_server

log = logging.getLogger("stages.register")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train", required=True, help="the train stage's output directory")
    parser.add_argument("--evaluate", required=True, help="the evaluate stage's output directory")
    parser.add_argument("--out", required=True, help="directory for decision.json")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = params.settings(RegisterSettings)
    train_dir, eval_dir = Path(params.path(args.train)), Path(params.path(args.evaluate))
    model_path = TRAIN.find(train_dir, TRAIN.model)  # it names its categories
    run_file = TRAIN.find(train_dir, TRAIN.run)
    run = RunRef.read(run_file)
    if settings.tracking_uri:
        check_server(settings.tracking_uri, setting="register.tracking_uri")
    else:
        check_server(run.tracking_uri, setting=f"tracking_uri in {run_file}")
    decision = register(
        model_path=model_path,
        eval_metrics=EVALUATE.find(eval_dir, EVALUATE.metrics),
        run_info=run.to_dict(),
        out_path=Path(params.path(args.out)) / REGISTER.decision,
        **settings.to_dict(),
    )
    log.info("%s v%s: %s", decision["model_name"], decision["version"], decision["reason"])


if __name__ == "__main__":
    main()
