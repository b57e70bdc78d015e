"""MLflow tracking helpers: URI resolution, the cluster refusal, the experiment kind, the
run's source and dataset inputs, and a real SQLite store."""

import json
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from pipeline.config.errors import Unreachable
from pipeline.registry.lineage import (
    git_commit,
    log_shard_inputs,
    manifest_digest,
    shard_inputs,
    source_tags,
    version_description,
)
from pipeline.registry.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    RunRef,
    attached_run,
    check_server,
    check_uri_for_cluster,
    end_run,
    find_project_root,
    flatten_params,
    is_local_uri,
    log_metrics,
    log_params,
    open_or_create_run,
    resolve_tracking_uri,
)

ROOT = Path("/srv/project")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (None, "sqlite:////srv/project/mlflow.db"),
        ("sqlite:///mlflow.db", "sqlite:////srv/project/mlflow.db"),
        ("sqlite:///runs/db.sqlite", "sqlite:////srv/project/runs/db.sqlite"),
        ("sqlite:////var/mlflow.db", "sqlite:////var/mlflow.db"),
        ("mlruns", "file:///srv/project/mlruns"),
        ("file:./mlruns", "file:///srv/project/mlruns"),
        ("file:///var/mlruns", "file:///var/mlruns"),
        ("http://tracking:5000", "http://tracking:5000"),
        ("databricks", "databricks"),
    ],
)
def test_tracking_uri_is_resolved_against_the_project_root(uri, expected):
    assert resolve_tracking_uri(uri, project_root=ROOT) == expected


def test_local_and_remote_uris():
    assert is_local_uri("sqlite:////x/mlflow.db")
    assert is_local_uri("file:///x/mlruns")
    assert is_local_uri("/x/mlruns")
    assert not is_local_uri("http://tracking:5000")
    assert not is_local_uri("https://tracking.example.com")
    assert not is_local_uri("postgresql://user@db/mlflow")
    assert not is_local_uri("databricks")


def test_local_uri_is_refused_only_on_more_than_one_node():
    check_uri_for_cluster("sqlite:////x/mlflow.db", node_count=1)
    check_uri_for_cluster("http://tracking:5000", node_count=3)
    with pytest.raises(ValueError, match=r"mlflow server.*tracking\.uri"):
        check_uri_for_cluster("sqlite:////x/mlflow.db", node_count=2)


def test_an_unreachable_tracking_server_is_named_at_once():
    started = time.perf_counter()
    with pytest.raises(Unreachable, match=r"tracking server at 127\.0\.0\.1:9 does not answer "
                       r"\(Connection refused\).*mlflow server.*tracking\.uri"):  # fmt: skip
        check_server("http://127.0.0.1:9")
    assert time.perf_counter() - started < 2  # MLflow's own client would retry for minutes
    with pytest.raises(Unreachable, match="register.tracking_uri"):
        check_server("http://127.0.0.1:9/", setting="register.tracking_uri")


def test_a_listening_server_and_local_stores_pass_the_check():
    with socket.create_server(("127.0.0.1", 0)) as server:
        check_server(f"http://127.0.0.1:{server.getsockname()[1]}")
    for uri in ("sqlite:////x/mlflow.db", "file:///x/mlruns", "databricks", "/x/mlruns"):
        check_server(uri)


