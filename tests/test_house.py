"""The house rules that code review alone does not hold: layers import downward only (no import cycle, not even
through an import inside a function) and no function is longer than 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanoseek"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The nanoseek modules `path` imports, at any depth of its code ("from . import x" names module x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in modules and module != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_no_import_cycle_in_the_package():
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them: they may import each other
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and files[t].name == "__init__.py")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_over_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def _row_of(module: str) -> str | None:
    """The README architecture row a module belongs to: model files have their own, other packages one each."""
    parts = module.split(".")
    if len(parts) == 1 or module == "nanoseek.__main__" or module == "nanoseek.model":
        return None
    if parts[1] == "model":
        return f"nanoseek/model/{parts[2]}.py"
    path = PACKAGE / parts[1]
    return f"nanoseek/{parts[1]}/" if path.is_dir() else f"nanoseek/{parts[1]}.py"


def test_readme_architecture_table_matches_the_tree_in_layer_order():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## Architecture", 1)[1].split("\n\n## ", 1)[0]
    rows = [line.rsplit("|", 2)[-2].strip().strip("`") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| concept")]
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    expected = {row for module in files if (row := _row_of(module))} | {"bench/"}
    assert sorted(rows) == sorted(expected)
    position = {row: i for i, row in enumerate(rows)}
    for module, path in files.items():
        row = _row_of(module)
        for target in _imports(path, set(files)):
            above = _row_of(target)
            assert row is None or above is None or above == row or position[above] < position[row], \
                f"{module} imports {target}, whose row is below its own"
