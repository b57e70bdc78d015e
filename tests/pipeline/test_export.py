"""ONNX export: onnxruntime gives the PyTorch model's detections, on a model that has learnt a bit.

A small model is trained for a few steps on the synthetic shapes (so that its detections are
shapes, not noise), exported with ``export_onnx`` and run by onnxruntime on train and val images:
the same number of detections per image, equal labels, boxes within 0.05 canvas pixels, scores
within 1e-4, mask probabilities within 1e-3 and mask IoU (canvas masks at 0.5) of at least 0.99
per image and per mask of at least 200 pixels, over at least 20 detections.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.inference.detector import letterbox
from pipeline.inference.exportable import paste_masks_dense
from pipeline.inference.onnx import OnnxMaskRCNN, export_onnx, load_onnx_detector
from pipeline.io.images import read_rgb
from stages import predict

pytest.importorskip("onnxruntime", reason="the optional extra 'onnx' is not installed")
# About a minute of CPU (training, export, both runtimes); on a shared machine far more wall time.
pytestmark = pytest.mark.timeout(2400)

CANVAS = 128
STEPS, BATCH = 10, 2  # a few steps: the scores already rank shapes above background
BOX_ATOL_PX, SCORE_ATOL, MIN_MASK_IOU, MIN_DETECTIONS = 0.05, 1e-4, 0.99, 20
# Per mask of at least SMALL_MASK_PX pixels: a border pixel whose probability rounds across 0.5
# differently in the closed-form paste measured IoU 0.976 on a ~200 px mask.
SMALL_MASK_PX, MIN_LARGE_MASK_IOU = 200, 0.95


def small_config(num_classes: int) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "num_classes": num_classes,
            "backbone": "resnet18",
            "canvas": CANVAS,
            "norm": "bn",
            "fpn_channels": 32,
            "anchors": {"sizes": [16, 32, 64, 128, 256]},
            "rpn": {"pre_nms_top_n_test": 300, "post_nms_top_n_test": 100},
            "roi": {"batch_size_per_image": 64, "representation_size": 64, "mask_layers": [32]},
        }
    )


def canvas_samples(root: Path, split: str) -> tuple[list[torch.Tensor], list[dict], list[dict]]:
    """Each image of a split on the canvas (uint8 [3, S, S]) with its non-crowd instances."""
    coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    labels = {cat_id: i + 1 for i, cat_id in enumerate(sorted(coco.getCatIds()))}
    images, targets = [], []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        resized, _ = letterbox(read_rgb(root / "images" / split / info["file_name"]), CANVAS)
        h, w = resized.shape[:2]
        canvas = torch.zeros((3, CANVAS, CANVAS), dtype=torch.uint8)
        canvas[:, :h, :w] = torch.from_numpy(resized.copy()).permute(2, 0, 1)
        boxes, classes, masks = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            small = Image.fromarray(coco.annToMask(ann) * 255).resize((w, h), Image.NEAREST)
            mask = np.zeros((CANVAS, CANVAS), np.uint8)
            mask[:h, :w] = np.asarray(small) > 127
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(labels[ann["category_id"]])
            masks.append(mask)
        images.append(canvas)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(classes, dtype=torch.int64),
                "masks": torch.from_numpy(
                    np.stack(masks) if masks else np.zeros((0, CANVAS, CANVAS), np.uint8)
                ),
            }
        )
    categories = [
        {"id": cat["id"], "name": cat["name"], "label": labels[cat["id"]]}
        for cat in coco.loadCats(sorted(labels))
    ]
    return images, targets, categories


@pytest.fixture(scope="module")
def trained(shapes_dataset, tmp_path_factory) -> dict:
    """A model trained for STEPS steps on the shapes' train split, and its ONNX export."""
    root, _ = shapes_dataset
    images, targets, categories = canvas_samples(root, "train")
    torch.manual_seed(0)
    model = MaskRCNN(small_config(len(categories) + 1))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        pick = torch.randperm(len(images), generator=generator)[:BATCH].tolist()
        losses = model(torch.stack([images[i] for i in pick]), [targets[i] for i in pick])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    out = tmp_path_factory.mktemp("export")
    path = export_onnx(model, out / "model.onnx", categories=categories)
    val_images, _, _ = canvas_samples(root, "val")
    return {
        "model": model,
        "path": path,
        "images": images[:8] + val_images,
        "categories": categories,
    }


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per mask pair; two empty masks (no pixel at 0.5) are the same mask, IoU 1."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return torch.where(
        union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float)
    )


