"""ONNX export of the whole eval graph on the fixed canvas, and running it with onnxruntime.

    from pipeline.inference.onnx import export_onnx, load_onnx_detector
    export_onnx(model, "model.onnx", categories=categories)   # a MaskRCNN, its classes
    detector = load_onnx_detector("model.onnx")                # a Detector: detect, to_record

The graph takes ``images`` uint8 ``[1, 3, S, S]`` (the image at the canvas's top-left, zero
padded right and bottom: the static input the fixed canvas gives) and returns ``boxes [N, 4]``
(canvas pixels), ``labels [N]`` (int64, 1..K), ``scores [N]`` and ``masks [N, 1, S, S]`` (mask
probabilities on the canvas): normalisation, backbone, RPN, NMS, RoIAlign, box and mask heads and
mask pasting are all inside it (``ExportableMaskRCNN``). It is written by ``torch.onnx.export``'s
dynamo exporter (``torch.export`` + onnxscript) at opset ``OPSET``; the model configuration and
the categories travel in the file's metadata, so the file alone is a predictor.

onnx, onnxscript and onnxruntime are the optional extra ``onnx`` (``pip install -e '.[onnx]'``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.inference.detector import Detector
from pipeline.inference.exportable import OUTPUT_NAMES, ExportableMaskRCNN

OPSET = 18  # torchlib's own opset in torch 2.14: no version conversion after the export
INPUT_NAME = "images"
CONFIG_KEY, CATEGORIES_KEY = "maskrcnn_config", "maskrcnn_categories"
# The exporter's graph passes log one INFO line per deduplicated initializer (screens of them).
QUIET_LOGGERS = ("onnx_ir", "onnxscript")
MISSING_EXTRA = "needs the optional extra 'onnx': pip install -e '.[onnx]'"


def export_onnx(
    model: MaskRCNN,
    path: str | os.PathLike,
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``model``'s eval graph for one ``S x S`` image to ``path`` (one file, weights in it).

    The model is copied (its caches stay untouched) and run once eagerly first, so that its
    anchor tables are real tensors when the export traces them.
    """
    try:
        import onnx
    except ImportError as err:
        raise ValueError(f"ONNX export {MISSING_EXTRA} ({err})") from None
    canvas = model.config.canvas
    plain = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    graph = ExportableMaskRCNN(plain).eval()
    example = torch.zeros((1, 3, canvas, canvas), dtype=torch.uint8)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad(), warnings.catch_warnings():
        # torchvision's nms meta kernel still calls a renamed torch API: noise, not a problem.
        warnings.filterwarnings("ignore", "`create_unbacked_symint` is deprecated", FutureWarning)
        graph(example)
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    if categories:
        meta[CATEGORIES_KEY] = json.dumps([dict(c) for c in categories])
    onnx.helper.set_model_props(proto, meta)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(target)
    return target


class OnnxMaskRCNN(nn.Module):
    """An exported model run by onnxruntime, with ``MaskRCNN``'s eval interface (``config``,
    ``model(images)`` -> ``list[dict(boxes, labels, scores, masks)]``), so that ``Detector``
    runs it like the PyTorch model. The graph takes one image: a batch runs image by image."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as err:
            raise ValueError(f"running an ONNX model {MISSING_EXTRA} ({err})") from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors for a bad file
            raise ValueError(f"{path}: cannot load an ONNX model ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path}: not exported by this pipeline (no {CONFIG_KEY} metadata)")
        self.config = ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        self.categories = json.loads(meta[CATEGORIES_KEY]) if CATEGORIES_KEY in meta else None

    def forward(self, images: Tensor, *, paste_masks: bool = True) -> list[dict[str, Tensor]]:
        """The graph's detections; its masks are on the canvas whatever ``paste_masks`` asks
        (the graph pastes them), which ``to_original`` takes as well."""
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        outputs = []
        for image in images.cpu().numpy():
            values = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image[None]})
            tensors = [torch.from_numpy(np.asarray(v)) for v in values]
            outputs.append(dict(zip(OUTPUT_NAMES, tensors, strict=True)))
        return outputs


def load_onnx_detector(path: str | os.PathLike, *, threads: int | None = None) -> Detector:
    """A ``Detector`` (detect, to_record, overlay) on an exported ``.onnx`` file."""
    if not Path(path).is_file():
        raise ValueError(f"ONNX model file {path} does not exist")
    model = OnnxMaskRCNN(path, threads=threads)
    return Detector(model, categories=model.categories)


def detector_categories(detector: Detector) -> list[dict[str, Any]]:
    """A Detector's classes as ``[{id, name, label}]``, as the shards and model files store them."""
    return [
        {"id": detector.category_ids[label], "name": detector.names[label], "label": label}
        for label in sorted(detector.names)
    ]


def export_detector(detector: Detector, path: str | os.PathLike) -> Path:
    """A loaded Detector's model and classes exported to ``path`` (the export CLI, register)."""
    return export_onnx(detector.model, path, categories=detector_categories(detector))
