"""The bench scripts keep working when the code they measure moves.

Every ``bench/*.py`` runs ``--help`` (its module-level imports included), every import of our
own code in them, module-level or inside a function, resolves, and two things the figures in
docs/benchmarks.md rest on hold: a child's peak memory is its own, and the torchvision twin of
the model is the same network (same anchors included).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn import MaskRCNN
from pipeline.config.params import load_params, model_config

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")
OURS = ("maskrcnn", "pipeline", "stages")

# One process shows every script's --help, so torch and Ray are imported once. A module
# without a ``__main__`` block (a helper other scripts import) is only imported.
HELP_ALL = """
import json, runpy, sys
sys.path.insert(0, sys.argv[1])
failures = {}
for script in sys.argv[2:]:
    main = 'if __name__ == "__main__":' in open(script).read()
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__" if main else "bench_helper")
        if main:
            failures[script] = "no exit after --help"
    except SystemExit as stop:
        if stop.code not in (0, None):
            failures[script] = f"exit {stop.code}"
    except Exception as error:
        failures[script] = f"{type(error).__name__}: {error}"
print(json.dumps(failures))
"""


def test_every_bench_script_shows_its_help() -> None:
    assert len(SCRIPTS) >= 7, SCRIPTS
    command = [sys.executable, "-c", HELP_ALL, str(BENCH), *map(str, SCRIPTS)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {}, failures


def imports_of_our_code(script: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import of our packages in ``script``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in OURS:
                found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in OURS
            ]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_imports_of_our_code_resolve(script: Path) -> None:
    broken = []
    for line, module, name in imports_of_our_code(script):
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            broken.append(f"{script.name}:{line}: {module}: {error}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                broken.append(f"{script.name}:{line}: {module} has no {name}")
    assert not broken, "\n".join(broken)


PEAK_OF_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from common import peak_rss_mb
ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak": peak_rss_mb(), "ru_maxrss": ru_maxrss}))
"""


def test_peak_rss_of_a_child_is_its_own_not_its_parents() -> None:
    """The bug behind "64 and 640 images: 1029.6 MB both": a child's ru_maxrss starts at
    its parent's RSS. bench/common.peak_rss_mb must not."""
    ballast = bytearray(400 * 2**20)  # the parent's RSS grows by 400 MB (pages touched)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    command = [sys.executable, "-c", PEAK_OF_CHILD, str(BENCH)]
    child = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert child["ru_maxrss"] > 400, child  # the trap is real on this system
    assert child["peak"] < 200, child  # a bare interpreter: tens of MB
    del ballast


def test_torchvision_twin_is_the_same_network() -> None:
    """bench/model_step.py and bench/train.py compare against this twin: on params.yaml's model
    (anchors 16-256, not torchvision's 32-512) it gives our detections exactly."""
    sys.path.insert(0, str(BENCH))
    try:
        model_step = importlib.import_module("model_step")
    finally:
        sys.path.remove(str(BENCH))
    torch.manual_seed(0)
    config = model_config(load_params(ROOT / "params.yaml"), num_classes=3)
    ours = MaskRCNN(config).eval()
    twin = model_step.torchvision_twin(ours).eval()
    images = torch.rand(2, 3, config.canvas, config.canvas)
    with torch.no_grad():
        expected, got = ours(images), twin(list(images))
    for mine, theirs in zip(expected, got, strict=True):
        assert len(mine["boxes"]) > 0
        torch.testing.assert_close(theirs["boxes"], mine["boxes"])
        torch.testing.assert_close(theirs["scores"], mine["scores"])
