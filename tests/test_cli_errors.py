"""Every stage and command line ends a user-input problem with ``error: ...``, not a traceback.

Each case runs a stage as a user would (a subprocess) with one broken input and checks the exit
status, the specific message, and that no traceback is printed; ``--traceback`` brings it back
(``MASKRCNN_TRACEBACK=1`` too, checked in-process). Every case fails before any real work (no
Ray started, no training), and the cases run a few at a time: most of their cost is importing
torch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray.exceptions
import yaml
from ray.train.v2.api.exceptions import WorkerGroupError

from pipeline.coco.reader import DataError
from pipeline.config.errors import command, describe, is_user_error
from pipeline.config.params import load_params, model_config
from pipeline.shards.schema import shard_metadata

ROOT = Path(__file__).resolve().parents[1]
PREDICT = Path(sys.executable).with_name("maskrcnn-predict")  # the installed entry point
UNREACHABLE_MLFLOW = "http://127.0.0.1:9"
UNREACHABLE_RAY = "127.0.0.1:1"


@dataclass(frozen=True)
class Case:
    command: list[str]  # after the interpreter; {root} is the case's project directory
    message: str  # a regular expression the error line must match
    params: dict = field(default_factory=dict)  # {section: {key: value}} over params.yaml
    traceback: bool = False


CASES = {
    "check_params: a misspelt key": Case(
        ["-m", "stages.check_params", "{root}/params.yaml"],
        r"error: .*params\.yaml: unknown key train\.stpes \(did you mean train\.steps\?\)",
        params={"train": {"stpes": 10}},
    ),
    "synthesize: a misspelt key": Case(
        ["-m", "stages.synthesize", "--params", "{root}/params.yaml", "--out", "{root}/out"],
        r"error: .*params\.yaml: unknown key shapes\.n_trian \(did you mean shapes\.n_train\?\)",
        params={"shapes": {"n_trian": 3}},
    ),
    "preprocess: a missing annotation file": Case(
        ["-m", "stages.preprocess", "--params", "{root}/params.yaml"],
        r"error: .*params\.yaml: not found: data\.val_annotations = .*missing\.json\. Point data",
        params={"data": {"val_annotations": "missing.json"}},
    ),
    "preprocess: duplicate image ids": Case(
        ["-m", "stages.preprocess", "--params", "{root}/params.yaml"],
        r"error: .*duplicates\.json: image_id=1: duplicate image id, listed 2 times",
        params={"data": {"train_annotations": "duplicates.json"}},
    ),
    "train: an unreachable tracking server": Case(
        ["-m", "stages.train", "--params", "{root}/params.yaml", "--out", "{root}/out"],
        r"error: the MLflow tracking server at 127\.0\.0\.1:9 does not answer .*set tracking\.uri",
        params={"tracking": {"uri": UNREACHABLE_MLFLOW}},
    ),
    "train: an unreachable Ray address": Case(
        ["-m", "stages.train", "--params", "{root}/params.yaml", "--out", "{root}/out"],
        r"error: the Ray cluster at 127\.0\.0\.1:1 does not answer .*ray start --head",
        params={"ray": {"address": UNREACHABLE_RAY}},
    ),
    "train: shards made for other scales": Case(
        ["-m", "stages.train", "--params", "{root}/params.yaml", "--out", "{root}/out"],
        r"error: .*shards/train: shards hold RPN targets for train_scales \[1\.0\], but the "
        r"training asks for \[1\.0, 0\.5\]: run the preprocess stage",
        params={"preprocess": {"train_scales": [1.0, 0.5]}},
    ),
    "evaluate: no model file": Case(
        [
            "-m",
            "stages.evaluate",
            "--params",
            "{root}/params.yaml",
            "--train",
            "{root}/empty",
            "--out",
            "{root}/out",
        ],
        r"error: .*empty/model\.pt not found: run the train stage first",
    ),
    "register: an unreachable tracking server": Case(
        [
            "-m",
            "stages.register",
            "--params",
            "{root}/params.yaml",
            "--train",
            "{root}/trained",
            "--evaluate",
            "{root}/empty",
            "--out",
            "{root}/out",
        ],
        r"error: the MLflow tracking server at 127\.0\.0\.1:9 .*tracking_uri in .*run\.json",
    ),
    "report: no params file": Case(
        ["-m", "stages.report", "--params", "{root}/nope.yaml"],
        r"error: params file not found: .*nope\.yaml",
    ),
    "maskrcnn-predict: no model file": Case(
        [str(PREDICT), "--model", "{root}/nope.pt", "--out", "{root}/out", "{root}/image.png"],
        r"error: model file .*nope\.pt does not exist",
    ),
    "--traceback shows it": Case(
        [
            "-m",
            "stages.synthesize",
            "--params",
            "{root}/params.yaml",
            "--out",
            "{root}/out",
            "--traceback",
        ],
        r"ValueError: .*unknown key shapes\.n_trian",
        params={"shapes": {"n_trian": 3}},
        traceback=True,
    ),
}


def _coco(image_ids: list[int]) -> dict:
    return {
        "images": [{"id": i, "file_name": "image.png", "height": 8, "width": 8} for i in image_ids],
        "annotations": [],
        "categories": [{"id": 1, "name": "square"}],
    }


def _project(root: Path, params: dict) -> None:
    """A project directory: params.yaml (the project's, with ``params`` over it and every path
    inside ``root``), a tiny COCO split, train shards' manifest, a trained run's run.json."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] = {key: str(root / "data" / key) for key in raw["data"]}
    raw["data"].update(train_annotations="coco.json", val_annotations="coco.json")
    raw["data"].update(train_images=".", val_images=".", shards_dir="shards")
    raw["train"]["storage_path"] = "ray_results"
    raw["tracking"]["uri"] = "sqlite:///mlflow.db"
    for section, values in params.items():
        raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "image.png").write_bytes(b"")
    (root / "coco.json").write_text(json.dumps(_coco([1])))
    (root / "duplicates.json").write_text(json.dumps(_coco([1, 1])))
    (root / "empty").mkdir()
    trained = root / "trained"
    trained.mkdir()
    (trained / "model.pt").write_bytes(b"")
    run = {"run_id": "0" * 32, "experiment_id": "1", "tracking_uri": UNREACHABLE_MLFLOW}
    (trained / "run.json").write_text(json.dumps(run))
    config = model_config(load_params(ROOT / "params.yaml"), num_classes=2)
    manifest = shard_metadata(
        model_config=config,
        categories=[{"id": 1, "name": "square", "label": 1}],
        annotation_sha256="0" * 64,
        split="train",
        image_format="jpeg",
    )
    manifest["counts"] = {"images": 1, "bytes_written": 1}
    (root / "shards" / "train").mkdir(parents=True)
    (root / "shards" / "train" / "manifest.json").write_text(json.dumps(manifest))


