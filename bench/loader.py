"""Loader throughput: batches from the Parquet shards vs a torchvision-style loader over COCO files.

Both produce what the model's training step consumes, in one process, same batch size, one
pass each after one warm-up batch, taking batches from the two in turn (so that both see the
same load on a shared machine):

- shards: ``pipeline.training.loader.iter_batches`` (decode the stored JPEG, paste on the
  canvas, decode the in-box RLE mask crops and fit each to M x M (``mask_crops``, M = 4 x the
  mask pool size, as the training collate ships them), flip with p=0.5, draw the 256-anchor
  RPN sample from the stored targets);
- torchvision-style (as torchvision's detection references + ``GeneralizedRCNNTransform``):
  decode the original file, polygons/RLE -> masks at the original size with pycocotools,
  resize image (bilinear) and masks (nearest) to the canvas, scale boxes, pad, build targets.
  The online RPN matching torchvision then does in every step is not counted here.

Also, optionally, the shards through Ray Data (``iter_torch_batches`` + the collate function),
and the loader's peak RSS (``VmHWM``) for N and 10N images, each in a fresh process that
only loads the batches (the data are built by another one). Prints JSON, with the load average
at the start and at the end,
and ``bytes_per_batch``: the bytes of all tensors in one collated batch.

    .venv/bin/python bench/loader.py --images 64 --canvas 512 --batch-size 4 --ray --memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    add_shapes_args,
    load_average,
    peak_rss_mb,
    run_fresh_child,
    start_local_ray,
)

from maskrcnn.config import ModelConfig  # noqa: E402
from pipeline.coco.shapes import write_shapes_dataset  # noqa: E402
from pipeline.shards.preprocess import preprocess_split  # noqa: E402
from pipeline.training.batch import mask_crop_size, pack_batch  # noqa: E402
from pipeline.training.loader import iter_batches, make_collate_fn, ray_dataset  # noqa: E402


def build_data(
    root: Path,
    *,
    images: int,
    canvas: int,
    min_side: int,
    max_side: int,
    scales: tuple[float, ...] = (1.0,),
) -> dict:
    """A synthetic COCO split and its shards (preprocessed on a local Ray), with RPN targets
    at each of ``scales`` (the loader then draws one per image)."""
    write_shapes_dataset(
        root, n_train=images, n_val=1, seed=0, min_side=min_side, max_side=max_side
    )
    source = {
        "annotation_file": root / "annotations" / "instances_train.json",
        "images_dir": root / "images" / "train",
    }
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        preprocess_split(
            **source,
            out_dir=root / "shards" / "train",
            model_config=ModelConfig(num_classes=6, canvas=canvas),
            rows_per_shard=32,
            train_scales=scales,
            progress=False,
        )
    finally:
        ray.shutdown()
    return {**source, "shards": root / "shards" / "train"}


def torchvision_style_batches(annotation_file: Path, images_dir: Path, *, canvas: int, batch: int):
    """Decode, mask, flip and resize from the COCO files, as torchvision's references do."""
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints; stdout is the JSON
        coco = COCO(str(annotation_file))
    labels = {cid: i + 1 for i, cid in enumerate(sorted(coco.getCatIds()))}
    ids = sorted(coco.getImgIds())
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        images = torch.zeros((len(chunk), 3, canvas, canvas))
        targets = []
        for i, image_id in enumerate(chunk):
            flip = float(torch.rand((), generator=generator)) < 0.5
            image, target = torchvision_style_sample(coco, image_id, images_dir, labels, flip)
            image, target = resize_to_canvas(image, target, canvas)
            images[i, :, : image.shape[1], : image.shape[2]] = image
            targets.append(target)
        yield images, targets


def torchvision_style_sample(coco: COCO, image_id: int, images_dir: Path, labels: dict, flip: bool):
    """Dataset __getitem__: PIL decode, float tensor, masks at the original size, flip."""
    info = coco.loadImgs(image_id)[0]
    pil = Image.open(images_dir / info["file_name"]).convert("RGB")
    image = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
    height, width = image.shape[1:]
    masks = torch.zeros((0, height, width), dtype=torch.uint8)
    if anns:
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]))
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    label_ids = torch.tensor([labels[a["category_id"]] for a in anns], dtype=torch.int64)
    return image, {"boxes": boxes, "labels": label_ids, "masks": masks}


def resize_to_canvas(image: torch.Tensor, target: dict, canvas: int):
    """GeneralizedRCNNTransform.resize: bilinear image, nearest masks, scaled boxes, padded."""
    height, width = image.shape[1:]
    scale = canvas / max(height, width)
    size = (round(height * scale), round(width * scale))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    masks = torch.zeros((len(target["masks"]), canvas, canvas), dtype=torch.uint8)
    if len(masks):
        resized = F.interpolate(target["masks"][:, None].float(), size=size, mode="nearest")
        masks[:, : size[0], : size[1]] = resized[:, 0].byte()
    return image, {**target, "boxes": target["boxes"] * scale, "masks": masks}


