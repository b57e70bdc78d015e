"""The generated COCO-format data of bench/e2e.py and bench/evaluate.py, and its shards.

A shapes dataset of another seed and shape mix than the demo's (the e2e arguments say which),
preprocessed with params.yaml's preprocess section, as the preprocess stage does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import Params, model_config
from pipeline.config.settings import PreprocessSettings
from pipeline.shards.preprocess import preprocess_split

SPLITS = ("train", "val")


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
