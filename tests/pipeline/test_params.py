from pathlib import Path

import pytest

from pipeline.config.params import load_params, model_config

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_give_a_valid_model_config():
    params = load_params(ROOT / "params.yaml")
    config = model_config(params, num_classes=6)
    assert config.num_classes == 6
    assert config.canvas == params.section("model")["canvas"]
    assert config.anchors.sizes == tuple(params.section("model")["anchors"]["sizes"])


def test_relative_paths_resolve_against_the_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  shards_dir: out/shards\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.data_path("shards_dir") == str(tmp_path / "out" / "shards")
    assert params.path("s3://bucket/shards") == "s3://bucket/shards"
    assert params.path("/abs/dir") == "/abs/dir"


def test_unknown_section_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("trian:\n  steps: 3\n")
    with pytest.raises(ValueError, match="trian"):
        load_params(tmp_path / "params.yaml")


def test_bad_model_key_names_the_file_and_key(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  canvas: 256\n  backbone_name: resnet18\n")
    with pytest.raises(ValueError, match=r"params.yaml.*backbone_name"):
        model_config(load_params(tmp_path / "params.yaml"), num_classes=3)


def test_invalid_yaml_and_missing_file_are_clear(tmp_path):
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_missing_data_key_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("data: {}\n")
    with pytest.raises(ValueError, match="data.shards_dir"):
        load_params(tmp_path / "params.yaml").data_path("shards_dir")
