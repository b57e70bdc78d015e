"""dvc.yaml's copy of the output names agrees with pipeline.io.outputs, where the code reads them.

dvc.yaml cannot import Python, so it spells every name again; a rename on one side only would
leave DVC tracking a file that no stage writes (or a stage writing one that DVC never caches).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.io.outputs import STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
ARTIFACTS = "${data.artifacts_dir}"


def _paths(entries: list) -> list[str]:
    """The paths of a dvc.yaml list whose entries are a path or ``{path: {options}}``."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _names_under(paths: list[str], directory: str) -> set[str]:
    prefix = f"{ARTIFACTS}/{directory}/"
    return {p.removeprefix(prefix) for p in paths if p.startswith(prefix)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_declares_exactly_the_files_the_stage_writes(stage: str):
    outputs, spec = STAGES[stage], DVC["stages"][stage]
    declared = [p for key in ("outs", "metrics", "plots") for p in _paths(spec.get(key, []))]
    assert all(p.startswith(f"{ARTIFACTS}/{outputs.directory}/") for p in declared), declared
    assert _names_under(declared, outputs.directory) == set(outputs.names().values())
    assert f"--out {ARTIFACTS}/{outputs.directory}" in spec["cmd"]


def test_what_a_stage_reads_from_another_is_what_that_one_writes():
    for name, spec in DVC["stages"].items():
        for dep in _paths(spec["deps"]):
            match = re.fullmatch(re.escape(ARTIFACTS) + r"/(\w+)/(.+)", dep)
            if match:
                directory, file = match.groups()
                producer = next(o for o in STAGES.values() if o.directory == directory)
                assert file in producer.names().values(), f"stage {name} depends on {dep}"


def test_the_plots_section_names_written_files():
    for plot in DVC["plots"]:
        ((_, spec),) = plot.items()
        for path in spec["y"]:
            directory, file = path.removeprefix(f"{ARTIFACTS}/").split("/", 1)
            producer = next(o for o in STAGES.values() if o.directory == directory)
            assert file in producer.names().values(), path
