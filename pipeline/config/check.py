"""Validation of a whole params file: every key known, of the expected type, every value in range.

Each stage reads only its own sections, so without this a typo elsewhere (``train.stpes``)
would surface only when that stage runs, perhaps an hour into a cluster job, or never (a
misspelt optional key silently keeps its default). And YAML reads ``1e-4`` as a string, which
would otherwise fail deep inside a stage with a message that names no key. ``load_params``
runs these checks on the sections a file has; ``complete=True`` also requires every section
and every key that has no default, as a full recipe (configs/) must.

Every section is checked against the class that consumes it (``ModelConfig``, and the settings
classes of ``pipeline.config.settings``): the keys are its fields, the types its annotations,
the required keys those without a default, and building it runs its range checks.

    python -m stages.check_params configs/coco_r50_fpn_1x.yaml
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from maskrcnn.config import ModelConfig
from pipeline.config.settings import (
    DataSettings,
    EvaluateSettings,
    PreprocessSettings,
    RaySettings,
    RegisterSettings,
    Section,
    ShapesSettings,
    TrackingSettings,
    TrainSettings,
)

# Each section of a params file and the class its stage builds from it.
SCHEMAS: dict[str, type] = {
    "data": DataSettings,
    "shapes": ShapesSettings,
    "model": ModelConfig,
    "preprocess": PreprocessSettings,
    "train": TrainSettings,
    "evaluate": EvaluateSettings,
    "register": RegisterSettings,
    "tracking": TrackingSettings,
    "ray": RaySettings,
}
SECTIONS = tuple(SCHEMAS)
# The class count comes from the data (the shards' categories), never from the params file;
# any valid count will do for checking the rest of the model section.
_CHECK_NUM_CLASSES = 2
_MODEL_SKIP = frozenset({"num_classes"})


def check_sections(raw: Mapping[str, Any], source: Path, *, complete: bool = False) -> None:
    """Check every section present in ``raw`` (a parsed params file); raise a ValueError that
    names ``source`` and the offending key. ``complete``: also require every section and key
    that a full pipeline run reads. Unknown sections are an error (likely a typo)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown sections {unknown}; known: {list(SECTIONS)}")
    if complete:
        missing = [name for name in SECTIONS if name not in raw]
        if missing:
            raise ValueError(f"{source}: missing sections {missing}; a full run reads {SECTIONS}")
    for name in SECTIONS:
        if name not in raw:
            continue
        section = raw[name] if raw[name] is not None else {}
        if not isinstance(section, Mapping):
            raise ValueError(
                f"{source}: section {name!r} must be a mapping of keys, "
                f"got {type(section).__name__} {section!r}"
            )
        _check_section(name, section, source, complete=complete)


def _check_section(name: str, section: Mapping[str, Any], source: Path, *, complete: bool) -> None:
    """Keys and types, then (complete) the required keys, then the class's own checks; a
    section that lacks a required key is not built (a stage names it when it reads it)."""
    schema = SCHEMAS[name]
    skip = _MODEL_SKIP if schema is ModelConfig else frozenset()
    _check_mapping(section, _dataclass_keys(schema, skip=skip), name, source)
    required = schema.required_keys() if issubclass(schema, Section) else ()
    absent = [key for key in required if section.get(key) is None]
    if absent and complete:
        keys = ", ".join(f"{name}.{key}" for key in absent)
        raise ValueError(f"{source}: {keys} must be set")
    if not absent:
        build = _model_config if schema is ModelConfig else schema.from_dict
        _build(name, source, build, section)


def _model_config(section: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict({**section, "num_classes": _CHECK_NUM_CLASSES})


def _dataclass_keys(cls: type, *, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.name not in skip}


def _check_mapping(data: Mapping[str, Any], keys: dict[str, Any], where: str, source: Path) -> None:
    for key, value in data.items():
        path = f"{where}.{key}"
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" (did you mean {where}.{close[0]}?)" if close else ""
            raise ValueError(
                f"{source}: unknown key {path}{hint}; known keys of {where}: {sorted(keys)}"
            )
        _check_value(value, keys[key], path, source)


def _check_value(value: Any, hint: Any, path: str, source: Path) -> None:
    if is_dataclass(hint):  # a nested section (model.rpn, ...); empty means all defaults
        if value is None:
            return
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: {path} must be a mapping of keys, got {value!r}")
        _check_mapping(value, _dataclass_keys(hint), path, source)
        return
    if not _matches(value, hint):
        raise ValueError(
            f"{source}: {path} must be {_describe(hint)}, got {type(value).__name__} {value!r}"
            + (" (YAML reads 1e-4 as a string: write 0.0001 or 1.0e-4)" if _numeric(value) else "")
        )


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, Mapping) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _matches(v, a) for v, a in zip(value, args, strict=True)
        )
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(arm) for arm in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint is type(None):
        return "null"
    if hint in names:
        return names[hint]
    if origin is dict:
        key, item = (_describe(a).split(" ", 1)[-1] for a in args)
        return f"a mapping of {key}s to {item}s"
    if origin is tuple:
        item = _describe(args[0]).split(" ", 1)[-1]  # "a number" -> "number"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {item}s"
        return f"a list of {len(args)} {item}s"
    return getattr(hint, "__name__", str(hint))


def _numeric(value: Any) -> bool:
    """A string that YAML left unparsed but that reads as a number (``1e-4``)."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _build(
    name: str, source: Path, build: Callable[[dict[str, Any]], object], section: Mapping[str, Any]
) -> None:
    """Construct the typed settings, for their range and cross-key checks."""
    try:
        build(dict(section))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid {name} section: {exc}") from exc
