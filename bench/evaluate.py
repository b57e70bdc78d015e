"""Evaluation: our evaluate stage's function against a plain torchvision eval loop, same weights.

- ours: ``pipeline.evaluation.evaluate.evaluate`` as the evaluate stage calls it, on the val
  shards (Ray Data inference, pycocotools scores, PR curves, overlays), timed as a whole;
- torchvision: the same model file's weights loaded (``strict=True``: the keys are
  torchvision's) into torchvision's ``MaskRCNN`` at the same configuration
  (``bench/torchvision_loop.py``), one process over the original val images: PIL decode, the
  model (which pastes masks at the original size), RLE encoding, ``COCOeval``; timed from the
  model file to the scores, as ours.

The two run in turn (ours, torchvision, ours, ...) so that both see the same load. Both sides'
detections are scored by the same ``COCOeval`` call; the APs should agree closely (the inputs
differ only in resizing: ours were resized by preprocess with PIL and stored as JPEG, the
torchvision model resizes the decoded original itself). JSON on stdout, logs on stderr.

    .venv/bin/python bench/evaluate.py --model W/seed0/ours/train/model.pt --data W/data \\
        --shards W/shards/val            # W: the --keep directory of bench/e2e.py
    .venv/bin/python bench/evaluate.py --train-steps 100   # no model: train one first
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import e2e  # noqa: E402
import e2e_data  # noqa: E402
import torchvision_loop as tv  # noqa: E402

from maskrcnn.config import ModelConfig  # noqa: E402
from pipeline.config.params import Params, load_params, model_config  # noqa: E402
from pipeline.shards.schema import read_manifest  # noqa: E402

log = logging.getLogger("bench.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a model file (save_model); none: train one")
    p.add_argument(
        "--data", type=Path, help="COCO root: annotations/instances_val.json, images/val"
    )
    p.add_argument("--shards", type=Path, help="the val split's shards (none: preprocess --data)")
    p.add_argument("--repeats", type=int, default=2, help="evaluations per side, alternating")
    p.add_argument("--train-steps", type=int, default=100, help="without --model")
    p.add_argument("--train-images", type=int, default=160, help="without --model")
    p.add_argument("--val-images", type=int, default=80, help="without --data")
    p.add_argument("--data-seed", type=int, default=7)
    p.add_argument("--min-side", type=int, default=128)
    p.add_argument("--max-side", type=int, default=384)
    p.add_argument("--max-instances", type=int, default=8)
    p.add_argument("--crowd-fraction", type=float, default=0.15)
    p.add_argument("--empty-fraction", type=float, default=0.03)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary dir)")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, root: Path, params: Params) -> tuple[Path, Path, Path]:
    """(model file, COCO root, val shards): the given ones, the rest made here."""
    data = args.data or root / "data"
    if not args.data:
        e2e_data.make_dataset(data, args)
    shards = args.shards or root / "shards" / "val"
    if not args.shards:
        e2e_data.preprocess(data, shards.parent, params, splits=("val",))
    if args.model:
        return args.model, data, shards
    e2e_data.preprocess(data, root / "shards", params, splits=("train",))
    categories = read_manifest(root / "shards" / "train")["categories"]
    workers = params.settings(e2e.TrainSettings).num_workers
    recipe = e2e.our_recipe(params, workers=workers, seed=0, steps=args.train_steps, root=root)
    trained = e2e.run_ours(
        recipe=recipe,
        config=model_config(params, num_classes=len(categories) + 1),
        root=root,
        data=data,
        params=params,
    )
    return Path(trained["model_path"]), data, shards


def load_torchvision(model_path: Path) -> tuple[torch.nn.Module, list[dict]]:
    """Our model file's weights in torchvision's MaskRCNN, and the file's categories."""
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    model = tv.build_model(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model, list(payload.get("categories") or [])


def eval_torchvision(model_path: Path, data: Path, params: Params, shards: Path) -> dict[str, Any]:
    start = time.perf_counter()
    model, categories = load_torchvision(model_path)
    categories = categories or read_manifest(shards)["categories"]
    loaded = time.perf_counter() - start
    result = e2e.eval_torchvision(model, data, categories, params)
    result["eval_s"] = round(result["eval_s"] + loaded, 2)
    result["eval_images_per_s"] = round(result["eval_images"] / result["eval_s"], 3)
    return result


def summary(rounds: list[dict[str, Any]], side: str) -> dict[str, Any]:
    rates = [r[side]["eval_images_per_s"] for r in rounds]
    return {
        "images_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
        "eval_images": rounds[-1][side]["eval_images"],
        "bbox_AP": rounds[-1][side]["bbox_AP"],
        "segm_AP": rounds[-1][side]["segm_AP"],
    }


def run_all(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    params = load_params(args.params)
    e2e_data.start_ray()
    model_path, data, shards = prepare(args, root, params)
    gt = tv.load_coco(e2e_data.split_files(data, "val")["annotation_file"])
    rounds = []
    for index in range(args.repeats):
        out = root / "eval" / f"ours-{index}"
        ours = e2e.eval_ours(model_path, shards=shards, data=data, out=out, params=params, gt=gt)
        theirs = eval_torchvision(model_path, data, params, shards)
        rounds.append({"ours": ours, "torchvision": theirs})
        log.info("round %d: %s", index, json.dumps(rounds[-1]))
    ours, theirs = summary(rounds, "ours"), summary(rounds, "torchvision")
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_path": str(model_path),
        "cpus": e2e.cores(),
        "rounds": rounds,
        "ours": ours,
        "torchvision": theirs,
        "images_per_s_ratio_ours_over_torchvision": round(
            ours["images_per_s"]["median"] / theirs["images_per_s"]["median"], 3
        ),
        "AP_difference_ours_minus_torchvision": {
            k: round(ours[k] - theirs[k], 4) for k in ("bbox_AP", "segm_AP")
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the report as JSON on stdout (and return it, for the tests)."""
    return e2e.report_main(parse_args(argv), run_all)


if __name__ == "__main__":
    main()
