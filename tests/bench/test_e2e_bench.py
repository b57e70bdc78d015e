"""bench/e2e.py and bench/evaluate.py run end to end on a tiny budget and report what they claim.

Both scripts' ``main`` run in this process (one Ray runtime for the two, to stay short on 2
cores): e2e.py on a few images for two steps, then evaluate.py on the data, shards and model
that e2e.py kept. The JSON each prints on stdout is what is checked.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[2]
TRAIN_IMAGES, VAL_IMAGES, STEPS = 16, 6, 2
SIDE_KEYS = ("steps", "train_s", "images_per_s", "startup_s", "eval_images_per_s", "eval_s")
AP_KEYS = ("bbox_AP", "segm_AP")

pytestmark = pytest.mark.e2e


def bench_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_json(capfd) -> dict:
    return json.loads(capfd.readouterr().out)  # the whole of stdout is the JSON


def assert_scored(side: dict, name: str) -> None:
    assert side["eval_images"] == VAL_IMAGES, f"{name} did not evaluate every val image"
    for key in AP_KEYS:
        assert 0.0 <= side[key] <= 1.0, f"{name} {key} = {side[key]}"


@pytest.fixture(scope="module")
def ray_runtime():
    yield
    ray.shutdown()


def test_e2e_then_evaluate(tmp_path, capfd, ray_runtime):
    work = tmp_path / "e2e"
    bench_script("e2e").main(
        [
            *("--train-images", str(TRAIN_IMAGES), "--val-images", str(VAL_IMAGES)),
            *("--min-side", "96", "--max-side", "160", "--steps", str(STEPS), "--seeds", "0"),
            *("--workers", "1", "--loader-workers", "0", "--keep", str(work)),
        ]
    )
    report = printed_json(capfd)
    assert {"runs", "ours", "torchvision", "load_average", "preprocess_s"} <= set(report)
    assert "train_images_per_s_ours_over_torchvision" in report
    (run,) = report["runs"]
    for name in ("ours", "torchvision"):
        side = run[name]
        assert set(SIDE_KEYS) <= set(side), name
        assert side["steps"] > 0 and side["images_per_s"] > 0, f"{name} did not train"
        assert_scored(side, name)
    assert run["ours"]["steps"] == STEPS
    # The plain loop trains for at least the seconds ours trained (the equal budget).
    assert run["ours"]["train_s"] <= run["torchvision"]["train_s"]

    bench_script("evaluate").main(
        [
            *("--model", run["ours"]["model_path"], "--data", str(work / "data")),
            *("--shards", str(work / "shards" / "val"), "--repeats", "1"),
        ]
    )
    result = printed_json(capfd)
    assert result["images_per_s_ratio_ours_over_torchvision"] > 0
    for name in ("ours", "torchvision"):
        assert_scored(result["rounds"][0][name], name)
        assert result[name]["images_per_s"]["median"] > 0
    assert set(result["AP_difference_ours_minus_torchvision"]) == set(AP_KEYS)