def _run(case: Case, root: Path) -> subprocess.CompletedProcess:
    _project(root, case.params)
    argv = [arg.replace("{root}", str(root)) for arg in case.command]
    if argv[0] == "-m":
        argv = [sys.executable, *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("MASKRCNN_TRACEBACK", "RAY_ADDRESS")}
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(_run, case, tmp_path_factory.mktemp("case"))
            for name, case in CASES.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_a_broken_input_ends_with_a_clear_error(results, name):
    case, done = CASES[name], results[name]
    assert done.returncode == 1, done.stderr
    assert ("Traceback" in done.stderr) == case.traceback, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if case.traceback:
        assert lines == [], done.stderr
        assert re.search(case.message, done.stderr), done.stderr
    else:
        assert len(lines) == 1, done.stderr
        assert re.search(case.message, lines[0]), lines[0]


def test_a_programming_error_keeps_its_traceback():
    @command
    def buggy(argv: list[str]) -> None:
        raise KeyError("a bug, not the user's input")

    with pytest.raises(KeyError):
        buggy([])


def test_a_user_error_becomes_one_line_unless_a_traceback_is_asked_for(monkeypatch):
    seen = []

    @command
    def main(argv: list[str]) -> None:
        seen.append(argv)
        raise FileNotFoundError(2, "No such file or directory", "/data/x.json")

    with pytest.raises(SystemExit) as stopped:
        main(["--params", "p.yaml"])
    assert str(stopped.value) == "error: No such file or directory: /data/x.json"
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "--params", "p.yaml"])
    assert seen == [["--params", "p.yaml"]] * 2  # the flag is not the stage's to parse
    monkeypatch.setenv("MASKRCNN_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main([])


def test_an_error_from_a_ray_task_reads_as_the_original():
    original = DataError("/data/coco.json", "image_id=3", "duplicate image id")
    remote = ray.exceptions.RayTaskError(
        "encode_shard_task", "Traceback (most recent call last):\n  ...", original
    ).as_instanceof_cause()
    assert is_user_error(remote)
    assert describe(remote) == "/data/coco.json: image_id=3: duplicate image id"
    assert not is_user_error(RuntimeError("a bug"))


def test_an_error_from_a_training_worker_reads_as_the_original():
    missing = FileNotFoundError(2, "No such file or directory", "/weights/r50.pth")
    failed = WorkerGroupError("rank 0: ...", {1: RuntimeError("lost rank 0"), 0: missing})
    assert is_user_error(failed)
    assert describe(failed) == "No such file or directory: /weights/r50.pth"
    assert not is_user_error(WorkerGroupError("rank 0: ...", {0: KeyError("a bug")}))
    diverged = WorkerGroupError("", {0: FloatingPointError("training diverged at step 2")})
    assert describe(diverged) == "training diverged at step 2"