def test_onnxruntime_gives_the_models_detections(trained):
    model, runtime = trained["model"], OnnxMaskRCNN(trained["path"])
    compared = 0
    for i, image in enumerate(trained["images"]):
        with torch.no_grad():
            (expected,) = model(image[None])
        (got,) = runtime(image[None])
        n = len(expected["scores"])
        assert len(got["scores"]) == n, f"image {i}: {len(got['scores'])} detections, not {n}"
        assert torch.equal(got["labels"], expected["labels"]), f"image {i}"
        torch.testing.assert_close(got["boxes"], expected["boxes"], atol=BOX_ATOL_PX, rtol=0)
        torch.testing.assert_close(got["scores"], expected["scores"], atol=SCORE_ATOL, rtol=0)
        if n:
            ours, theirs = got["masks"][:, 0] >= 0.5, expected["masks"][:, 0] >= 0.5
            # A pixel whose probability rounds across 0.5 moves a tiny mask's IoU below 0.99
            # (one pixel of 30 is 0.97), so the IoU is per image, over all its masks, and per
            # mask for masks of at least SMALL_MASK_PX pixels.
            pooled = (ours & theirs).sum() / (ours | theirs).sum().clamp(min=1)
            assert pooled >= MIN_MASK_IOU, f"image {i}: mask IoU {pooled:.4f}"
            large = (ours | theirs).flatten(1).sum(1) >= SMALL_MASK_PX
            iou = mask_iou(ours[large], theirs[large])
            assert bool((iou >= MIN_LARGE_MASK_IOU).all()), f"image {i}: mask IoU {iou.min():.4f}"
        compared += n
    assert compared >= MIN_DETECTIONS, f"only {compared} detections to compare"


def test_the_onnx_file_alone_is_a_detector(trained, tmp_path):
    """Config and categories travel in the file: a Detector on it names the classes."""
    detector = load_onnx_detector(trained["path"])
    assert detector.canvas == CANVAS
    names = {c["label"]: c["name"] for c in trained["categories"]}
    assert detector.names == names
    image = trained["images"][-1].permute(1, 2, 0).numpy()
    (detection,) = detector.detect([image], score_threshold=0.0)
    record = detector.to_record(detection)
    assert set(record["category_names"]) <= set(names.values())
    json.dumps(record)  # JSON-ready, as predict writes it


def test_a_file_that_is_not_an_onnx_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="cannot load an ONNX model"):
        load_onnx_detector(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_onnx_detector(tmp_path / "missing.onnx")


def test_dense_mask_paste_is_torchvisions_paste():
    """The export's closed-form paste equals torchvision's loop, boxes at the edges included."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand((6, 1, 28, 28), generator=generator)
    boxes = torch.tensor(
        [
            [10.0, 12.0, 50.0, 40.0],
            [0.0, 0.0, 127.9, 127.9],  # the whole canvas
            [100.3, 90.7, 128.0, 128.0],  # at the bottom-right corner
            [5.2, 60.1, 6.0, 61.0],  # under two pixels
            [-3.0, -2.0, 20.0, 15.0],  # expanded past the top-left
            [64.0, 64.0, 64.5, 90.0],  # thinner than a pixel
        ]
    )
    expected = paste_masks_in_image(masks, boxes, (CANVAS, CANVAS))
    torch.testing.assert_close(paste_masks_dense(masks, boxes, CANVAS), expected, atol=1e-5, rtol=0)


def test_predict_runs_the_onnx_backend(trained, shapes_dataset, tmp_path):
    root, _ = shapes_dataset
    image = sorted((root / "images" / "val").iterdir())[0]
    out = tmp_path / "predictions"
    predict.main(
        ["--backend", "onnx", "--model", str(trained["path"]), "--out", str(out), str(image)]
    )
    (record,) = json.loads((out / "detections.json").read_text())
    assert record["file"] == str(image) and Path(record["overlay"]).is_file()
    names = {c["name"] for c in trained["categories"]}
    assert set(record["category_names"]) <= names
