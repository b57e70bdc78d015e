"""Training throughput of the full path: Ray Train (1 and 2 workers) vs a torchvision-style loop.

- Ray Train: ``pipeline.training.trainer.train`` exactly as the train stage runs it (Ray Data
  over the Parquet shards, the loader's collate, DDP over gloo, MLflow logging to a SQLite
  store, a checkpoint at the end), one CPU per worker, with 1 and with 2 workers.
- torchvision-style: a plain PyTorch ``DataLoader`` (one worker process) over the COCO files,
  transforming every sample on every step (decode, polygons/RLE -> masks, flip, resize to the
  canvas, target dicts: ``bench/loader.py``'s torchvision-style sample), into torchvision's
  ``MaskRCNN`` with the same backbone, anchors, canvas, batch, heads and RPN/RoI settings
  (``bench/model_step.py``'s twin), SGD, one torch thread.

The model is params.yaml's ``model:`` section, the batch per worker ``train.batch_per_worker``,
SGD for both. The three setups run in ``--rounds`` rounds, in turn (the order reverses every
round), so that they share the load of a shared machine; each run trains ``--warmup`` steps
(process and worker start, first batches, allocator), then ``--window`` timed steps. Prints
JSON: images/s per run and over all rounds (timed images / timed seconds), the ratios, and the
load average at the start and end of every run.

    .venv/bin/python bench/train.py --images 48 --warmup 10 --window 40 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import load_average  # noqa: E402
from e2e_data import start_ray  # noqa: E402
from loader import resize_to_canvas, torchvision_style_sample  # noqa: E402
from model_step import synthetic_batch, torchvision_twin  # noqa: E402

from maskrcnn.config import ModelConfig  # noqa: E402
from maskrcnn.model import MaskRCNN  # noqa: E402
from pipeline.coco.shapes import write_shapes_dataset  # noqa: E402
from pipeline.config.params import load_params, model_config  # noqa: E402
from pipeline.config.settings import TrackingSettings, TrainSettings  # noqa: E402
from pipeline.shards.preprocess import preprocess_split  # noqa: E402
from pipeline.shards.schema import read_manifest  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--min-side", type=int, default=160)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="model: section")
    p.add_argument("--batch", type=int, default=0, help="per worker (0: train.batch_per_worker)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of a run")
    p.add_argument("--window", type=int, default=40, help="timed steps per run (k * warmup)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each setup, in turn")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument(
        "--amp-probe", action="store_true", help="only time our train step, fp32 vs bf16 on CPU"
    )
    return p.parse_args(argv)


def model_summary(config: ModelConfig) -> dict:
    return {
        "backbone": config.backbone,
        "canvas": config.canvas,
        "norm": config.norm,
        "fpn_channels": config.fpn_channels,
        "rpn_post_nms_top_n_train": config.rpn.post_nms_top_n_train,
        "roi_batch_size_per_image": config.roi.batch_size_per_image,
        "representation_size": config.roi.representation_size,
        "mask_layers": list(config.roi.mask_layers),
    }


class CocoFiles(Dataset):
    """The torchvision references' way: every sample decoded and transformed when asked for."""

    def __init__(self, annotation_file: Path, images_dir: Path, canvas: int) -> None:
        with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints; stdout is the JSON
            self.coco = COCO(str(annotation_file))
        self.ids = sorted(self.coco.getImgIds())
        self.labels = {cid: i + 1 for i, cid in enumerate(sorted(self.coco.getCatIds()))}
        self.images_dir, self.canvas = images_dir, canvas

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        flip = bool(torch.rand(()) < 0.5)
        sample = torchvision_style_sample(
            self.coco, self.ids[index], self.images_dir, self.labels, flip
        )
        image, target = resize_to_canvas(*sample, self.canvas)
        padded = torch.zeros((3, self.canvas, self.canvas))
        padded[:, : image.shape[1], : image.shape[2]] = image
        return padded, target


