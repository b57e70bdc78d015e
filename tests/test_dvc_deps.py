"""dvc.yaml's dependencies cover what each stage runs, so a code change re-runs the stage.

Each stage's import closure (our own modules, followed from ``stages/<name>.py``) must lie
under one of its ``deps``; the register stage also ships the whole ``maskrcnn`` and
``pipeline`` packages as the pyfunc's code paths, so it depends on both folders entirely.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OURS = ("maskrcnn", "pipeline", "stages")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in OURS}


def import_closure(entry: Path) -> set[Path]:
    """Every file of ours that running ``entry`` imports (parent packages included)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported(path):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:i]))
                if found and found not in seen:
                    todo.append(found)
    return seen


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_import_closure(name: str):
    stage = STAGES[name]
    entry = re.search(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
    deps = [d for d in stage["deps"] if not d.startswith("${")]
    closure = import_closure(ROOT / "stages" / f"{entry}.py")
    assert len(closure) > 3  # the walk really followed the imports
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure if not _covered(p, deps))
    assert missing == [], f"dvc.yaml stage {name} imports these without depending on them"


def test_register_depends_on_the_code_it_ships():
    assert {"maskrcnn", "pipeline"} <= set(STAGES["register"]["deps"])
