"""Detect objects in image files with a trained model: detections JSON plus overlay PNGs.

    python -m stages.predict --model artifacts/train/model.pt --out predictions/ a.jpg b.png
    maskrcnn-predict --model models:/maskrcnn-shapes@champion --out predictions/ photo.jpg
    maskrcnn-predict --backend onnx --model model.onnx --out predictions/ photo.jpg

A models:/ URI is read from the MLflow tracking store given by --tracking-uri (default:
MLFLOW_TRACKING_URI, else MLflow's default, sqlite:///mlflow.db in the current directory).
"""

from __future__ import annotations

import argparse
import logging
import os

from pipeline.config.errors import command
from pipeline.config.params import setup_logging
from pipeline.inference.detector import check_images, predict_files
from pipeline.inference.onnx import load_onnx_detector
from pipeline.registry.pyfunc import load_detector
from pipeline.registry.tracking import check_server

log = logging.getLogger("stages.predict")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files (any size, JPEG, PNG, ...)")
    parser.add_argument(
        "--model", required=True, help="a model file, or a registered model: models:/<name>@<alias>"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="keep detections scoring at least this (default 0.5)",
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default), or onnx: --model is a .onnx file (maskrcnn-export), onnxruntime",
    )
    args = parser.parse_args(argv)
    setup_logging()
    check_images(args.images)
    if args.model.startswith(("models:/", "runs:/")):
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        check_server(uri, setting="--tracking-uri (or MLFLOW_TRACKING_URI)")
    if args.backend == "onnx":
        detector = load_onnx_detector(args.model)
    else:
        detector = load_detector(args.model, tracking_uri=args.tracking_uri)
    path = predict_files(
        detector=detector,
        images=args.images,
        out_dir=args.out,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
    )
    log.info("wrote %s and overlays/ for %d images", path, len(args.images))


if __name__ == "__main__":
    main()
