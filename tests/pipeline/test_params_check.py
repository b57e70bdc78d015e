"""Whole-file params validation: the declared keys follow the code, and bad files are named."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from maskrcnn.config import ModelConfig
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.check import SCHEMAS, SECTIONS
from pipeline.config.params import load_params
from pipeline.config.settings import (
    EvaluateSettings,
    PreprocessSettings,
    RegisterSettings,
    Section,
    ShapesSettings,
)
from pipeline.evaluation.evaluate import evaluate
from pipeline.registry.register import register
from pipeline.shards.preprocess import preprocess_split
from stages.check_params import main

ROOT = Path(__file__).resolve().parents[2]

# Each settings class that a stage splats into a function (``**settings.to_dict()``): the
# function, and the arguments that the stage supplies itself (or leaves to their default).
CONSUMERS = {
    ShapesSettings: (write_shapes_dataset, {"out_dir"}),
    PreprocessSettings: (
        preprocess_split,
        {"annotation_file", "images_dir", "out_dir", "model_config", "ray_address"},
    ),
    EvaluateSettings: (
        evaluate,
        {
            "model_path",
            "shards_dir",
            "annotation_file",
            "images_dir",
            "out_dir",
            "ray_address",
            "tracking_run",
            "tracking_step",
            "verbose",
        },
    ),
    RegisterSettings: (
        register,
        {"model_path", "eval_metrics", "run_info", "out_path", "categories"},
    ),
}


@pytest.mark.parametrize("settings", list(CONSUMERS), ids=lambda cls: cls.SECTION)
def test_settings_are_the_consumers_keyword_arguments(settings):
    """The keys, types and defaults a params section may set are the keyword arguments of
    the function its stage passes them to: a direct call and the stage behave alike."""
    function, supplied = CONSUMERS[settings]
    hints, declared = typing.get_type_hints(function), typing.get_type_hints(settings)
    parameters = inspect.signature(function).parameters
    assert {f.name for f in fields(settings)} == set(parameters) - supplied
    for field in fields(settings):
        assert declared[field.name] == hints[field.name], f"{settings.SECTION}.{field.name}"
        default = inspect.Parameter.empty if field.default is MISSING else field.default
        assert parameters[field.name].default == default, f"{settings.SECTION}.{field.name}"


def test_every_section_has_a_schema_that_its_stage_builds():
    assert tuple(SCHEMAS) == SECTIONS
    assert set(SECTIONS) == {
        "data", "shapes", "model", "preprocess", "train", "evaluate", "register", "tracking", "ray",
    }  # fmt: skip
    for name, schema in SCHEMAS.items():
        assert schema is ModelConfig or (issubclass(schema, Section) and name == schema.SECTION)


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
        ("train", "steps", "10", r"train\.steps must be an integer or null, got str '10'"),
        ("train", "use_gpu", "yes", r"train\.use_gpu must be true or false"),
        ("train", "milestones", [10, "x"], r"train\.milestones must be a list of integers"),
        ("train", "weights_path", 3, r"train\.weights_path must be a string or null"),
        ("train", "cpus_per_worker", "all", r"train\.cpus_per_worker must be a number or null"),
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
        ("shapes", "n_val", 1.5, r"shapes\.n_val must be an integer"),
        ("shapes", "object_scale", [0.1], r"shapes\.object_scale must be a list of 2 numbers"),
        (
            "shapes",
            "class_weights",
            {"star": "rare"},
            r"shapes\.class_weights must be a mapping of strings to numbers or null",
        ),
        ("preprocess", "progress", "no", r"preprocess\.progress must be true or false"),
        ("evaluate", "concurrency", 1.5, r"evaluate\.concurrency must be an integer or a string"),
        ("evaluate", "concurrency", True, r"evaluate\.concurrency must be an integer or a string"),
        ("register", "tracking_uri", 5, r"register\.tracking_uri must be a string or null"),
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
    raw["shapes"]["object_scale"] = [0.05, 0.9]
    with pytest.raises(ValueError, match=r"invalid shapes section: .*object_scale"):
        load_params(write(tmp_path, raw))
    raw = project_params()
    raw["model"]["canvas"] = 100
    with pytest.raises(ValueError, match=r"params\.yaml: invalid model section: .*canvas"):
        load_params(write(tmp_path, raw))


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("shapes", "min_side", 8, "min_side <= max_side"),
        ("train", "cpus_per_worker", 0, "cpus_per_worker must be > 0 or null"),
        ("shapes", "crowd_fraction", 1.5, "crowd_fraction must be in"),
        ("preprocess", "image_format", "webp", "image_format must be one of"),
        ("preprocess", "jpeg_quality", 0, "jpeg_quality must be in 1..100"),
        ("preprocess", "rows_per_shard", 0, "rows_per_shard must be >= 1"),
        ("evaluate", "batch_size", 0, "batch_size must be >= 1"),
        ("evaluate", "concurrency", 0, "concurrency must be an integer >= 1"),
        ("evaluate", "concurrency", "many", 'integer >= 1, "auto" or "local", got \'many\''),
        ("evaluate", "amp", "fp8", "amp must be one of"),
        ("evaluate", "score_threshold", 2.0, "score_threshold must be in"),
        ("register", "min_segm_ap", 1.5, "min_segm_ap must be in"),
        ("tracking", "experiment", "", "experiment must be a non-empty name"),
    ],
)
def test_stage_settings_refuse_out_of_range_values_up_front(tmp_path, section, key, value, named):
    raw = project_params()
    raw[section][key] = value
    with pytest.raises(ValueError, match=rf"params\.yaml: invalid {section} section: .*{named}"):
        load_params(write(tmp_path, raw))


def test_concurrency_is_a_count_auto_or_local(tmp_path):
    for value in ("auto", "local", 1, 3):
        raw = project_params()
        raw["evaluate"]["concurrency"] = value
        assert load_params(write(tmp_path, raw)).settings(EvaluateSettings).concurrency == value
    assert EvaluateSettings().concurrency == "auto"


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
    assert "error: " in captured.err and "train.stpes" in captured.err
