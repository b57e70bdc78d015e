"""Storage locations: local paths, file:// URIs and fsspec-only protocols behave alike."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.io import storage


def test_a_path_and_its_file_uri_name_the_same_file(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    storage.write_bytes(target.as_uri(), b'{"images": 3}')
    assert storage.read_json(target) == {"images": 3}
    for location in (target, target.as_uri()):
        fs, path = storage.filesystem(location)
        assert isinstance(fs, pafs.LocalFileSystem) and path == str(target)
    assert storage.exists(target.as_uri()) and not storage.exists(tmp_path / "missing.json")
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]  # no temporary left


def test_join_and_absolute_keep_uris_and_anchor_paths(tmp_path):
    assert storage.join("s3://bucket/shards/", "train", "part-00000.parquet") == (
        "s3://bucket/shards/train/part-00000.parquet"
    )
    assert storage.join(tmp_path, "train") == str(tmp_path / "train")
    assert storage.absolute("gs://bucket/run/") == "gs://bucket/run"
    assert storage.absolute("data/shards", root=tmp_path) == str(tmp_path / "data" / "shards")
    assert storage.is_uri("file:///data") and not storage.is_uri("C:\\data")


def test_an_fsspec_protocol_serves_pyarrow_and_parquet():
    location = "memory://storage-test/train"
    storage.write_bytes(storage.join(location, "manifest.json"), b'{"shards": 1}')
    assert storage.read_json(f"{location}/manifest.json") == {"shards": 1}
    fs, path = storage.filesystem(f"{location}/part-00000.parquet")
    table = pa.table({"image_id": [1, 2, 3]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_upload_dir_writes_the_manifest_last(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for name in ("manifest.json", "part-00001.parquet", "part-00000.parquet"):
        (local / name).write_bytes(name.encode())
    destination = (tmp_path / "shared" / "train").as_uri()
    written = storage.upload_dir(local, destination, last=["manifest.json"])
    assert [w.rsplit("/", 1)[1] for w in written] == [
        "part-00000.parquet", "part-00001.parquet", "manifest.json",
    ]  # fmt: skip
    assert all(storage.read_bytes(w) == w.rsplit("/", 1)[1].encode() for w in written)


def test_unknown_protocols_and_missing_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="nosuch://"):
        storage.filesystem("nosuch://bucket/x")
    with pytest.raises(ValueError, match="no such file"):
        storage.read_bytes((tmp_path / "absent.json").as_uri())


def test_uri_detection_and_joins_at_the_edges(tmp_path):
    assert storage.is_uri("memory://x") and storage.is_uri("s3://bucket")
    assert not storage.is_uri("data/shards") and not storage.is_uri("s3:bucket/x")
    assert storage.join("memory://b/", "/train/", "part-00000.parquet") == (
        "memory://b/train/part-00000.parquet"
    )
    assert storage.join("data/shards", "train") == "data/shards/train"
    assert storage.absolute("~/shards") == str(Path.home() / "shards")
    assert storage.absolute(tmp_path, root=Path("/elsewhere")) == str(tmp_path)


def test_locate_gives_a_path_for_local_storage_and_the_uri_otherwise(tmp_path):
    assert storage.locate("data/shards") == Path("data/shards")
    spaced = tmp_path / "with space"
    assert storage.locate(spaced.as_uri()) == spaced  # %20 decoded: the real directory
    assert storage.locate("s3://bucket/shards/") == "s3://bucket/shards"
    assert storage.locate("memory://b/x") == "memory://b/x"


def test_read_under_takes_the_file_name_literally(tmp_path):
    for name in ("a b.png", "odd#%20name.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
        assert storage.read_under(tmp_path.as_uri(), name) == name.encode()
        assert storage.read_under(f"local://{tmp_path}", name) == name.encode()
    with pytest.raises(FileNotFoundError, match=r"missing\.png: no such file"):
        storage.read_under(f"local://{tmp_path}", "missing.png")


def test_a_missing_file_is_both_file_not_found_and_bad_input(tmp_path):
    with pytest.raises(storage.NotFound) as error:
        storage.read_bytes(f"local://{tmp_path}/absent.json")
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)