def test_project_root_is_the_nearest_directory_with_params(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {}\n")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_project_root(nested) == tmp_path.resolve()


def test_flatten_params_nests_with_dots_and_keeps_sequences_as_json():
    nested = {"train": {"steps": 10, "milestones": (3, 6)}, "model": {"rpn": {"x": 0.5}}}
    flat = flatten_params(nested)
    assert flat == {"train.steps": "10", "train.milestones": "[3, 6]", "model.rpn.x": "0.5"}


def test_run_ref_round_trip_and_bad_file(tmp_path):
    ref = RunRef(run_id="abc", experiment_id="1", tracking_uri="sqlite:////x.db")
    ref.write(tmp_path / "run.json")
    assert RunRef.read(tmp_path / "run.json") == ref
    (tmp_path / "bad.json").write_text('{"run_id": "abc"}')
    with pytest.raises(ValueError, match="bad.json"):
        RunRef.read(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    return root, resolve_tracking_uri(None, project_root=root)


def test_run_is_created_reopened_and_logged(store):
    root, uri = store
    ref = open_or_create_run(tracking_uri=uri, experiment="exp", run_name="r", project_root=root)
    client = MlflowClient(uri)
    experiment = client.get_experiment(ref.experiment_id)
    assert experiment.name == "exp"
    assert experiment.artifact_location == (root / "mlruns" / "exp").resolve().as_uri()

    log_params(ref, {"train": {"steps": 4, "lr": 0.1}})
    again = open_or_create_run(
        tracking_uri=uri, experiment="exp", run_name="r", project_root=root, run_id=ref.run_id
    )
    assert again == ref
    log_params(again, {"train": {"steps": 8, "lr": 0.1}, "model": {"canvas": 64}})
    run = client.get_run(ref.run_id)
    assert run.data.params == {"train.steps": "4", "train.lr": "0.1", "model.canvas": "64"}
    assert run.data.tags["resumed.train.steps"] == "8"

    with attached_run(ref, system_metrics=False) as attached:
        log_metrics(attached, ref, {"loss": 2.0, "lr": 0.1}, step=1)
        log_metrics(attached, ref, {"loss": 1.0, "lr": 0.1}, step=2)
        assert mlflow.active_run().info.run_id == ref.run_id
    assert [m.value for m in client.get_metric_history(ref.run_id, "loss")] == [2.0, 1.0]
    assert client.get_run(ref.run_id).info.status == "FINISHED"
    end_run(ref, status="FAILED")
    assert client.get_run(ref.run_id).info.status == "FAILED"


def test_a_run_missing_from_the_store_is_replaced(store):
    root, uri = store
    ref = open_or_create_run(
        tracking_uri=uri, experiment="exp", run_name="r", project_root=root, run_id="0" * 32
    )
    assert ref.run_id != "0" * 32
    assert MlflowClient(uri).get_run(ref.run_id).info.run_name == "r"


def test_the_experiment_is_marked_as_a_training_one(store):
    root, uri = store
    client = MlflowClient(uri)
    ref = open_or_create_run(tracking_uri=uri, experiment="kind", run_name="r", project_root=root)
    assert client.get_experiment(ref.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND

    older = client.create_experiment("made-before-the-mark")  # an experiment of an older run
    open_or_create_run(
        tracking_uri=uri, experiment="made-before-the-mark", run_name="r", project_root=root
    )
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND

    resumed = client.create_experiment("resumed")
    old_run = client.create_run(resumed).info.run_id
    open_or_create_run(
        tracking_uri=uri, experiment="resumed", run_name="r", project_root=root, run_id=old_run
    )
    assert client.get_experiment(resumed).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND

    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    open_or_create_run(tracking_uri=uri, experiment="chosen", run_name="r", project_root=root)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def _git(directory: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_git_commit_is_the_runs_source(store, tmp_path):
    _, uri = store
    (tmp_path / "params.yaml").write_text("train: {}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-q", "-m", "one")
    ref = open_or_create_run(
        tracking_uri=uri, experiment="git", run_name="r", project_root=tmp_path
    )
    tags = MlflowClient(uri).get_run(ref.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]


def test_no_git_checkout_or_no_git_gives_no_commit_and_no_error(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None  # pytest's tmp_path is outside any repository
    assert MLFLOW_GIT_COMMIT not in source_tags(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert git_commit(Path(__file__).parent) is None
    assert source_tags(tmp_path, entry_point="stages/train.py") == {
        "mlflow.source.name": "stages/train.py",
        "mlflow.source.type": "LOCAL",
    }


def _manifest(split: str, images: int) -> dict:
    return {
        "format_version": 1,
        "split": split,
        "canvas": 64,
        "annotation_sha256": f"{split}-sha",
        "categories": [{"id": 1, "name": "circle", "label": 1}],
        "counts": {"images": images, "instances": 3 * images, "shards": 1, "bytes_written": 99},
        "shards": [{"file": "part-00000.parquet", "rows": images, "bytes": 99}],
    }


def test_train_and_val_shards_are_the_runs_dataset_inputs(store, tmp_path):
    root, uri = store
    shards = tmp_path / "shards"
    (shards / "val").mkdir(parents=True)
    (shards / "val" / "manifest.json").write_text(json.dumps(_manifest("val", 2)))
    train_manifest = _manifest("train", 4)
    inputs = shard_inputs(shards, known={"train": train_manifest})
    assert [(i.name, i.context) for i in inputs] == [
        ("shards/train", "training"),
        ("shards/val", "validation"),
    ]
    ref = open_or_create_run(tracking_uri=uri, experiment="data", run_name="r", project_root=root)
    client = MlflowClient(uri)
    log_shard_inputs(client, ref.run_id, inputs)
    log_shard_inputs(client, ref.run_id, inputs)  # a resumed run logs them again

    logged = client.get_run(ref.run_id).inputs.dataset_inputs
    assert len(logged) == 2
    train = next(i for i in logged if i.dataset.name == "shards/train")
    assert train.dataset.digest == manifest_digest(train_manifest)
    assert json.loads(train.dataset.source) == {"uri": str(shards / "train")}
    assert train.dataset.source_type == "local"
    assert json.loads(train.dataset.profile)["images"] == 4
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training"}
    changed = {**train_manifest, "annotation_sha256": "other"}
    assert manifest_digest(changed) != manifest_digest(train_manifest)

    assert [i.name for i in shard_inputs(tmp_path / "none")] == []  # no splits built yet

    text = version_description(client, ref.run_id, segm_ap=0.5, bbox_ap=0.25, decision="first")
    assert "**segm AP** 0.5000, **bbox AP** 0.2500" in text
    assert f"`r` (`{ref.run_id}`)" in text
    assert f"`shards/train` (training) digest `{manifest_digest(train_manifest)}`" in text
    assert "parent version" not in text
    client.set_tag(ref.run_id, "parent_model_version", "3")
    text = version_description(client, ref.run_id, segm_ap=0.5, bbox_ap=0.25, decision="first")
    assert "- **parent version** 3" in text
