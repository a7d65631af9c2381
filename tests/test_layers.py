"""The package's imports point one way: from a layer to its own or a lower one, with no
circle. Read from the source with ``ast`` (nothing is imported), counting imports inside
functions and ``if TYPE_CHECKING:`` blocks and module names written as strings (the
way ``importlib.import_module`` is handed them), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pytest_specdec"

#: Lowest first; a module may import from its own layer or a lower one. The longest
#: matching prefix names a module's layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("pytest_specdec", "pytest_specdec.atomic")),
    ("protocol", ("pytest_specdec.protocol",)),
    ("engine", ("pytest_specdec.engine",)),
    ("models", ("pytest_specdec.models",)),
    ("drafters", ("pytest_specdec.drafters",)),
    ("bench", ("pytest_specdec.bench",)),
    ("training", ("pytest_specdec.training",)),
    ("reporting", ("pytest_specdec.reporting",)),
    ("plugin", ("pytest_specdec.plugin", "pytest_specdec.cli")),
    # the old public paths: re-exports that nothing inside the package may use
    ("compat", ("pytest_specdec.drafter", "pytest_specdec.drafting", "pytest_specdec.hybrid",
                "pytest_specdec.peer", "pytest_specdec.models.training")),
)

#: Where each installed package's source lies in the repository (pyproject's package-dir).
SOURCES = {PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.drafters": ROOT / "drafters"}

MODULE_STRING = re.compile(rf"^{PACKAGE}(?:\.\w+)+")


def module_files() -> dict[str, Path]:
    files = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def layer_of(module: str) -> int:
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an imported name stands for (a submodule when it is one,
    else the longest module prefix), or None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every package module ``module`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []

    def add(line: int, name: str) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            found.append((line, target))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # "from pkg import mod" imports the submodule when there is one
                full = f"{base}.{alias.name}"
                add(node.lineno, full if full in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # a module written as a string; a package's bare name is not counted (the
            # drafters package's is also the entry-point group's)
            name = node.value.split(":")[0]
            if MODULE_STRING.fullmatch(name) and name in modules \
                    and modules[name].name != "__init__.py":
                add(node.lineno, name)
    return sorted(set(found))


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    modules = module_files()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def _cycles(edges: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for _, other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for name in module_files():
        layer_of(name)


def test_no_import_points_up():
    modules, edges = graph()
    upward = []
    for name, found in sorted(edges.items()):
        for line, target in found:
            if layer_of(target) > layer_of(name):
                upward.append(f"{modules[name].relative_to(ROOT)}:{line}: {name} "
                              f"({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]}), a higher layer")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    modules, edges = graph()
    lines = []
    for component in _cycles(edges):
        members = set(component)
        lines.append("circle: " + ", ".join(component))
        for name in component:
            for line, target in edges[name]:
                if target in members:
                    lines.append(f"  {modules[name].relative_to(ROOT)}:{line}: {name} -> {target}")
    assert not lines, "\n".join(lines)


@pytest.mark.parametrize("source, expected", [
    ("from pytest_specdec.bench import session\n", "pytest_specdec.bench.session"),
    ("def f():\n    import pytest_specdec.reporting.html\n", "pytest_specdec.reporting.html"),
    ("KIND = 'pytest_specdec.training.loop'\n", "pytest_specdec.training.loop"),
    ("from ..reporting import compare\n", "pytest_specdec.reporting.compare"),
])
def test_the_reader_sees_every_kind_of_import(tmp_path, source, expected):
    """The checks above are only as good as this reader: a plain, a lazy, a string and a
    relative import are all seen (here from a module of the engine layer)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    modules = module_files()
    modules["pytest_specdec.engine.probe"] = path
    found = [target for _, target in imports_of("pytest_specdec.engine.probe", path, modules)]
    assert found == [expected]
    assert layer_of(expected) > layer_of("pytest_specdec.engine.probe")


def test_a_circle_is_named():
    edges = {"a": [(1, "b")], "b": [(2, "c")], "c": [(3, "a")], "d": [(4, "a")]}
    assert _cycles(edges) == [["a", "b", "c"]]
