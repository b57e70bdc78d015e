"""Do two commits write the same shards? SHA-256 of every file preprocess writes, per commit.

Each commit's tree is extracted with ``git archive`` into a temporary directory and runs
``preprocess_split`` in a fresh process with that tree first on ``PYTHONPATH`` (its own
``maskrcnn`` and ``pipeline``, old layout or new), on the same synthetic split (written once by
this checkout's shapes generator) into the same output path, on a local Ray. Prints JSON: the
digests per commit and whether every file is the same.

    .venv/bin/python bench/shard_digest.py --commits 4eaaafb f68d55d --images 40
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ray
from common import load_average, run_json_child, start_local_ray

ROOT = Path(__file__).resolve().parents[1]
# Where the modules were before and after the re-layout (commit 6e1c562).
PREPROCESS = ("pipeline.shards.preprocess", "pipeline.preprocess")
SHAPES = ("pipeline.coco.shapes", "pipeline.shapes")


def first_module(names: tuple[str, ...]):
    """The first of ``names`` that imports: the same function under either layout."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {names} on {sys.path[:2]}")


def digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def child(args: argparse.Namespace) -> dict:
    """Preprocess the split with whatever ``maskrcnn``/``pipeline`` come first on the path."""
    config = importlib.import_module("maskrcnn.config").ModelConfig
    module = first_module(PREPROCESS)
    preprocess_split = module.preprocess_split
    data, out = Path(args.data), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    # The Ray workers must import the same tree as this process. Ray puts the driver's current
    # directory first on their path, so the parent runs this child inside the tree.
    tree = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=tree)
    try:
        preprocess_split(
            annotation_file=data / "annotations" / "instances_train.json",
            images_dir=data / "images" / "train",
            out_dir=out,
            model_config=config(num_classes=6, canvas=args.canvas),
            rows_per_shard=args.rows_per_shard,
            progress=False,
        )
    finally:
        ray.shutdown()
    return {"module": module.__file__, "digests": digests(out)}


def extract(commit: str, into: Path) -> Path:
    """``git archive`` of ``commit`` unpacked under ``into``."""
    tree = into / commit
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--commits",
        nargs="+",
        default=["6a65691", "2e61154"],
        help="default: the last commit before the re-layout and the re-layout with its test fixes",
    )
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    load_at_start = load_average()
    per_commit = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "shards" / "train"
        first_module(SHAPES).write_shapes_dataset(data, n_train=args.images, n_val=1, seed=0)
        for commit in args.commits:
            tree = extract(commit, Path(tmp) / "trees")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            flags = ["--data", str(data), "--out", str(out), "--canvas", str(args.canvas)]
            flags += ["--rows-per-shard", str(args.rows_per_shard)]
            command = [sys.executable, str(Path(__file__).resolve()), "--child", *flags]
            per_commit[commit] = run_json_child(command, env, cwd=tree)
    first, *others = (run["digests"] for run in per_commit.values())
    result = {
        "images": args.images,
        "canvas": args.canvas,
        "rows_per_shard": args.rows_per_shard,
        "commits": per_commit,
        "same_files": all(d == first for d in others),
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
