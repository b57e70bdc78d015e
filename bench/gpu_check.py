"""One device check, one JSON: the model tests on the device, our step vs torchvision's under
bf16 and fp16 autocast, and the host syncs per step. Needs only torch and torchvision (and
pytest for the tests: without it the JSON says so); no Ray, MLflow or DVC.

On a GPU it measures R50-FPN at canvas 1024, batch 8 (the COCO recipe's shape). On a CPU it is
a dry run at tiny sizes: it checks that every part runs and that the JSON is whole, nothing
more. Each part has its own time limit, and the JSON is rewritten after each part, so a part
that runs out of time leaves the others' figures.

    bash bench/gpu_check.sh                        # GPU: writes $OUT/gpu_check.json (or ./)
    bash bench/gpu_check.sh --device cpu --steps 1 # the dry run of make test
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ALLOWED_TEST_IMPORTS = {"torch", "torchvision", "numpy", "pytest", "maskrcnn"}
# The measured shape on a GPU; on a CPU, a dry run's.
GPU_MODEL = ["--backbone", "resnet50", "--canvas", "1024", "--batch", "8"]
CPU_MODEL = ["--backbone", "resnet18", "--canvas", "64", "--batch", "1", "--fpn-channels", "16",
             "--representation-size", "32", "--mask-layers", "16", "--threads", "1"]  # fmt: skip
LIMITS_S = {"pytest": 170, "model_step": 120, "syncs": 60}  # 8 minutes in all, on one GPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on GPU, 0 on CPU")
    p.add_argument("--amp", default=None, help="comma-separated; default bf16,fp16 (CPU: bf16)")
    p.add_argument("--tests", default=None, help="default tests/maskrcnn (CPU: test_postprocess)")
    default_out = Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    p.add_argument("--out", type=Path, default=default_out)
    return p.parse_args(argv)


def environment(device: str) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": cuda,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.machine(),
        "pytest_available": importlib.util.find_spec("pytest") is not None,
        "test_imports_beyond_torch": sorted(test_imports() - ALLOWED_TEST_IMPORTS),
    }


def test_imports() -> set[str]:
    """Top-level modules that tests/maskrcnn and maskrcnn/ import (stdlib left out)."""
    names: set[str] = set()
    for folder in (ROOT / "tests" / "maskrcnn", ROOT / "maskrcnn"):
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}


def run(command: list[str], *, limit_s: float, env: dict[str, str] | None = None) -> dict:
    """A child process's exit code, wall time and output tail; ``timed_out`` past ``limit_s``."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout or b""
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:]
        return {"rc": None, "timed_out": True, "wall_s": limit_s, "tail": tail}
    return {
        "rc": done.returncode,
        "timed_out": False,
        "wall_s": round(time.perf_counter() - started, 1),
        "stdout": done.stdout,
        "tail": (done.stdout + done.stderr)[-3000:],
    }


def run_tests(args: argparse.Namespace, tests: list[str]) -> dict[str, Any]:
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed on this machine (pip install pytest)"}
    env = {**os.environ, "MASKRCNN_TEST_DEVICE": args.device}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    result = run(command, limit_s=LIMITS_S["pytest"], env=env)
    lines = [line for line in result.pop("stdout", "").splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    passed = result["rc"] == 0
    return {"tests": tests, "passed": passed, "summary": summary, **_trim(result, passed)}


def model_step(args: argparse.Namespace, shape: list[str], amp: str) -> dict[str, Any]:
    command = [sys.executable, str(BENCH / "model_step.py"), *shape, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--amp", "--amp-dtype", amp]  # fmt: skip
    result = run(command, limit_s=LIMITS_S["model_step"])
    if result["rc"] != 0:
        return {"ok": False, **_trim(result, False)}
    report = json.loads(result["stdout"])
    keep = ("train_img_s", "infer_img_s", "peak_mem_mb")
    return {
        "ok": True,
        "wall_s": result["wall_s"],
        "ours": {k: report["ours"][k] for k in keep},
        "torchvision": {k: report["torchvision"][k] for k in keep},
        "ratio_train": report["ratio_train"],
        "ratio_infer": report["ratio_infer"],
    }


def sync_counts(args: argparse.Namespace, shape: list[str], amp: str) -> dict[str, Any]:
    command = [sys.executable, str(BENCH / "gpu_sync_count.py"), *shape, "--device", args.device,
               "--warmup", "1", "--amp", "--amp-dtype", amp]  # fmt: skip
    result = run(command, limit_s=LIMITS_S["syncs"])
    if result["rc"] != 0:
        return {"ok": False, **_trim(result, False)}
    return {"ok": True, "amp": amp, **json.loads(result["stdout"])}


def _trim(result: dict[str, Any], passed: bool) -> dict[str, Any]:
    """The child's figures, its output tail only when it failed."""
    out = {k: v for k, v in result.items() if k not in ("stdout", "tail")}
    return out if passed else {**out, "tail": result.get("tail", "")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    amps = (args.amp or ("bf16,fp16" if on_gpu else "bf16")).split(",")
    tests = args.tests or ("tests/maskrcnn" if on_gpu else "tests/maskrcnn/test_postprocess.py")
    shape = GPU_MODEL if on_gpu else CPU_MODEL
    report: dict[str, Any] = {
        "environment": environment(args.device),
        "settings": {"shape": shape, "steps": args.steps, "warmup": args.warmup, "amp": amps},
    }
    started = time.perf_counter()

    def write() -> None:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    report["pytest"] = run_tests(args, tests.split(","))
    write()
    report["model_step"] = {}
    for amp in amps:
        report["model_step"][amp] = model_step(args, shape, amp)
        write()
    report["syncs"] = sync_counts(args, shape, amps[0])
    write()
    print(json.dumps(report, indent=2))
    steps_ok = all(r["ok"] for r in report["model_step"].values()) and report["syncs"]["ok"]
    tests_ok = report["pytest"].get("passed", True)
    return 0 if steps_ok and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
