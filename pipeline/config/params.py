"""params.yaml: loading, path resolution and validation of the shared sections.

Each stage reads only its own section (and the shared ones) so that DVC re-runs exactly the
stages whose parameters changed. Paths in params.yaml are relative to the project root (the
directory holding params.yaml) unless absolute or a URI (``s3://…``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from maskrcnn.config import ModelConfig
from pipeline.config.check import check_sections
from pipeline.config.settings import RaySettings, Section

_S = TypeVar("_S", bound=Section)


@dataclass(frozen=True)
class Params:
    """The parsed params file and the directory its relative paths are relative to."""

    raw: dict[str, Any]
    root: Path
    source: Path

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.raw:
            raise ValueError(f"{self.source}: missing section {name!r}")
        return dict(self.raw[name] or {})

    def settings(self, cls: type[_S]) -> _S:
        """The typed settings of section ``cls.SECTION`` (already checked by ``load_params``)."""
        section = self.section(cls.SECTION)
        try:
            return cls.from_dict(section)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.source}: invalid {cls.SECTION} section: {exc}") from exc

    def path(self, value: str | None) -> str | None:
        """Resolve a path from params against the project root; URIs pass through unchanged."""
        if value is None or "://" in str(value):
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (self.root / p).resolve())

    def data_path(self, key: str) -> str:
        value = self.section("data").get(key)
        if not value:
            raise ValueError(f"{self.source}: data.{key} is not set")
        return str(self.path(value))

    @property
    def ray_address(self) -> str | None:
        """``ray.address``; a file without a ``ray:`` section uses a local Ray."""
        return RaySettings.from_dict(self.raw.get("ray")).address or None


def load_params(path: str | Path = "params.yaml", *, complete: bool = False) -> Params:
    """Read and check params.yaml: unknown sections and keys, wrong types and out-of-range
    values are a ValueError naming the file and the key (``pipeline.config.check``), before
    any stage starts work. ``complete``: also require every section, as a full recipe must."""
    source = Path(path).resolve()
    if not source.exists():
        raise FileNotFoundError(f"params file not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    check_sections(raw, source, complete=complete)
    return Params(raw=raw, root=source.parent, source=source)


def model_config(params: Params, *, num_classes: int) -> ModelConfig:
    """The model section as a ModelConfig; the class count comes from the data (shards)."""
    section = params.section("model")
    try:
        return ModelConfig.from_dict({**section, "num_classes": num_classes})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{params.source}: invalid model section: {exc}") from exc


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for every stage: time, level, where, message."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