def tensor_bytes(batch) -> int:
    """Bytes of every tensor in a collated batch (a tensor, or dicts/lists/tuples of them)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(tensor_bytes(v) for v in batch.values())
    if isinstance(batch, list | tuple):
        return sum(tensor_bytes(v) for v in batch)
    return 0


def batch_bytes(shards: Path, config: ModelConfig, batch: int) -> int:
    """Bytes of the first collated batch: what a train worker pins and copies to the device
    (the collate's packed dict, mask crops instead of full-canvas masks)."""
    first = next(
        iter_batches(
            shards,
            batch_size=batch,
            model_config=config,
            flip_prob=0.5,
            crop_size=mask_crop_size(config),
        )
    )
    return tensor_bytes(pack_batch(*first))


def batch_len(batch) -> int:
    """Images in a batch: ``(images, targets)`` or a dict with ``images``."""
    return len(batch["images"] if isinstance(batch, dict) else batch[0])


def images_per_second(batches) -> float:
    """One warm-up batch, then the rest of the pass."""
    iterator = iter(batches)
    next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += batch_len(batch)
    return count / (time.perf_counter() - start)


def interleaved_images_per_second(*loaders) -> list[float]:
    """images/s of each loader over one pass, taking their batches in turn.

    On a shared machine the load changes by the second; alternating batch by batch puts every
    loader under the same conditions, so their ratio means something. The first batch of each
    is a warm-up.
    """
    iterators = [iter(loader) for loader in loaders]
    for iterator in iterators:
        next(iterator)
    seconds, counts = [0.0] * len(loaders), [0] * len(loaders)
    active = set(range(len(loaders)))
    while active:
        for i in sorted(active):
            start = time.perf_counter()
            batch = next(iterators[i], None)
            if batch is None:
                active.discard(i)
                continue
            seconds[i] += time.perf_counter() - start
            counts[i] += batch_len(batch)
    return [c / s for c, s in zip(counts, seconds, strict=True)]


def through_ray(shards: Path, config: ModelConfig, batch: int) -> float:
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray_dataset(shards, model_config=config)
        collate = make_collate_fn(config, flip_prob=0.5, seed=0)
        list(dataset.limit(batch).iter_torch_batches(batch_size=batch, collate_fn=collate))
        return images_per_second(dataset.iter_torch_batches(batch_size=batch, collate_fn=collate))
    finally:
        ray.shutdown()


def loader_peak_rss_mb(args: argparse.Namespace, images: int) -> float:
    """Peak RSS (VmHWM) of a fresh process that loads every batch of a split of ``images``."""
    flags = _flags(args, images=images, batch_size=args.batch_size)
    command = [sys.executable, __file__, "--child-memory", *flags]
    return run_fresh_child(command)["peak_rss_mb"]


def _flags(args: argparse.Namespace, **values: int) -> list[str]:
    values = {"canvas": args.canvas, "min_side": args.min_side, "max_side": args.max_side, **values}
    return [str(v) for key, value in values.items() for v in (f"--{key.replace('_', '-')}", value)]


def child_memory(args: argparse.Namespace) -> None:
    """Build the data in a helper process, then load every batch here and report peak RSS."""
    config = ModelConfig(num_classes=6, canvas=args.canvas)
    with tempfile.TemporaryDirectory() as tmp:
        build = [sys.executable, __file__, "--child-build", tmp, *_flags(args, images=args.images)]
        subprocess.run(build, check=True, capture_output=True)
        shards = Path(tmp) / "shards" / "train"
        crop_size = mask_crop_size(config)
        for _ in iter_batches(
            shards, batch_size=args.batch_size, model_config=config, crop_size=crop_size
        ):
            pass
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shapes_args(parser, images=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data path")
    parser.add_argument("--memory", action="store_true", help="also peak RSS for N and 10N")
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="train_scales of the shards"
    )
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {
        "images": args.images,
        "canvas": args.canvas,
        "min_side": args.min_side,
        "max_side": args.max_side,
    }
    if args.child_build:
        build_data(Path(args.child_build), **sizes)
        return
    if args.child_memory:
        child_memory(args)
        return
    config = ModelConfig(num_classes=6, canvas=args.canvas)
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp), **sizes, scales=tuple(args.scales))
        manifest = json.loads((data["shards"] / "manifest.json").read_text())
        shards, baseline = interleaved_images_per_second(
            iter_batches(
                data["shards"],
                batch_size=args.batch_size,
                model_config=config,
                flip_prob=0.5,
                crop_size=mask_crop_size(config),
            ),
            torchvision_style_batches(
                data["annotation_file"],
                data["images_dir"],
                canvas=args.canvas,
                batch=args.batch_size,
            ),
        )
        result = {
            **sizes,
            "batch_size": args.batch_size,
            "torch_threads": 1,
            "shard_loader_images_per_s": round(shards, 1),
            "torchvision_style_images_per_s": round(baseline, 1),
            "ratio": round(shards / baseline, 2),
            "train_scales": args.scales,
            "target_bytes_per_image": manifest["counts"]["target_bytes_per_image"],
            "bytes_per_batch": batch_bytes(data["shards"], config, args.batch_size),
        }
        if args.ray:
            result["ray_data_images_per_s"] = round(
                through_ray(data["shards"], config, args.batch_size), 1
            )
    if args.memory:
        small, large = (loader_peak_rss_mb(args, n) for n in (args.images, 10 * args.images))
        result["loader_peak_rss_mb"] = {str(args.images): small, str(10 * args.images): large}
        result["loader_peak_rss_ratio_10x"] = round(large / small, 3)
        result["memory"] = "VmHWM of a fresh process, MALLOC_MMAP_THRESHOLD_=65536"
    result["load_average"] = {"start": load_at_start, "end": load_average()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
