"""The import graph of `disttrain` and `launch`: no cycle, and no import against the layers.

Read from the source (every `import`, at module level or inside a function), so
it needs no TensorFlow and runs in well under a second. The layers are the ones
docs/architecture.md describes; a module may import its own unit and the units of
its layer or of the layers below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGES = ("disttrain", "launch")
LAYERS: tuple[tuple[str, ...], ...] = (
    ("disttrain.errors", "disttrain._tf", "disttrain.report.run_files"),
    ("disttrain.cluster", "disttrain.report.step_timing"),
    ("disttrain.storage", "disttrain.coordination", "disttrain.resume"),
    ("disttrain.keras_compat", "disttrain.report"),
    ("disttrain.distribute",),
    ("disttrain.callbacks",),
    ("disttrain", "disttrain.sidecar", "disttrain.demo", "disttrain.testing", "disttrain.check"),
    ("launch",),
)
"""Units (a subpackage, a top-level module, a module of a subpackage whose other modules sit
higher, or `launch` whole), bottom layer first; a module belongs to its longest unit."""
EXCEPTIONS: dict[tuple[str, str], str] = {}
"""Imports against the layers that stay for now: (importer, imported) → why."""


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _import_nodes(child))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports (a name imported from a
    package counts as its submodule when it is one, else as the package)."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in modules else known(base))
    # Importing a submodule runs its packages' __init__; that is not an edge.
    return {m for m in found if m is not None and m != name and not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str) -> str:
    units = [unit for layer in LAYERS for unit in layer
             if module == unit or module.startswith(unit + ".")]
    assert units, f"{module} belongs to no unit of LAYERS: declare its layer"
    return max(units, key=len)


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_module_imports_a_module_that_imports_it_back():
    assert _cycles(_graph()) == []


def test_no_unit_imports_a_unit_that_imports_it_back():
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        units.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycles(units) == []


def test_no_import_against_the_layers():
    upward = sorted(
        (module, target) for module, targets in _graph().items() for target in targets
        if _layer(_unit(target)) > _layer(_unit(module)))
    assert [edge for edge in upward if edge not in EXCEPTIONS] == [], (
        "imports from a lower layer to a higher one (see LAYERS and docs/architecture.md)")
    assert sorted(EXCEPTIONS) == [edge for edge in upward if edge in EXCEPTIONS], (
        "an exception no longer happens: remove it from EXCEPTIONS")


def test_the_graph_sees_lazy_imports_and_cycles():
    """The reader finds imports inside functions, relative imports, and a cycle."""
    modules = _modules()
    assert "disttrain.coordination" in _imports(
        "disttrain.keras_compat.preflight", modules["disttrain.keras_compat.preflight"], modules)
    assert "disttrain.coordination.coordination_service" in _imports(
        "disttrain.coordination.coordinator",
        modules["disttrain.coordination.coordinator"], modules)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
