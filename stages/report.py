"""Print what the last `dvc repro` produced: training, COCO scores and the registry decision.

`dvc metrics show` lists every number in one very wide table; this is the few lines a person
wants at the end of `make demo`, with where to look next.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.config.errors import command
from pipeline.config.params import load_params
from pipeline.io.outputs import EVALUATE, REGISTER, TRAIN


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def report_lines(artifacts: Path) -> list[str]:
    """The summary of ``artifacts/{train,evaluate,register}``; a line per missing part."""
    train = _read(TRAIN.under(artifacts) / TRAIN.metrics)
    scores = _read(EVALUATE.under(artifacts) / EVALUATE.metrics)
    decision = _read(REGISTER.under(artifacts) / REGISTER.decision)
    lines = []
    if train:
        workers = train["num_workers"]
        lines.append(
            f"trained {train['step']} steps in {train['train_s'] / 60:.1f} min "
            f"({train['images_per_s']:.1f} images/s, {workers} worker{'s' * (workers != 1)}, "
            f"global batch {train['global_batch']}), final loss {train['loss']:.3f}"
        )
    else:
        lines.append(f"no training metrics in {TRAIN.under(artifacts)}")
    if scores:
        lines.append(
            f"val ({scores['num_images']} images): bbox AP {scores['bbox_AP']:.3f} "
            f"(AP50 {scores['bbox_AP50']:.3f}), segm AP {scores['segm_AP']:.3f} "
            f"(AP50 {scores['segm_AP50']:.3f})"
        )
        per_class = scores.get("per_class", {}).get("segm", {})
        if per_class:
            classes = ", ".join(f"{name} {ap:.2f}" for name, ap in per_class.items())
            lines.append(f"segm AP per class: {classes}")
    else:
        lines.append(f"no evaluation metrics in {EVALUATE.under(artifacts)}")
    if decision:
        role = "champion" if decision["champion"] else "challenger"
        lines.append(
            f"registry: {decision['model_name']} v{decision['version']} is {role} "
            f"({decision['reason']})"
        )
    return lines


@command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    print("\n".join(report_lines(Path(params.data_path("artifacts_dir")))))


if __name__ == "__main__":
    main()
