"""bench/gpu_check.sh's dry run on the CPU: every part runs and the JSON is whole.

The figures of a dry run mean nothing (tiny sizes, one step); what is checked is that the
script the device machine will run works with the venv's python, finds the tests, runs both
models and writes every section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--steps", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["pytest_available"] is True
    assert report["environment"]["test_imports_beyond_torch"] == []
    assert report["pytest"]["passed"] is True and "passed" in report["pytest"]["summary"]
    step = report["model_step"]["bf16"]
    assert step["ok"] is True
    for model in ("ours", "torchvision"):
        assert step[model]["train_img_s"] > 0 and step[model]["infer_img_s"] > 0
        assert step[model]["peak_mem_mb"] > 0
    assert step["ratio_train"] > 0 and step["ratio_infer"] > 0
    assert report["syncs"]["ok"] is True and "no CUDA syncs" in report["syncs"]["skipped"]
    assert json.loads(done.stdout) == report  # stdout is the same JSON
