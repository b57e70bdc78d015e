"""Predict: letterboxing as preprocess does, mapping back to the image, and the CLI's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.masks import decode_rle
from pipeline.inference.detector import Detector, letterbox
from pipeline.io.images import canvas_scale, resized_size
from pipeline.shards import preprocess
from stages.predict import main

CATEGORIES = [{"id": 4, "name": "circle", "label": 1}, {"id": 9, "name": "square", "label": 2}]


def tiny_config(**roi) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "num_classes": 3,
            "backbone": "resnet18",
            "canvas": 64,
            "fpn_channels": 16,
            "roi": {"representation_size": 32, "mask_layers": [16], **roi},
            "rpn": {"pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
        }
    )


class WholeImageModel(nn.Module):
    """Stand-in with the eval output contract: one detection covering the resized image,
    found as the non-zero region of the canvas (so it checks the letterbox placement too)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tiny_config()
        self.seen: torch.Tensor | None = None

    def forward(
        self, images: torch.Tensor, *, paste_masks: bool = True
    ) -> list[dict[str, torch.Tensor]]:
        """Masks on the canvas whatever ``paste_masks`` asks, as an exported graph gives them."""
        self.seen = images
        out = []
        for image in images:
            filled = image.amax(dim=0) > 0
            rows, cols = filled.any(dim=1).nonzero(), filled.any(dim=0).nonzero()
            h, w = int(rows.max()) + 1, int(cols.max()) + 1
            mask = torch.zeros((1, 1, 64, 64))
            mask[..., :h, :w] = 1.0
            out.append(
                {
                    "boxes": torch.tensor([[0.0, 0.0, w, h]]),
                    "labels": torch.tensor([2]),
                    "scores": torch.tensor([0.9]),
                    "masks": mask,
                }
            )
        return out


def _image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(height * width)
    return rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # no zero pixel


def test_letterbox_matches_preprocess():
    assert preprocess.canvas_scale is canvas_scale  # one rule for both
    for height, width in ((100, 150), (150, 100), (37, 64), (640, 480)):
        resized, scale = letterbox(_image(height, width), 64)
        as_stored = float(np.float32(64 / max(height, width)))  # the shards' float32
        assert scale == canvas_scale(height, width, 64) == as_stored
        assert resized.shape[:2] == resized_size(height, width, scale)
        assert max(resized.shape[:2]) == 64


def test_detections_come_back_in_the_images_own_pixels():
    stand_in = WholeImageModel()
    detector = Detector(stand_in, categories=CATEGORIES)
    (detection,) = detector.detect([_image(100, 150)], score_threshold=0.5)
    assert stand_in.seen.shape == (1, 3, 64, 64)
    assert stand_in.seen[0, :, 43:, :].abs().sum() == 0  # padded below the 43 x 64 image
    assert np.allclose(detection["boxes"], [[0, 0, 150, 100]], atol=1.0)
    assert detection["masks"].shape == (1, 100, 150) and detection["masks"].all()
    record = detector.to_record(detection)
    assert record["category_ids"] == [9] and record["category_names"] == ["square"]
    assert decode_rle(record["masks"][0]["counts"], 100, 150).all()
    assert detector.detect([_image(100, 150)], score_threshold=0.95)[0]["scores"].size == 0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    save_model(MaskRCNN(tiny_config(score_thresh=0.0)), path)
    return path


def test_cli_writes_detections_and_overlays(model_file, tmp_path):
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.jpg"
    Image.fromarray(_image(90, 160)).save(wide)
    Image.fromarray(_image(120, 70)).save(tall, quality=90)
    out = tmp_path / "out"
    main(
        [
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--score-threshold",
            "0.0",
            "--batch-size",
            "2",
            str(wide),
            str(tall),
        ]
    )
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(wide), str(tall)]
    for record, (height, width) in zip(records, ((90, 160), (120, 70)), strict=True):
        assert (record["height"], record["width"]) == (height, width)
        n = len(record["scores"])
        assert n > 0  # random init with score threshold 0: the model keeps proposals
        assert len(record["boxes"]) == len(record["masks"]) == len(record["labels"]) == n
        assert all(m["size"] == [height, width] for m in record["masks"])
        assert all(
            0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height for x1, y1, x2, y2 in record["boxes"]
        )
        assert set(record["category_names"]) <= {"class 1", "class 2"}  # file has no names
        with Image.open(record["overlay"]) as overlay:
            assert overlay.size == (width, height)


def test_a_model_file_with_categories_names_its_classes(tmp_path):
    path = tmp_path / "named.pt"
    save_model(MaskRCNN(tiny_config(score_thresh=0.0)), path, categories=CATEGORIES)
    detector = Detector.from_file(path)
    assert detector.names == {1: "circle", 2: "square"}
    assert detector.category_ids == {1: 4, 2: 9}
    given = [{"id": 7, "name": "disc", "label": 1}]
    assert Detector.from_file(path, categories=given).names == {1: "disc", 2: "class 2"}
    image = tmp_path / "image.png"
    Image.fromarray(_image(50, 60)).save(image)
    out = tmp_path / "out"
    main(["--model", str(path), "--out", str(out), "--score-threshold", "0", str(image)])
    (record,) = json.loads((out / "detections.json").read_text())
    assert record["category_names"] and set(record["category_names"]) <= {"circle", "square"}
    assert set(record["category_ids"]) <= {4, 9}


def test_cli_errors_name_the_problem(model_file, tmp_path, capsys):
    image = tmp_path / "ok.png"
    Image.fromarray(_image(30, 40)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    cases = [
        (["--model", str(model_file), str(tmp_path / "missing.png")], "missing.png"),
        (["--model", str(model_file), str(broken)], "broken.png"),
        (["--model", str(tmp_path / "nope.pt"), str(image)], "nope.pt"),
        (["--model", str(image), str(image)], "cannot read a model file"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--out", str(tmp_path / "out")])
        assert expected in str(exit_info.value), args
    assert not (tmp_path / "out" / "detections.json").exists()


def test_overlay_tints_masks_and_leaves_the_rest():
    from pipeline.inference.overlay import class_colour, draw_detections

    image = np.full((60, 80, 3), 200, np.uint8)
    mask = np.zeros((1, 60, 80), np.uint8)
    mask[0, 20:40, 30:50] = 1
    picture = np.asarray(
        draw_detections(
            image,
            boxes=np.array([[30.0, 20.0, 50.0, 40.0]]),
            labels=np.array([2]),
            scores=np.array([0.8]),
            masks=mask,
            names={2: "square"},
        )
    )
    inside, outside = picture[30, 40].astype(int), picture[55, 5]
    expected = 0.55 * 200 + 0.45 * np.array(class_colour(2))
    assert np.abs(inside - expected).max() <= 1
    assert (outside == 200).all()


def test_the_cpu_layout_changes_no_detection():
    """Detector runs the model in channels_last on CPU (a speed lever); the detections are
    those of the default layout, up to float rounding."""
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(score_thresh=0.0)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(images)
    detector = Detector(model)
    assert detector.model.backbone.body.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        got = detector.model(images)
    for want, have in zip(expected, got, strict=True):
        assert len(want["scores"]) > 0
        assert torch.equal(want["labels"], have["labels"])
        torch.testing.assert_close(have["boxes"], want["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(have["scores"], want["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(have["masks"], want["masks"], atol=1e-4, rtol=0)
