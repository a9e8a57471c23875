"""One taxonomy: a module's folder, its registry family and its catalog section agree; no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import attnzoo
from attnzoo.catalog import CATALOG, FAMILY_FOLDERS, FAMILY_TITLES
from attnzoo.registry import FAMILIES, get_spec

PACKAGE = Path(attnzoo.__file__).resolve().parent
NAMES = attnzoo.list_modules()


def test_the_catalog_sections_are_the_families():
    assert tuple(FAMILY_TITLES) == tuple(FAMILY_FOLDERS) == FAMILIES
    assert {entry.family for entry in CATALOG} <= set(FAMILIES)
    names = [entry.name for entry in CATALOG]
    assert len(names) == len(set(names)), "a name listed twice in the catalog"


@pytest.mark.parametrize("name", NAMES)
def test_folder_follows_from_family(name):
    spec = get_spec(name)
    folder = FAMILY_FOLDERS[spec.family]
    assert spec.cls.__module__.startswith(f"attnzoo.{folder}."), (
        f"{name}: family {spec.family!r} lives in attnzoo/{folder}/, but {spec.cls.__module__} does not"
    )


@pytest.mark.parametrize("name", NAMES)
def test_catalog_lists_it_under_its_family(name):
    entries = [entry for entry in CATALOG if entry.name == name]
    assert entries, f"{name}: registered but not in src/attnzoo/catalog.py"
    assert entries[0].family == get_spec(name).family, (
        f"{name}: registered as {get_spec(name).family!r}, catalogued under {entries[0].family!r}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_input_layout_follows_from_family(name):
    """Sequence (and graph) modules take channels-last inputs, vision modules channels-first maps."""
    spec = get_spec(name)
    first = spec.example_inputs()[0]
    width = spec.default_sizes.width
    if FAMILY_FOLDERS[spec.family] == "vision":
        assert spec.channel_dim == 1 and spec.batch_dim == 0
        assert first.dim() >= 3 and first.shape[1] == width, f"{name}: want (B, C, ...), got {first.shape}"
    elif spec.family == "sequence":
        assert spec.channel_dim == -1 and spec.batch_dim == 0
        assert first.dim() == 3 and first.shape[-1] == width, f"{name}: expected (B, N, D), got {first.shape}"
    else:  # graph: node features (num_nodes, D), no batch dimension
        assert spec.channel_dim == -1 and spec.batch_dim is None
        assert first.dim() == 2 and first.shape[-1] == width, f"{name}: expected (N, D), got {first.shape}"


@pytest.mark.parametrize("folder", sorted(set(FAMILY_FOLDERS.values())))
def test_mechanism_folders_hold_mechanisms(folder):
    """A public file in a mechanism folder registers something; shared kernels go to functional/."""
    registered_modules = {get_spec(name).cls.__module__ for name in NAMES}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = f"attnzoo.{folder}.{path.stem}"
        assert module in registered_modules, (
            f"{module} registers no mechanism: shared kernels belong in attnzoo/functional/, "
            f"private helpers in a file whose name starts with '_'"
        )


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time (top-level statements only)."""
    paths = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    # `from attnzoo import models` imports the submodule attnzoo.models
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {dep for dep in found if dep in paths and dep != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[name]):
            if dep in path:
                return [*path[path.index(dep) :], dep]
            if dep not in done:
                cycle = visit(dep, [*path, dep])
                if cycle:
                    return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        if name not in done:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_the_package_importing_itself_back():
    # the shape of the old tangle: attnzoo -> attnzoo.models -> attnzoo.models.resnet -> attnzoo
    graph = {"a": {"a.m"}, "a.m": {"a.m.r"}, "a.m.r": {"a", "a.reg"}, "a.reg": set()}
    assert find_cycle(graph) == ["a", "a.m", "a.m.r", "a"]
    graph["a.m.r"] = {"a.reg"}
    assert find_cycle(graph) is None


def test_no_import_cycle():
    """No module imports, at import time, a module that (through others) imports it back.

    Modules that look mechanisms up by name (models.resnet, inspect.attach) import
    ``attnzoo.registry``, never the package itself.
    """
    graph = import_graph()
    assert "attnzoo.models" in graph["attnzoo"], "the package imports its models at import time"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"
