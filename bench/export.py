"""Inference images/s on CPU: the ONNX export run by onnxruntime vs the PyTorch model (eager).

One process, one model, the same canvas images: the model is exported (``export_onnx``), both
backends run one warm-up image, then alternate image by image for ``--rounds`` rounds so that
both see the same machine load. ``demo`` is params.yaml's model (ResNet-18-FPN, canvas 192, the
demo's shapes classes); ``r50`` is the R50-FPN default configuration (80 COCO classes) at canvas
512. ``--model`` takes a trained model file instead of random weights (for ``demo``: the model
that ``make demo`` trained, artifacts/train/model.pt). Prints one JSON object.

    python bench/export.py --setup demo --model artifacts/train/model.pt
    python bench/export.py --setup r50 --canvas 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import load_average

from maskrcnn.checkpoints import load_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import load_params, model_config
from pipeline.inference.detector import letterbox
from pipeline.inference.onnx import OPSET, OnnxMaskRCNN, export_onnx
from pipeline.io.images import read_rgb

ROOT = Path(__file__).resolve().parent.parent
SHAPES_CLASSES = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("demo", "r50"), default="demo")
    parser.add_argument("--canvas", type=int, default=None, help="default: demo 192, r50 512")
    parser.add_argument("--model", default=None, help="a trained model file (default: random)")
    parser.add_argument("--images", type=int, default=4, help="distinct shapes images")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> MaskRCNN:
    if args.model:
        return load_model(args.model, map_location="cpu").eval()
    torch.manual_seed(0)
    if args.setup == "r50":
        return MaskRCNN(ModelConfig(num_classes=91, canvas=args.canvas or 512)).eval()
    config = model_config(load_params(ROOT / "params.yaml"), num_classes=SHAPES_CLASSES + 1)
    if args.canvas:
        config = dataclasses.replace(config, canvas=args.canvas)
    return MaskRCNN(config).eval()


def canvas_images(count: int, canvas: int, workdir: Path) -> list[torch.Tensor]:
    """``count`` synthetic shapes images, letterboxed onto the canvas: uint8 ``[1, 3, S, S]``."""
    write_shapes_dataset(workdir, n_train=count, n_val=1, seed=11, min_side=160, max_side=320)
    images = []
    for path in sorted((workdir / "images" / "train").iterdir())[:count]:
        resized, _ = letterbox(read_rgb(path), canvas)
        batch = torch.zeros((1, 3, canvas, canvas), dtype=torch.uint8)
        batch[0, :, : resized.shape[0], : resized.shape[1]] = torch.from_numpy(
            np.ascontiguousarray(resized)
        ).permute(2, 0, 1)
        images.append(batch)
    return images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    canvas = model.config.canvas
    with tempfile.TemporaryDirectory() as tmp:
        images = canvas_images(args.images, canvas, Path(tmp) / "shapes")
        started = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - started
        onnx_mb = path.stat().st_size / 1e6
        runtime = OnnxMaskRCNN(path, threads=args.threads)

        def run_torch(image: torch.Tensor) -> int:
            with torch.inference_mode():
                return len(model(image)[0]["scores"])

        def run_onnx(image: torch.Tensor) -> int:
            return len(runtime(image)[0]["scores"])

        backends = {"torch": run_torch, "onnxruntime": run_onnx}
        seconds = dict.fromkeys(backends, 0.0)
        detections = {name: [] for name in backends}
        for run in backends.values():
            run(images[0])  # warm-up
        for _ in range(args.rounds):
            for image in images:
                for name, run in backends.items():
                    start = time.perf_counter()
                    detections[name].append(run(image))
                    seconds[name] += time.perf_counter() - start
    count = args.rounds * len(images)
    result = {
        "bench": "export",
        "setup": args.setup,
        "backbone": model.config.backbone,
        "canvas": canvas,
        "num_classes": model.config.num_classes,
        "weights": args.model or "random",
        "threads": args.threads,
        "images_timed": count,
        "images_per_s": {name: round(count / s, 3) for name, s in seconds.items()},
        "onnxruntime_speedup": round(seconds["torch"] / seconds["onnxruntime"], 3),
        "mean_detections": {name: round(float(np.mean(d)), 1) for name, d in detections.items()},
        "export_s": round(export_s, 1),
        "onnx_mb": round(onnx_mb, 1),
        "opset": OPSET,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "load_average": load_average(),
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
