"""Train-step and inference throughput of our Mask R-CNN vs torchvision's, same settings.

Both models share the backbone architecture, head sizes, anchors, canvas and weights (ours is
copied into torchvision's ``MaskRCNN``, whose keys are the same). After warm-up the two models'
steps alternate in one process, so that both see the same machine load. Ours gets the RPN anchor
sample the loader would give it (drawn once, outside the timing); torchvision matches and samples
anchors itself, as it does on every step. Peak memory is measured in one child process per model
(RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU), each running the same warm-up, train and
inference steps.

    python bench/model_step.py --backbone resnet18 --canvas 512 --batch 2 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from common import load_average, peak_rss_mb, run_fresh_child
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn import MaskRCNN, ModelConfig, anchor_grid, build_rpn_targets, sample_rpn_targets
from maskrcnn.config import RoIConfig

MODELS = ("ours", "torchvision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--canvas", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on GPU")
    p.add_argument(
        "--amp-dtype",
        choices=("auto", "bf16", "fp16"),
        default="auto",
        help="the autocast dtype with --amp (auto: as --amp says)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--num-classes", type=int, default=4, help="including the background")
    p.add_argument("--instances", type=int, default=6, help="instances per image")
    p.add_argument("--norm", default="frozen_bn")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--representation-size", type=int, default=1024)
    p.add_argument("--mask-layers", default="256,256,256,256", help="comma-separated channels")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--memory-of", choices=MODELS, help=argparse.SUPPRESS)  # child process mode
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    layers = tuple(int(c) for c in args.mask_layers.split(","))
    return ModelConfig(
        num_classes=args.num_classes,
        backbone=args.backbone,
        canvas=args.canvas,
        norm=args.norm,
        fpn_channels=args.fpn_channels,
        roi=RoIConfig(representation_size=args.representation_size, mask_layers=layers),
    )


def torchvision_twin(ours: MaskRCNN) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN with our backbone, anchors, head sizes, RPN/RoI settings and
    weights: every knob of ``ours.config`` that torchvision has is passed, none left at its
    default."""
    twin = torchvision_maskrcnn(copy.deepcopy(ours.backbone), ours.config)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return twin


def torchvision_maskrcnn(backbone: torch.nn.Module, cfg: ModelConfig) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN around ``backbone`` (an FPN with outputs "0".."3", "pool") with
    ``cfg``'s anchors, heads and RPN/RoI settings (bench/torchvision_loop.py builds on it too)."""
    rpn, roi = cfg.rpn, cfg.roi
    channels, last = cfg.fpn_channels, roi.mask_layers[-1]
    levels = ["0", "1", "2", "3"]
    return TorchvisionMaskRCNN(
        backbone,
        min_size=cfg.canvas,
        max_size=cfg.canvas,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rpn_anchor_generator=AnchorGenerator(
            sizes=tuple((size,) for size in cfg.anchors.sizes),
            aspect_ratios=(tuple(cfg.anchors.aspect_ratios),) * len(cfg.anchors.sizes),
        ),
        rpn_head=RPNHead(channels, len(cfg.anchors.aspect_ratios)),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(levels, roi.box_pool_size, roi.sampling_ratio),
        box_head=TwoMLPHead(channels * roi.box_pool_size**2, roi.representation_size),
        box_predictor=FastRCNNPredictor(roi.representation_size, cfg.num_classes),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        bbox_reg_weights=roi.bbox_reg_weights,
        mask_roi_pool=MultiScaleRoIAlign(levels, roi.mask_pool_size, roi.sampling_ratio),
        mask_head=MaskRCNNHeads(channels, list(roi.mask_layers), roi.mask_dilation),
        mask_predictor=MaskRCNNPredictor(last, last, cfg.num_classes),
    )


def amp_dtype(args: argparse.Namespace) -> torch.dtype:
    """``--amp-dtype``, or with auto: float16 on GPU, bfloat16 on CPU."""
    if args.amp_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]
    return torch.float16 if args.device.startswith("cuda") else torch.bfloat16


def synthetic_batch(config: ModelConfig, batch: int, instances: int) -> tuple[torch.Tensor, list]:
    """Images with ``instances`` filled ellipses each, targets with the loader's RPN sample."""
    gen = torch.Generator().manual_seed(0)
    s = config.canvas
    grid = anchor_grid(s, config.anchors)
    ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    images = 0.2 * torch.rand(batch, 3, s, s, generator=gen)
    targets = []
    for image in images:
        size = torch.empty(instances, 2).uniform_(s / 16, s / 2, generator=gen)
        corner = torch.rand(instances, 2, generator=gen) * (s - size)
        boxes = torch.cat([corner, corner + size], dim=1)
        centre, radius = corner + size / 2, size / 2
        dx = (xs[None] - centre[:, 0, None, None]) / radius[:, 0, None, None]
        dy = (ys[None] - centre[:, 1, None, None]) / radius[:, 1, None, None]
        masks = (dx**2 + dy**2 <= 1).to(torch.uint8)
        for mask in masks:
            image[:, mask.bool()] = torch.rand(3, 1, generator=gen)
        sample = sample_rpn_targets(build_rpn_targets(grid, boxes), grid.num_anchors, generator=gen)
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.randint(1, config.num_classes, (instances,), generator=gen),
                "masks": masks,
                "rpn_idx": sample.idx,
                "rpn_labels": sample.labels,
                "rpn_deltas": sample.deltas,
            }
        )
    return images, targets


