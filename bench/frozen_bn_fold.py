"""What folding FrozenBatchNorm into the convolutions could save: an upper bound, on CPU.

The backbone of ``bench/model_step.py``'s CPU model (``maskrcnn.backbone.build_backbone``,
FrozenBN, ResNet + FPN) runs forward + backward on a random batch, alternating, for
``--steps`` rounds, with two copies: as built, and with every FrozenBatchNorm2d replaced by an
identity. Folded into the convolution weights, a FrozenBN costs at most a bias add, so the
difference bounds what folding saves. Prints JSON: CPU seconds per step of each (this
process, all threads; with ``--threads 1`` the work itself) and the share.

    .venv/bin/python bench/frozen_bn_fold.py --backbone resnet18 --canvas 512 --batch 2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import load_average
from torch import nn

from maskrcnn.backbone import FrozenBatchNorm2d, build_backbone
from maskrcnn.config import ModelConfig


def without_frozen_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with each FrozenBatchNorm2d replaced by ``nn.Identity``."""
    stripped = copy.deepcopy(module)
    for parent in stripped.modules():
        for name, child in parent.named_children():
            if isinstance(child, FrozenBatchNorm2d):
                setattr(parent, name, nn.Identity())
    return stripped


def step_s(backbone: nn.Module, images: torch.Tensor) -> float:
    """CPU seconds of one forward + backward (not stretched by other jobs, unlike wall time)."""
    start = time.process_time()
    features = backbone(images)
    sum(f.float().mean() for f in features.values()).backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fpn-channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(
        num_classes=2, backbone=args.backbone, canvas=args.canvas, fpn_channels=args.fpn_channels
    )
    models = {"frozen_bn": build_backbone(config).train()}
    models["no_norm"] = without_frozen_bn(models["frozen_bn"])
    count = sum(isinstance(m, FrozenBatchNorm2d) for m in models["frozen_bn"].modules())
    images = torch.rand(args.batch, 3, args.canvas, args.canvas)
    load_at_start = load_average()
    for model in models.values():
        step_s(model, images)  # warm-up
    seconds = dict.fromkeys(models, 0.0)
    for step in range(args.steps):
        for name in models if step % 2 else reversed(list(models)):
            seconds[name] += step_s(models[name], images)
    per_step = {name: s / args.steps for name, s in seconds.items()}
    saved = per_step["frozen_bn"] - per_step["no_norm"]
    result = {
        "settings": vars(args),
        "frozen_bn_layers": count,
        "backbone_fwd_bwd_cpu_s": {k: round(v, 3) for k, v in per_step.items()},
        "frozen_bn_share_of_backbone": round(saved / per_step["frozen_bn"], 3),
        "frozen_bn_cpu_s_per_step": round(saved, 3),
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
