"""Fixtures that write tiny COCO datasets to disk, for any pipeline test.

``tiny_coco()`` writes three small images (a PNG with a polygon and a compressed-RLE instance,
a JPEG with an uncompressed-RLE crowd region, a PNG without instances) and an annotation file
with non-contiguous category ids 3 and 10. Tests change ``ds.data`` and call ``ds.write_json()``
to make a bad case. ``shapes_dataset`` is a small synthetic dataset, written once per session.
``memory_dir`` and ``memory_writes`` stand in for object storage: fsspec's in-process memory
filesystem, and the order in which files are written to and deleted from it.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.coco.masks import encode_rle
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.io import storage

TINY_CATEGORIES = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}]  # unsorted on purpose


@dataclass
class TinyCoco:
    """A COCO dataset on disk: its JSON content, and where it lives."""

    annotation_file: Path
    images_dir: Path
    data: dict[str, Any]
    reference_masks: dict[int, np.ndarray]  # annotation id -> HxW mask at the original size

    def write_json(self) -> None:
        """Rewrite the annotation file from ``data``."""
        self.annotation_file.write_text(json.dumps(self.data))

    def write_image(self, file_name: str, image: Image.Image | np.ndarray, **save_args) -> Path:
        """Write an image file (format from the suffix) into the images directory."""
        path = self.images_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        pil.save(path, **save_args)
        return path

    def copy_to(self, location: str) -> tuple[str, str]:
        """Copy the annotation file and the images to ``location`` (a URI), in the same layout;
        returns the annotation file's and the images directory's locations there."""
        root = self.annotation_file.parent
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            target = storage.join(location, path.relative_to(root).as_posix())
            storage.write_bytes(target, path.read_bytes())
        images = self.images_dir.relative_to(root).as_posix()
        return storage.join(location, self.annotation_file.name), storage.join(location, images)

    def image(self, image_id: int) -> dict[str, Any]:
        return next(i for i in self.data["images"] if i["id"] == image_id)

    def annotation(self, ann_id: int) -> dict[str, Any]:
        return next(a for a in self.data["annotations"] if a["id"] == ann_id)


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_tiny_coco(root: Path) -> TinyCoco:
    """Write the default tiny dataset under root/images and root/instances.json."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    triangle = [4.0, 4.0, 40.0, 6.0, 20.0, 36.0]  # on image 1 (48 high, 64 wide)
    blob = np.zeros((48, 64), np.uint8)
    blob[20:40, 44:60] = 1
    crowd = np.zeros((40, 32), np.uint8)
    crowd[5:15, 3:12] = 1
    crowd[8:30, 20:28] = 1
    crowd_counts = mask_utils.frPyObjects(
        {"size": [40, 32], "counts": _uncompressed(crowd)}, 40, 32
    )
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "height": 48, "width": 64},
            {"id": 2, "file_name": "sub/two.jpg", "height": 40, "width": 32},
            {"id": 3, "file_name": "three.png", "height": 32, "width": 32},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "bbox": [4, 4, 36, 32],
                "segmentation": [triangle],
                "area": 600.0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 10,
                "iscrowd": 0,
                "bbox": [44, 20, 16, 20],
                "segmentation": {"size": [48, 64], "counts": encode_rle(blob).decode()},
                "area": float(blob.sum()),
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 3,
                "iscrowd": 1,
                "bbox": [3, 5, 25, 25],
                "segmentation": {"size": [40, 32], "counts": _uncompressed(crowd)},
                "area": float(crowd.sum()),
            },
        ],
        "categories": copy.deepcopy(TINY_CATEGORIES),
    }
    ds = TinyCoco(root / "instances.json", images_dir, data, {})
    ds.reference_masks = {
        1: mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([triangle], 48, 64))),
        2: blob,
        3: mask_utils.decode(crowd_counts),
    }
    ds.write_image("one.png", _pixels(48, 64, 1))
    ds.write_image("sub/two.jpg", _pixels(40, 32, 2), quality=95)
    ds.write_image("three.png", _pixels(32, 32, 3))
    ds.write_json()
    return ds


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of a mask (column-major runs, background first)."""
    flat = mask.ravel(order="F")
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return [*runs, length]


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Callable[..., TinyCoco]:
    """A builder: ``tiny_coco()`` or ``tiny_coco(root)`` writes a fresh tiny dataset."""

    def build(root: Path | None = None) -> TinyCoco:
        return make_tiny_coco(root or tmp_path / "coco")

    return build


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A small synthetic dataset (16 train, 4 val images of 64-128 px) and its summary."""
    out_dir = tmp_path_factory.mktemp("shapes")
    summary = write_shapes_dataset(
        out_dir,
        n_train=16,
        n_val=4,
        seed=3,
        min_side=64,
        max_side=128,
        empty_fraction=0.2,
        crowd_fraction=0.3,
    )
    return out_dir, summary


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A fresh ``memory://`` directory: object storage that only this process sees (Ray workers
    do not), removed afterwards."""
    location = f"memory://test-{uuid.uuid4().hex}"
    yield location
    fs = fsspec.filesystem("memory")
    if fs.exists(location):
        fs.rm(location, recursive=True)


@pytest.fixture
def memory_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``("write" | "delete", file name)`` for each file written to or deleted from the memory
    filesystem, in order."""
    events: list[tuple[str, str]] = []
    real_open, real_rm = MemoryFileSystem._open, MemoryFileSystem._rm

    def recording_open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            events.append(("write", path.rsplit("/", 1)[-1]))
        return real_open(self, path, mode, **kwargs)

    def recording_rm(self, path):
        events.append(("delete", path.rsplit("/", 1)[-1]))
        return real_rm(self, path)

    monkeypatch.setattr(MemoryFileSystem, "_open", recording_open)
    monkeypatch.setattr(MemoryFileSystem, "_rm", recording_rm)
    return events
