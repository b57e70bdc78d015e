"""Export a trained model to ONNX: the whole eval graph on its fixed S x S canvas.

    maskrcnn-export --model artifacts/train/model.pt --out model.onnx
    maskrcnn-export --model models:/maskrcnn-shapes@champion --out model.onnx

The graph takes one image, uint8 [1, 3, S, S] (resized so that its longer side is S, at the
top-left, zero padded), and returns boxes [N, 4], labels [N], scores [N] and mask probabilities
[N, 1, S, S] on the canvas (README, "Export"). Needs the optional extra: pip install -e '.[onnx]'.
A models:/ URI is read from --tracking-uri (default: MLFLOW_TRACKING_URI, else MLflow's default).
"""

from __future__ import annotations

import argparse
import logging
import time

from pipeline.config.errors import command
from pipeline.config.params import setup_logging
from pipeline.inference.onnx import OPSET, export_detector
from pipeline.registry.pyfunc import load_detector

log = logging.getLogger("stages.export")


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a model file, or a registered model: models:/<name>@<alias>"
    )
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/")
    args = parser.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    detector = load_detector(args.model, tracking_uri=args.tracking_uri, device="cpu")
    path = export_detector(detector, args.out)
    log.info(
        "wrote %s (opset %d, canvas %d) in %.0f s",
        path,
        OPSET,
        detector.canvas,
        time.monotonic() - started,
    )


if __name__ == "__main__":
    main()
