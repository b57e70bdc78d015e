"""The plain torchvision side of bench/e2e.py and bench/evaluate.py: what its users write.

- model: ``torchvision.models.detection.MaskRCNN`` built from torchvision parts with our
  ``ModelConfig``'s backbone, FPN width, anchors, RPN/RoI settings and head sizes. Its state-dict
  keys are ours (docs/design.md), so our trained weights load into it with ``strict=True``.
  The backbone is what ``resnet_fpn_backbone`` returns (a ``BackboneWithFPN`` over a torchvision
  ResNet with layer1..layer4 and a max-pool P6), built directly because ``resnet_fpn_backbone``
  fixes the FPN at 256 channels.
- data: a ``torch.utils.data.Dataset`` over the COCO files that decodes each image with PIL,
  rasterises its polygons / RLE with pycocotools and flips on every step; the model's own
  transform resizes to the canvas.
- eval: one process, batches of original images, masks pasted at the original size by the model
  (its postprocess), thresholded and RLE-encoded with pycocotools, scored with ``COCOeval``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from model_step import torchvision_maskrcnn
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.functional import pil_to_tensor

from maskrcnn.backbone import norm_layer
from maskrcnn.config import ModelConfig
from pipeline.config.settings import TrainSettings
from pipeline.training.schedule import make_optimizer, make_scheduler

STAGES = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """pycocotools prints its progress: onto stderr with it, stdout carries the JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def load_coco(annotation_file: str | os.PathLike) -> COCO:
    with quiet_stdout():
        return COCO(str(annotation_file))


def build_model(config: ModelConfig) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN at ``config``'s settings, randomly initialised as torchvision does."""
    resnet = getattr(torchvision.models, config.backbone)(
        weights=None, norm_layer=norm_layer(config.norm)
    )
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][
        : config.trainable_backbone_layers
    ]
    if config.trainable_backbone_layers == 5:
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():  # resnet_fpn_backbone's freezing
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    expansion = 1 if config.backbone in ("resnet18", "resnet34") else 4
    backbone = BackboneWithFPN(
        resnet,
        return_layers=STAGES,
        in_channels_list=[c * expansion for c in (64, 128, 256, 512)],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    return torchvision_maskrcnn(backbone, config)


def read_image(images_dir: Path, file_name: str) -> torch.Tensor:
    """[3, H, W] float in [0, 1], decoded with PIL."""
    with Image.open(images_dir / file_name) as pil:
        return pil_to_tensor(pil.convert("RGB")).float().div_(255)


class CocoInstances(Dataset):
    """The torchvision references' COCO dataset: decode, masks and flip on every access.

    ``label_of`` maps a COCO category id to the contiguous label (the shards' mapping, so that
    both sides learn the same labels). Crowd regions are left out, as the references do.
    """

    def __init__(
        self, annotation_file: Path, images_dir: Path, label_of: Mapping[int, int], flip_prob: float
    ) -> None:
        self.annotation_file, self.images_dir = annotation_file, images_dir
        self.label_of, self.flip_prob = dict(label_of), flip_prob
        self.coco = load_coco(annotation_file)
        self.ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = read_image(self.images_dir, info["file_name"])
        height, width = image.shape[1:]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        masks = torch.zeros((0, height, width), dtype=torch.uint8)
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        if float(torch.rand(())) < self.flip_prob:
            image, masks = image.flip(-1), masks.flip(-1)
            x1, y1, x2, y2 = boxes.unbind(1)
            boxes = torch.stack([width - x2, y1, width - x1, y2], 1)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "masks": masks}


