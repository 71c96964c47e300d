"""The package's shape: no import cycle (in-function imports count), no module over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gemma3_qat"
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import gemma3_qat.x.y` depends on the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name and target != "gemma3_qat":
                found.add(target)
    return found


def test_no_import_cycle():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_cycle_check_sees_lazy_imports(tmp_path, monkeypatch):
    """The checker itself: an in-function import back to the importer is a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import gemma3_qat.b\n")
    b.write_text("def f():\n    from gemma3_qat import a\n")
    known = {"gemma3_qat.a", "gemma3_qat.b"}
    assert _imports(b, "gemma3_qat.b", known) == {"gemma3_qat.a"}
    assert _imports(a, "gemma3_qat.a", known) == {"gemma3_qat.b"}


def test_no_module_over_700_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
