"""The benches' pipeline-side setup: their Ray, their generated data and its shards.

bench/e2e.py and bench/evaluate.py use a shapes dataset of another seed and shape mix than the
demo's (the e2e arguments say which), preprocessed with params.yaml's preprocess section as the
preprocess stage does; bench/layouts.py and bench/step_split.py use the demo's kind of data
(``demo_shards``). Kept out of common.py, which bench/shard_digest.py's children import inside
older trees of the project.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import ray
from common import start_local_ray

from maskrcnn.config import ModelConfig
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import Params, model_config
from pipeline.config.settings import PreprocessSettings
from pipeline.io.ray_runtime import ensure_ray, local_dashboard
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest

SPLITS = ("train", "val")


def start_ray() -> None:
    """The local Ray that ``ensure_ray`` starts (its dashboard where the training workers'
    placement-group cleaner looks), tried again if it is slow to come up."""
    if not ray.is_initialized():
        port, own = local_dashboard()
        start_local_ray(include_dashboard=True, dashboard_port=port, log_to_driver=True,
                        runtime_env={"env_vars": own})  # fmt: skip
    ensure_ray(None)


def demo_shards(root: Path, params: Params, *, images: int) -> tuple[Path, ModelConfig]:
    """The demo's kind of data (shapes, 160-320 px) as train shards for params.yaml's model,
    and that model with the shards' class count; needs a running Ray."""
    data, out = root / "shapes", root / "shards" / "train"
    write_shapes_dataset(data, n_train=images, n_val=1, seed=3, min_side=160, max_side=320)
    preprocess_split(
        **split_files(data, "train"),
        out_dir=out,
        model_config=model_config(params, num_classes=2),  # matching ignores classes
        progress=False,
    )
    return out.parent, model_config(params, num_classes=len(read_manifest(out)["categories"]) + 1)


def make_dataset(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    summary = write_shapes_dataset(
        root,
        n_train=args.train_images,
        n_val=args.val_images,
        seed=args.data_seed,
        min_side=args.min_side,
        max_side=args.max_side,
        max_instances=args.max_instances,
        crowd_fraction=args.crowd_fraction,
        empty_fraction=args.empty_fraction,
    )
    return {split: summary[split] for split in SPLITS}


def split_files(data: Path, split: str) -> dict[str, Path]:
    return {
        "annotation_file": data / "annotations" / f"instances_{split}.json",
        "images_dir": data / "images" / split,
    }


def preprocess(data: Path, shards: Path, params: Params, splits=SPLITS) -> float:
    """The preprocess stage's calls; returns their seconds."""
    start = time.perf_counter()
    for split in splits:
        preprocess_split(
            **split_files(data, split),
            out_dir=shards / split,
            model_config=model_config(params, num_classes=2),  # matching ignores classes
            **{**params.settings(PreprocessSettings).to_dict(), "progress": False},
        )
    return time.perf_counter() - start
