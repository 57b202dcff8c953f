"""The package's layering, read from its source: every import statement, function-level ones included.

runtime/ is what the app runs, maintainer/ the maintainer step, tools/ the measuring tools, and the modules at the top of
quantize/ shared leaves. The runtime imports neither the maintainer step nor the tools; the maintainer step does not import the tools;
the leaves import only leaves; and no module reaches itself through its imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantize"
COMMANDS = {
    "quantize.__main__",
    "quantize.bench",
}  # `python -m` entry points: one import each, of their command


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in it (a package's name when it imports the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != "quantize":
                found.add(name)
    return found


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def layer(name: str) -> str:
    if name in COMMANDS:
        return "command"
    parts = name.split(".")
    return (
        parts[1]
        if len(parts) > 2 or name in ("quantize.runtime", "quantize.maintainer", "quantize.tools")
        else "leaf"
    )


def test_the_reader_sees_the_imports_it_checks():
    """Not vacuous: module-level and function-level imports both reach the graph."""
    assert (
        "quantize.runtime.decoders" in GRAPH["quantize.runtime.serving"]
    )  # from quantize.runtime import decoders
    assert "quantize.maintainer.recipe" in GRAPH["quantize.maintainer.blockwise"]
    assert {layer(n) for n in GRAPH} == {"command", "leaf", "runtime", "maintainer", "tools"}


@pytest.mark.parametrize(
    "lower, higher",
    [("runtime", {"maintainer", "tools", "command"}), ("maintainer", {"tools", "command"}),
     ("leaf", {"runtime", "maintainer", "tools", "command"})],
)  # fmt: skip
def test_no_layer_imports_a_layer_above_it(lower: str, higher: set[str]):
    wrong = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if layer(name) == lower
        for dep in deps
        if layer(dep) in higher
    )
    assert not wrong, wrong


def test_no_import_circles():
    """Depth-first search for a back edge; the circle found is printed."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                return path + [name, dep]
            if dep not in state and (circle := visit(dep, path + [name])):
                return circle
        state[name] = "done"
        return None

    for name in sorted(GRAPH):
        if name not in state:
            circle = visit(name, [])
            assert circle is None, " -> ".join(circle[circle.index(circle[-1]) :])


def code_strings(path: Path) -> list[str]:
    """The string constants of a module's code, its docstrings left out (prose may name an example)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
        and isinstance(node.body[0], ast.Expr)
    }  # fmt: skip
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_a_family_is_described_in_one_place():
    """The module names a family's row gives (its layers, embedding, final norm, positions) are written nowhere else
    in the package: the engine, the recipe, the block path, the reference and the bench read them from the row."""
    from quantize.families import FAMILIES

    names = {
        name
        for row in FAMILIES.values()
        for name in (row.layers, row.embed, row.final_norm, row.positions, row.embed_norm)
        if name
    }
    found = sorted(
        f"{module}: {text!r}"
        for module, path in MODULES.items()
        if module != "quantize.families"
        for text in code_strings(path)
        for name in names
        if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text)
    )
    assert len(names) > 10 and not found, found


LONGEST_FUNCTION = 50  # lines, decorators and docstring included: a function does one step


def test_no_function_runs_over_fifty_lines():
    """Every function of the package and of app.py, nested ones and methods included, fits one screen."""
    paths = [*MODULES.values(), PACKAGE.parent / "app.py"]
    long = sorted(
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    )
    assert not long, long
