"""The package's shape: imports point down the layer list (in-function imports count), so there is no cycle; no
private name is imported from another package; no fixture builder is imported by the package; no module over 700
lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gemma3_qat"
MAX_LINES = 700

# The layers, bottom first. A module may import modules of lower layers, and of its own package (``qat.train``
# imports ``qat.data``); never a higher layer, nor another package of its own layer. docs/design.md explains them.
LAYERS = [
    ("errors",),  # the one error table's kinds
    ("report", "tokenizer", "integrity", "assets"),  # tables, tokenizer loading, file checksums, shipped assets
    ("formats", "vocab"),  # numerics of each format; vocabularies
    ("models",),  # architecture facts: the one reader of a checkpoint's config
    ("layout",),  # where each tensor goes and its type (names, roles, GGUF type policy); no I/O
    ("mixtures",),  # which lattice each tensor of a mixture (q4_k_m) takes: llama-quantize's policy; no I/O
    ("checkpoint", "gguf_file"),  # model files: checkpoints (read, write, run directories), GGUF files (read)
    ("sources", "lattice"),  # where a model comes from (dir, hub id, .gguf); lattice recovery numerics
    ("qat", "exporters", "recover"),  # training; export; import of QAT checkpoints
    ("runtimes",),  # llama.cpp's and gemma.cpp's binaries in the loop
    ("evaluate", "memory"),  # measurement: quality, footprints
    ("embedded",),  # the builder of the shipped default model (maintainers)
    ("cli",),  # the command line
]


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


def _unit(module: str) -> str:
    """The layer member a module belongs to: its top-level name under gemma3_qat (``qat`` for ``qat.train``)."""
    return module.removeprefix("gemma3_qat.").split(".")[0]


def _layer_of() -> dict[str, int]:
    return {unit: i for i, units in enumerate(LAYERS) for unit in units}


def test_every_module_has_a_layer():
    layer = _layer_of()
    assert len(layer) == sum(map(len, LAYERS)), "a name is in two layers"
    missing = sorted({_unit(m) for m in _modules() if m != "gemma3_qat"} - set(layer))
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def test_imports_point_down_the_layers():
    modules = _modules()
    known = set(modules)
    layer = _layer_of()
    wrong = []
    for name, path in modules.items():
        if name == "gemma3_qat":
            continue
        here = _unit(name)
        for target in _imports(path, name, known):
            there = _unit(target)
            if there == here:
                continue  # within its own package or module
            if layer[there] >= layer[here]:
                wrong.append(f"{name} -> {target} (layer {layer[here]} imports layer {layer[there]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy import from formats of qat (a higher layer) is found."""
    f = tmp_path / "f.py"
    f.write_text("def g():\n    from gemma3_qat.qat import prepare\n")
    known = {"gemma3_qat.formats", "gemma3_qat.qat.prepare"}
    targets = _imports(f, "gemma3_qat.formats", known)
    assert targets == {"gemma3_qat.qat.prepare"}
    assert _layer_of()[_unit("gemma3_qat.qat.prepare")] > _layer_of()[_unit("gemma3_qat.formats")]


def _private_imports(path: Path, name: str) -> list[str]:
    """``from gemma3_qat.X import _y`` where X is another package (or top-level module) than ``name``'s."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemma3_qat") and not node.level:
            if _unit(node.module) == _unit(name):
                continue
            found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_packages():
    found = [line for name, path in _modules().items() for line in _private_imports(path, name)]
    assert not found, "\n".join(found)


def test_the_package_imports_no_test_fixture():
    """The fixture builders live in tests/ (builders.py, tokenizer_parity.py): nothing shipped imports them."""
    fixtures = {p.stem for p in PACKAGE.parent.joinpath("tests").glob("*.py")}
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            found += [f"{name} imports {m}" for m in mods if m.split(".")[0] in fixtures | {"tests"}]
    assert not found, found
