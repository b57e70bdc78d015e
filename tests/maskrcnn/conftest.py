"""Small configurations and synthetic batches for the model tests, offered as fixtures.

``MASKRCNN_TEST_DEVICE=cuda`` runs the tests that take the ``device`` fixture on that device
(bench/gpu_check.sh does); by default they run on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from maskrcnn import ModelConfig, anchor_grid, build_rpn_targets, sample_rpn_targets
from maskrcnn.config import RoIConfig, RPNConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spin-wait for each other
    whenever a core is taken away (a tiny training step went from 0.3 s to 3 s with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small_config(**overrides) -> ModelConfig:
    """ResNet-18 on a 128 canvas with small heads: a training step takes a fraction of a second."""
    settings = {
        "num_classes": 4,
        "backbone": "resnet18",
        "canvas": 128,
        "norm": "gn",
        "fpn_channels": 32,
        "rpn": RPNConfig(pre_nms_top_n_train=600, post_nms_top_n_train=300),
        "roi": RoIConfig(batch_size_per_image=128, representation_size=64, mask_layers=(32, 32)),
    }
    settings.update(overrides)
    return ModelConfig(**settings)


def _instance(box: tuple[float, float, float, float], canvas: int) -> Tensor:
    """The mask of an ellipse inscribed in ``box``: ``[canvas, canvas]`` uint8."""
    x1, y1, x2, y2 = box
    ys, xs = torch.meshgrid(torch.arange(canvas) + 0.5, torch.arange(canvas) + 0.5, indexing="ij")
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)


def _make_target(boxes: list[tuple[float, float, float, float]], labels: list[int], canvas: int):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": (
            torch.stack([_instance(b, canvas) for b in boxes])
            if boxes
            else torch.zeros(0, canvas, canvas, dtype=torch.uint8)
        ),
    }


def _draw(targets: list[dict[str, Tensor]], canvas: int, seed: int = 0) -> Tensor:
    """Images where every instance is a coloured ellipse on a noisy background."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(len(targets), 3, canvas, canvas, generator=gen)
    for image, target in zip(images, targets, strict=True):
        for mask, label in zip(target["masks"], target["labels"], strict=True):
            colour = torch.tensor([0.9 if c == int(label) % 3 else 0.3 for c in range(3)])
            image[:, mask.bool()] = colour[:, None]
    return images


def _with_rpn_sample(targets: list[dict[str, Tensor]], config: ModelConfig, seed: int = 0):
    """Add the loader's RPN sample (rpn_idx / rpn_labels / rpn_deltas) to each target."""
    grid = anchor_grid(config.canvas, config.anchors)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in targets:
        matched = build_rpn_targets(grid, t["boxes"], None, config.rpn)
        sample = sample_rpn_targets(matched, grid.num_anchors, generator=gen)
        out.append(
            {**t, "rpn_idx": sample.idx, "rpn_labels": sample.labels, "rpn_deltas": sample.deltas}
        )
    return out


def _toy_batch(config: ModelConfig) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Two images with a few instances each, plus their precomputed RPN samples."""
    s = config.canvas / 128
    targets = [
        _make_target(
            [(10 * s, 12 * s, 60 * s, 70 * s), (70 * s, 20 * s, 118 * s, 50 * s)],
            [1, 2],
            config.canvas,
        ),
        _make_target([(30 * s, 40 * s, 100 * s, 110 * s)], [3], config.canvas),
    ]
    return _draw(targets, config.canvas), _with_rpn_sample(targets, config)


@pytest.fixture(scope="session")
def small_config():
    """``small_config(**overrides) -> ModelConfig``."""
    return _small_config


@pytest.fixture(scope="session")
def make_target():
    """``make_target(boxes, labels, canvas)`` -> a target dict with ellipse masks."""
    return _make_target


@pytest.fixture(scope="session")
def draw():
    """``draw(targets, canvas, seed=0)`` -> images ``[B, 3, canvas, canvas]``."""
    return _draw


@pytest.fixture(scope="session")
def with_rpn_sample():
    """``with_rpn_sample(targets, config, seed=0)`` -> targets with the precomputed RPN sample."""
    return _with_rpn_sample


@pytest.fixture(scope="session")
def toy_batch():
    """``toy_batch(config)`` -> two images with three instances and their RPN samples."""
    return _toy_batch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the device-aware tests: ``MASKRCNN_TEST_DEVICE`` (default cpu)."""
    name = os.environ.get("MASKRCNN_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MASKRCNN_TEST_DEVICE={name} but torch sees no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def to_device(device):
    """``to_device(images, targets)`` -> both on the test device."""

    def move(images: Tensor, targets: list[dict[str, Tensor]] | None = None):
        moved = [{k: v.to(device) for k, v in t.items()} for t in targets or []]
        return images.to(device), moved

    return move