def as_lists(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def torchvision_loop(args: argparse.Namespace, config: ModelConfig, data: Path) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision_twin(MaskRCNN(config)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    files = CocoFiles(
        data / "annotations" / "instances_train.json", data / "images" / "train", config.canvas
    )
    loader = DataLoader(
        files,
        batch_size=args.batch,
        shuffle=True,
        num_workers=1,
        drop_last=True,
        collate_fn=as_lists,
        persistent_workers=True,
        multiprocessing_context="spawn",  # no fork of a process that runs Ray's threads
    )
    step, start, total = 0, 0.0, args.warmup + args.window
    while step < total:
        for images, targets in loader:
            losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            step += 1
            if step == args.warmup:
                start = time.perf_counter()
            if step == total:
                break
    return {"timed_images": args.window * args.batch, "timed_s": time.perf_counter() - start}


def amp_probe(config: ModelConfig, batch: int, steps: int = 3) -> dict:
    """Seconds per train step of our model on one synthetic batch, one thread: fp32 vs bf16
    autocast on CPU (whether ``train.amp: bf16`` pays on this CPU)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MaskRCNN(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, targets = synthetic_batch(config, batch, instances=4)
    result = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        times = []
        for _ in range(steps + 1):  # the first one warms up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                losses = model(images, targets)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        result[f"{name}_s_per_step"] = round(sum(times[1:]) / steps, 3)
    result["bf16_speedup"] = round(result["fp32_s_per_step"] / result["bf16_s_per_step"], 3)
    return result


def ray_train(
    args: argparse.Namespace, config: ModelConfig, root: Path, workers: int, tag: str
) -> dict:
    """One Ray Train run of ``warmup + window`` steps; logged every ``warmup`` steps, so the
    history's windows after the first are the timed ones."""
    settings = TrainSettings(
        num_workers=workers,
        cpus_per_worker=1,
        batch_per_worker=args.batch,
        steps=args.warmup + args.window,
        base_lr=args.lr,
        lr_reference_batch=args.batch * workers,
        warmup_steps=0,
        checkpoint_every=args.warmup + args.window,
        log_every=args.warmup,
        storage_path=str(root / "ray_results"),
        run_name=f"bench-{tag}",
    )
    result = train(
        settings=settings,
        model_config=config,
        shards_dir=root / "shards",
        tracking=TrackingSettings(experiment="bench"),
        out_dir=root / f"out-{tag}",
        project_root=root,
    )
    timed = result.history[1:]
    images = args.batch * workers * args.warmup  # per logged window
    seconds = [images / row["images_per_s"] for row in timed]
    return {
        "timed_images": images * len(timed),
        "timed_s": sum(seconds),
        "data_wait_fraction": sum(r["data_wait"] * t for r, t in zip(timed, seconds, strict=True))
        / sum(seconds),
        "wall_s": round(result.metrics["wall_s"], 1),
    }


SETUPS = ("ray_train_1_worker", "ray_train_2_workers", "torchvision_loop")


def run_setup(name: str, args: argparse.Namespace, config: ModelConfig, root: Path, r: int):
    """One run of one setup, with its images/s and the load average around it."""
    load_at_start = load_average()
    if name == "torchvision_loop":
        run = torchvision_loop(args, config, root / "shapes")
    else:
        workers = 1 if name == "ray_train_1_worker" else 2
        run = ray_train(args, config, root, workers, tag=f"{workers}-round{r}")
    run["images_per_s"] = round(run["timed_images"] / run["timed_s"], 3)
    return {**run, "round": r, "load_average": {"start": load_at_start, "end": load_average()}}


def in_rounds(args: argparse.Namespace, config: ModelConfig, root: Path) -> dict[str, list]:
    """Every setup once per round, the order reversed every other round (no first-mover bias)."""
    runs: dict[str, list] = {name: [] for name in SETUPS}
    for r in range(args.rounds):
        for name in SETUPS if r % 2 == 0 else SETUPS[::-1]:
            runs[name].append(run_setup(name, args, config, root, r))
    return runs


def overall(runs: list[dict]) -> float:
    """images/s over every timed step of every round."""
    return sum(r["timed_images"] for r in runs) / sum(r["timed_s"] for r in runs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.window % args.warmup:
        raise SystemExit("error: --window must be a multiple of --warmup (the logging period)")
    params = load_params(args.params)
    args.batch = args.batch or int(params.section("train").get("batch_per_worker", 2))
    if args.amp_probe:
        probe = amp_probe(model_config(params, num_classes=4), args.batch)
        print(json.dumps({"batch": args.batch, "threads": 1, **probe}, indent=2))
        return
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = prepare_data(args, params, root)
        runs = in_rounds(args, config, root)
    speed = {name: overall(rs) for name, rs in runs.items()}
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": model_summary(config),
        "cpus": os.cpu_count(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "images_per_s": {name: round(v, 3) for name, v in speed.items()},
        "ratio_1_worker_vs_torchvision": round(
            speed["ray_train_1_worker"] / speed["torchvision_loop"], 3
        ),
        "ratio_2_workers_vs_1": round(
            speed["ray_train_2_workers"] / speed["ray_train_1_worker"], 3
        ),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def prepare_data(args: argparse.Namespace, params, root: Path) -> ModelConfig:
    """The shapes dataset and its shards; the model config with the dataset's class count."""
    data = root / "shapes"
    write_shapes_dataset(
        data, n_train=args.images, n_val=1, seed=0, min_side=args.min_side, max_side=args.max_side
    )
    start_ray()
    preprocess_split(
        annotation_file=data / "annotations" / "instances_train.json",
        images_dir=data / "images" / "train",
        out_dir=root / "shards" / "train",
        model_config=model_config(params, num_classes=2),
        progress=False,
    )
    classes = len(read_manifest(root / "shards" / "train")["categories"]) + 1
    return model_config(params, num_classes=classes)


if __name__ == "__main__":
    main()
