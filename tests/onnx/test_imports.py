"""The import graph of camserve.onnx: no module imports another that imports it back, however
indirectly, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import camserve.onnx

PACKAGE = "camserve.onnx"
FOLDER = Path(camserve.onnx.__file__).parent


def imports_of(path: Path, module: str) -> set[str]:
    """The modules of :data:`PACKAGE` that ``module`` (the source at ``path``) imports, anywhere in
    it: ``import a.b``, ``from a import b``, ``from .b import c``, ``from . import b``."""
    found: set[str] = set()
    package = module.rpartition(".")[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(PACKAGE + ".") and _source(n) is not None)
    found.discard(module)
    return found


def _source(module: str) -> Path | None:
    rel = Path(*module.split(".")[2:])
    for path in (FOLDER / rel.with_suffix(".py"), FOLDER / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` over every module of :data:`PACKAGE`."""
    graph: dict[str, set[str]] = {}
    for path in sorted(FOLDER.glob("*.py")):
        module = PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"
        graph[module] = imports_of(path, module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_resolved(tmp_path: Path) -> None:
    """The forms of import the package uses all count, at any depth of the code."""
    graph = import_graph()
    assert "camserve.onnx.job" in graph["camserve.onnx.batch"]       # from .job import ...
    assert "camserve.onnx.batch" in graph["camserve.onnx.cli"]
    assert "camserve.onnx.ray" in graph["camserve.onnx.cli"]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from . import job\n    import camserve.onnx.ray as r\n")
    assert imports_of(src, "camserve.onnx.m") == {"camserve.onnx.job", "camserve.onnx.ray"}


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) >= 10
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
