"""The house rules of the layout: sub-packages by responsibility, imports one way, small files.

``LAYERS`` is the order of ``pipeline/``'s sub-packages: a module may import from its own
sub-package and from those listed before it, never from one after it. ``stages`` sits above
all of them and ``maskrcnn`` below; ``maskrcnn`` imports nothing of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["config", "io", "coco", "shards", "inference", "registry", "training", "evaluation"]
MAX_LINES = 400


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, line) of every ``import x`` / ``from x import y``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((base, node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_pipeline_has_only_sub_packages():
    loose = [p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    packages = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(LAYERS)
    for name in packages:
        doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / name / "__init__.py").read_text()))
        assert doc, f"pipeline/{name}/__init__.py needs a docstring saying what it owns"


@pytest.mark.parametrize("path", _modules("pipeline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_imports_flow_one_way(path: Path):
    here = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
    for module, line in _imports(path):
        assert not module.startswith("stages"), f"{path}:{line} imports {module}"
        there = _layer(module)
        if here is not None and there is not None:
            assert there <= here, (
                f"{path.relative_to(ROOT)}:{line}: pipeline.{LAYERS[here]} imports {module}, "
                f"a layer above it (order: {' < '.join(LAYERS)})"
            )


@pytest.mark.parametrize("package", ["pipeline", "stages"])
def test_no_function_level_imports_of_our_code(package: str):
    late = []
    for path in _modules(package):
        top = {line for _, line in _imports(path, top_level_only=True)}
        late += [
            f"{path.relative_to(ROOT)}:{line} {module}"
            for module, line in _imports(path)
            if line not in top and module.split(".")[0] in ("pipeline", "maskrcnn", "stages")
        ]
    assert late == []


def test_model_library_imports_nothing_of_the_pipeline():
    for path in _modules("maskrcnn"):
        for module, line in _imports(path):
            top = module.split(".")[0]
            assert top not in ("pipeline", "stages", "ray", "mlflow", "dvc"), f"{path}:{line}"


@pytest.mark.parametrize("package", ["maskrcnn", "pipeline", "stages"])
def test_no_file_over_the_size_limit(package: str):
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