def as_lists(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """The plain loop's knobs beyond the recipe (``TrainSettings``, shared with our side)."""

    budget_s: float  # pure training seconds: the loop stops after the step that passes it
    threads: int
    loader_workers: int
    calibrate_steps: int = 20  # the schedule is sized to the budget after this many steps


def train(
    *,
    model: TorchvisionMaskRCNN,
    dataset: CocoInstances,
    recipe: TrainSettings,
    loop: LoopSettings,
) -> dict[str, Any]:
    """AdamW and the warm-up + cosine schedule of ``recipe`` (the project's own
    ``make_optimizer`` / ``make_scheduler``, i.e. ``torch.optim.AdamW`` and a ``LambdaLR``) at
    the global batch, until ``loop.budget_s`` seconds of training have passed.

    A user with a time budget sizes the schedule to it: after ``calibrate_steps`` steps (still
    in the warm-up, where the cosine factor is ~1) the schedule's length becomes the number of
    steps the measured pace fits in the budget.
    """
    started = time.perf_counter()
    torch.set_num_threads(loop.threads)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe)
    schedule = {"steps": recipe.steps}
    scheduler = make_scheduler(optimizer, _LiveSteps(recipe, schedule))
    loader = DataLoader(
        dataset,
        batch_size=recipe.global_batch,
        shuffle=True,
        num_workers=loop.loader_workers,
        collate_fn=as_lists,
        drop_last=True,
        persistent_workers=loop.loader_workers > 0,
        generator=torch.Generator().manual_seed(recipe.seed),
        # No fork of a process that runs Ray's threads.
        multiprocessing_context="spawn" if loop.loader_workers > 0 else None,
    )
    model.train()
    # The loader's worker processes start (spawned: they import this script's modules) and
    # hand over the first batch before the clock starts: start-up, as our worker group's.
    batches = iter(loader)
    first = next(batches)
    step, wait_s, begin = 0, 0.0, time.perf_counter()
    startup_s = begin - started
    while True:
        fetched = time.perf_counter()
        for images, targets in _chain_first(first, batches):
            first = None
            wait_s += time.perf_counter() - fetched
            losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - begin
            if step == loop.calibrate_steps:
                schedule["steps"] = max(step + 1, round(loop.budget_s * step / elapsed))
            if elapsed >= loop.budget_s:
                return {
                    "steps": step,
                    "train_s": round(elapsed, 2),
                    "images_per_s": round(step * recipe.global_batch / elapsed, 3),
                    "data_wait_fraction": round(wait_s / elapsed, 4),
                    "schedule_steps": schedule["steps"],
                    "startup_s": round(startup_s, 2),
                    "loss": round(sum(v.item() for v in losses.values()), 4),
                }
            fetched = time.perf_counter()
        batches = iter(loader)


def _chain_first(first: Any, batches: Iterator[Any]) -> Iterator[Any]:
    if first is not None:
        yield first
    yield from batches


class _LiveSteps:
    """``TrainSettings`` whose ``steps`` (the schedule's length) is read at every step."""

    def __init__(self, recipe: TrainSettings, schedule: dict[str, int]) -> None:
        self._recipe, self._schedule = recipe, schedule

    def __getattr__(self, name: str) -> Any:
        return self._schedule["steps"] if name == "steps" else getattr(self._recipe, name)


@torch.inference_mode()
def predict(
    *,
    model: TorchvisionMaskRCNN,
    coco: COCO,
    images_dir: Path,
    category_of: Mapping[int, int],
    batch_size: int,
    score_threshold: float,
    threads: int,
) -> tuple[list[dict[str, Any]], int, float]:
    """COCO results of every image in ``coco``, how many images went through the model and the
    seconds they took (decode, model with its mask pasting at the original size, threshold,
    RLE encoding)."""
    torch.set_num_threads(threads)
    model.eval()
    ids = sorted(coco.getImgIds())
    results: list[dict[str, Any]] = []
    images_done = 0
    start = time.perf_counter()
    for first in range(0, len(ids), batch_size):
        chunk = ids[first : first + batch_size]
        images = [read_image(images_dir, coco.imgs[i]["file_name"]) for i in chunk]
        for image_id, output in zip(chunk, model(images), strict=True):
            results.extend(_coco_results(image_id, output, category_of, score_threshold))
            images_done += 1
    return results, images_done, time.perf_counter() - start


def _coco_results(
    image_id: int,
    output: Mapping[str, torch.Tensor],
    category_of: Mapping[int, int],
    score_threshold: float,
) -> list[dict[str, Any]]:
    keep = output["scores"] >= score_threshold
    boxes = output["boxes"][keep].tolist()
    masks = (output["masks"][keep, 0] > 0.5).numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    return [
        {
            "image_id": image_id,
            "category_id": category_of[int(label)],
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(score), 5),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        }
        for (x1, y1, x2, y2), label, score, rle in zip(
            boxes, output["labels"][keep], output["scores"][keep], rles, strict=True
        )
    ]


def coco_ap(gt: COCO, results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """bbox and segm AP (IoU .50:.95) with pycocotools over every image of ``gt``."""
    if not results:
        return {"bbox_AP": 0.0, "segm_AP": 0.0}
    scores = {}
    with quiet_stdout():
        for iou_type, drop in (("bbox", "segmentation"), ("segm", "bbox")):
            # As torchvision's references: segm results carry no box, so that pycocotools
            # takes each one's area from its mask (the area ranges of COCOeval).
            detections = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            evaluator = COCOeval(gt, detections, iou_type)
            evaluator.params.imgIds = sorted(gt.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            scores[f"{iou_type}_AP"] = round(max(float(evaluator.stats[0]), 0.0), 4)
    return scores
