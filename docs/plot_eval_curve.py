"""The README's picture of evaluation during training: eval/segm_AP and eval/bbox_AP by step.

Reads the training's MLflow run (``artifacts/train/run.json`` after ``make demo``) and writes a
PNG, so the curve in the README is the one the MLflow UI draws for that run:

    .venv/bin/python docs/plot_eval_curve.py --run artifacts/train/run.json \
        --out docs/images/demo_eval_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

METRICS = {"eval/segm_AP": "segm AP", "eval/bbox_AP": "bbox AP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("artifacts/train/run.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/images/demo_eval_curve.png"))
    args = parser.parse_args()
    run = json.loads(args.run.read_text())
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=120)
    for key, label in METRICS.items():
        # Evaluations during training are at steps >= 1 (older runs' evaluate stage logged at 0).
        history = sorted(client.get_metric_history(run["run_id"], key), key=lambda m: m.step)
        history = [m for m in history if m.step > 0]
        if not history:
            raise SystemExit(f"error: run {run['run_id']} has no {key} (train.eval_every is 0?)")
        steps, values = [m.step for m in history], [m.value for m in history]
        axes.plot(steps, values, marker="o", label=label)
        axes.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                      xytext=(4, -10 if key == "eval/segm_AP" else 4), fontsize=8)  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("COCO AP (val)")
    axes.set_title("Evaluation during training (MLflow: eval/segm_AP, eval/bbox_AP)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
