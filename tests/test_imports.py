"""The package's import structure, read from the source: no import cycles between modules (imports inside
functions count: deferring an import hides a cycle, it does not remove it), and the layers point downward."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cvlab

ROOT = Path(cvlab.__file__).parent

# Each layer may import only the layers after it (DESIGN.md: cli -> run -> engine -> tasks -> models -> layers/ops;
# data, losses and metrics beside models; utils is the ground).
LAYERS = [
    {"cli"}, {"run"}, {"engine"}, {"callbacks"}, {"tasks"}, {"models"}, {"losses", "metrics"}, {"data"},
    {"layers", "ops"}, {"utils", "conf"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The cvlab modules ``name`` imports anywhere in its source (a ``from package import module`` names the module)."""
    tree = ast.parse(MODULES[name].read_text())
    is_package = MODULES[name].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    # Importing a module always imports its parent packages first: an edge to one's own package is no cycle.
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name and m not in own_packages}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(GRAPH[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read():
    assert "cvlab.engine" in GRAPH["cvlab.run.train"]
    assert "cvlab.engine.training" in GRAPH["cvlab.engine"]
    assert "cvlab.models._registry" in GRAPH["cvlab.models"]


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, " -> ".join(cycle)


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    return next((i for i, layer in enumerate(LAYERS) if top in layer), -1)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer_of(n) >= 0))
def test_imports_point_downward(name):
    upward = sorted(m for m in GRAPH[name] if 0 <= layer_of(m) < layer_of(name))
    assert not upward, f"{name} imports a higher layer: {upward}"


def test_commands_are_thin_leaves_over_the_engine():
    for name in (n for n in GRAPH if n.startswith("cvlab.run.")):
        others = sorted(m for m in GRAPH[name] if not m.startswith(("cvlab.engine", "cvlab.utils")))
        assert not others, f"{name} imports {others}; commands import only cvlab.engine and cvlab.utils"
