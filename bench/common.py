"""Helpers shared by the bench scripts, which run as ``python bench/<name>.py`` (so this
directory is on ``sys.path`` and ``from common import ...`` resolves here)."""

from __future__ import annotations

import argparse
import json
import subprocess


def add_shapes_args(parser: argparse.ArgumentParser, *, images: int, canvas: int = 512) -> None:
    """The synthetic shapes dataset's size flags: image count, canvas and image side range."""
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--canvas", type=int, default=canvas)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=512)


def run_json_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``command`` to completion and parse the JSON on the last line of its stdout."""
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])