class Runner:
    """One model's train step and inference on a fixed batch, with timing."""

    def __init__(self, name: str, model: torch.nn.Module, images, targets, args) -> None:
        self.name, self.model, self.args = name, model, args
        self.device = torch.device(args.device)
        self.model.to(self.device)
        images, targets = images.to(self.device), [_to(t, self.device) for t in targets]
        if name == "torchvision":
            keep = ("boxes", "labels", "masks")
            self.images = list(images)
            self.targets = [{k: t[k] for k in keep} for t in targets]
        else:
            self.images, self.targets = images, targets
        params = [p for p in model.parameters() if p.requires_grad]
        # A tiny learning rate: the optimiser step costs what it costs, the workload stays put.
        self.optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        amp = args.amp and self.device.type == "cuda" and amp_dtype(args) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def autocast(self):
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=amp_dtype(self.args))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> float:
        self.model.train()
        self.sync()
        start = time.perf_counter()
        with self.autocast():
            losses = self.model(self.images, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sum(losses.values())).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.sync()
        return time.perf_counter() - start

    def infer_step(self) -> float:
        self.model.eval()
        self.sync()
        start = time.perf_counter()
        with torch.no_grad(), self.autocast():
            self.model(self.images)
        self.sync()
        return time.perf_counter() - start


def _to(target: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in target.items()}


def build_runners(args: argparse.Namespace, which: tuple[str, ...] = MODELS) -> dict[str, Runner]:
    torch.manual_seed(0)
    config = model_config(args)
    ours = MaskRCNN(config)
    images, targets = synthetic_batch(config, args.batch, args.instances)
    models = {
        "ours": ours,
        "torchvision": torchvision_twin(ours) if "torchvision" in which else None,
    }
    return {name: Runner(name, models[name], images, targets, args) for name in which}


def loader_sample_ms(args: argparse.Namespace, repeats: int = 20) -> float:
    """What moved out of our train step: drawing one image's anchor sample from stored targets."""
    config = model_config(args)
    grid = anchor_grid(config.canvas, config.anchors)
    _, targets = synthetic_batch(config, 1, args.instances)
    stored = build_rpn_targets(grid, targets[0]["boxes"])
    start = time.perf_counter()
    for _ in range(repeats):
        sample_rpn_targets(stored, grid.num_anchors)
    return (time.perf_counter() - start) / repeats * 1e3


def measure_throughput(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    runners = build_runners(args)
    results: dict[str, dict[str, float]] = {}
    for mode in ("train", "infer"):
        elapsed, cpu = dict.fromkeys(runners, 0.0), dict.fromkeys(runners, 0.0)
        for step in range(args.warmup + args.steps):
            order = list(runners.items())
            for name, runner in order if step % 2 else reversed(order):  # no first-mover bias
                cpu_start = time.process_time()
                seconds = runner.train_step() if mode == "train" else runner.infer_step()
                if step >= args.warmup:
                    elapsed[name] += seconds
                    cpu[name] += time.process_time() - cpu_start
        for name in runners:
            results.setdefault(name, {})[f"{mode}_img_s"] = args.batch * args.steps / elapsed[name]
            # CPU seconds of this process per step: what other jobs on the machine do not
            # change, unlike the wall time (with one thread: the step's own work).
            results[name][f"{mode}_cpu_s_per_step"] = cpu[name] / args.steps
    return results


def measure_memory_here(args: argparse.Namespace) -> float:
    """Peak memory (MB) of this process running one model's warm-up, train and infer steps."""
    runner = build_runners(args, (args.memory_of,))[args.memory_of]
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    for _ in range(args.warmup + 2):  # the peak comes with the first steps
        runner.train_step()
    for _ in range(args.warmup + 1):
        runner.infer_step()
    if runner.device.type == "cuda":
        return torch.cuda.max_memory_allocated(runner.device) / 2**20
    return peak_rss_mb()


def child_argv(args: argparse.Namespace, which: str) -> list[str]:
    """The same settings on a child's command line, measuring ``which`` model's memory."""
    argv = ["--memory-of", which]
    for key, value in vars(args).items():
        if key in ("out", "memory_of") or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of each model, each in a fresh child process (``run_fresh_child``: freed
    tensors leave the process at once, so the peak RSS follows the live tensors)."""
    peaks = {}
    for name in MODELS:
        cmd = [sys.executable, __file__, *child_argv(args, name)]
        peaks[name] = run_fresh_child(cmd)["peak_mem_mb"]
    return peaks


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_mem_mb": measure_memory_here(args)}))
        return
    load_at_start = load_average()
    results = measure_throughput(args)
    for name, peak in measure_memory(args).items():
        results[name]["peak_mem_mb"] = peak
    report = {
        **results,
        "ratio_train": results["ours"]["train_img_s"] / results["torchvision"]["train_img_s"],
        "ratio_infer": results["ours"]["infer_img_s"] / results["torchvision"]["infer_img_s"],
        "ratio_train_cpu": results["torchvision"]["train_cpu_s_per_step"]
        / results["ours"]["train_cpu_s_per_step"],
        "loader_rpn_sample_ms_per_image": loader_sample_ms(args),
        "load_average": {"start": load_at_start, "end": load_average()},
        "settings": {
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k != "memory_of"
            },
            "torch": torch.__version__,
            "threads_used": torch.get_num_threads(),
            "device_name": device_name(args.device),
            "memory": "one child process per model (train then infer steps): peak RSS with "
            "MALLOC_MMAP_THRESHOLD_=65536 on CPU, max_memory_allocated on GPU",
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
