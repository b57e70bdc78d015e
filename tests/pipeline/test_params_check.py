"""Whole-file params validation: the declared keys follow the code, and bad files are named."""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.check import SECTION_KEYS, SECTIONS
from pipeline.config.params import load_params
from pipeline.evaluation.evaluate import evaluate
from pipeline.registry.register import register
from pipeline.registry.tracking import TrackingSettings
from pipeline.shards.preprocess import preprocess_split
from stages.check_params import main

ROOT = Path(__file__).resolve().parents[2]

# Each function-backed section: the function its stage passes it to, and the arguments that the
# stage supplies itself (never from the section).
CONSUMERS = {
    "shapes": (write_shapes_dataset, {"out_dir"}),
    "preprocess": (
        preprocess_split,
        {"annotation_file", "images_dir", "out_dir", "model_config", "ray_address"},
    ),
    "evaluate": (
        evaluate,
        {
            "model_path",
            "shards_dir",
            "annotation_file",
            "images_dir",
            "out_dir",
            "ray_address",
            "tracking_run",
        },
    ),
    "register": (
        register,
        {"model_path", "eval_metrics", "run_info", "out_path", "categories"},
    ),
}


@pytest.mark.parametrize("section", sorted(CONSUMERS))
def test_declared_keys_are_the_consumers_arguments(section):
    function, supplied = CONSUMERS[section]
    hints = typing.get_type_hints(function)
    arguments = {n for n in inspect.signature(function).parameters if n not in supplied}
    assert set(SECTION_KEYS[section]) == arguments
    for key, kind in SECTION_KEYS[section].items():
        assert kind == hints[key], f"{section}.{key}"


def test_tracking_keys_are_the_settings_fields():
    hints = typing.get_type_hints(TrackingSettings)
    assert SECTION_KEYS["tracking"] == {f.name: hints[f.name] for f in fields(TrackingSettings)}


def test_every_section_has_a_schema():
    assert set(SECTIONS) == {*SECTION_KEYS, "model", "train"}


def test_project_params_are_a_complete_valid_file():
    load_params(ROOT / "params.yaml", complete=True)


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("train", "stpes", 10, r"unknown key train\.stpes \(did you mean train\.steps\?\)"),
        ("train", "steps", "10", r"train\.steps must be an integer, got str '10'"),
        ("train", "use_gpu", "yes", r"train\.use_gpu must be true or false"),
        ("train", "milestones", [10, "x"], r"train\.milestones must be a list of integers"),
        ("train", "weights_path", 3, r"train\.weights_path must be a string or null"),
        ("model", "canvas", 256.0, r"model\.canvas must be an integer"),
        ("model", "rpn", {"nms_thresh": "high"}, r"model\.rpn\.nms_thresh must be a number"),
        ("model", "roi", {"mask_layer": [8]}, r"unknown key model\.roi\.mask_layer"),
        ("model", "image_mean", [0.5, 0.5], r"model\.image_mean must be a list of 3 numbers"),
        ("model", "num_classes", 3, r"unknown key model\.num_classes"),
        ("evaluate", "batchsize", 8, r"unknown key evaluate\.batchsize"),
        ("register", "min_segm_ap", "high", r"register\.min_segm_ap must be a number"),
        ("tracking", "url", "x", r"unknown key tracking\.url"),
        ("ray", "address", 6379, r"ray\.address must be a string or null"),
        ("data", "shards_dir", ["a"], r"data\.shards_dir must be a string"),
    ],
)
def test_a_bad_key_is_named_with_the_file(tmp_path, section, key, value, named):
    raw = project_params()
    raw[section][key] = value
    with pytest.raises(ValueError, match=rf"params\.yaml: .*{named}"):
        load_params(write(tmp_path, raw))


def test_an_out_of_range_value_is_named(tmp_path):
    raw = project_params()
    raw["train"]["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"params\.yaml: invalid train section: .*momentum"):
        load_params(write(tmp_path, raw))
    raw = project_params()
    raw["model"]["canvas"] = 100
    with pytest.raises(ValueError, match=r"params\.yaml: invalid model section: .*canvas"):
        load_params(write(tmp_path, raw))


def test_yaml_exponent_without_a_dot_is_explained(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  base_lr: 2e-2\n")
    with pytest.raises(ValueError, match=r"train\.base_lr must be a number.*1\.0e-4"):
        load_params(tmp_path / "params.yaml")


def test_a_section_that_is_not_a_mapping_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        load_params(tmp_path / "params.yaml")


def test_partial_files_load_but_a_complete_one_needs_every_section_and_key(tmp_path):
    raw = project_params()
    del raw["register"]
    path = write(tmp_path, raw)
    load_params(path)  # a stage reads the sections it needs and names a missing one then
    with pytest.raises(ValueError, match=r"params\.yaml: missing sections \['register'\]"):
        load_params(path, complete=True)
    raw = project_params()
    del raw["data"]["val_images"], raw["register"]["model_name"]
    with pytest.raises(ValueError, match=r"data\.val_images must be set"):
        load_params(write(tmp_path, raw), complete=True)
    raw = project_params()
    del raw["register"]["model_name"]
    with pytest.raises(ValueError, match=r"register\.model_name must be set"):
        load_params(write(tmp_path, raw), complete=True)


def test_command_line_checks_files(tmp_path, capsys):
    raw = project_params()
    raw["train"]["stpes"] = 1
    bad = write(tmp_path, raw)
    assert main([str(ROOT / "params.yaml")]) == 0
    assert main([str(ROOT / "params.yaml"), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "params.yaml: ok" in captured.out
    assert "train.stpes" in captured.err
