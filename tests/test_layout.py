"""The package's rooms and the direction of their imports (DESIGN.md, "Layout").

Imports point down only: the graph compiler's base (``core`` with the ``passes`` and
``kernels`` it runs) imports nothing above it; each room imports only the rooms below
it; the public API (``fastgraph/__init__``) is imported by the CLI alone, and the CLI by
nothing. Checked on every ``import`` statement, deferred ones inside functions included,
so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"core", "passes", "kernels"}
# room -> the rooms it may import (itself always allowed)
MAY_IMPORT = {
    "core": BASE, "passes": BASE, "kernels": BASE, "profiles": set(),
    "data": BASE,
    "training": BASE | {"data", "profiles"},
    "perf": BASE | {"data", "training", "profiles"},
    "compiler": BASE | {"data", "training", "perf", "profiles"},
    "deploy": BASE | {"data", "training"},
    "api": BASE | {"data", "training", "perf", "compiler", "deploy", "profiles"},
    "cli": BASE | {"data", "training", "perf", "compiler", "deploy", "profiles", "api"},
}
ROOMS = set(MAY_IMPORT) - {"api"}
FOLDERS = {"passes": ROOT / "passes", "kernels": ROOT / "kernels", "profiles": ROOT / "profiles"}


def room_of_file(path: Path) -> str:
    """The room a source file belongs to."""
    for room, folder in FOLDERS.items():
        if folder in path.parents:
            return room
    rel = path.relative_to(ROOT / "fastgraph")
    if len(rel.parts) == 1:
        return "cli" if rel.name == "__main__.py" else "api"
    return rel.parts[0]


def room_of_module(module: str) -> str | None:
    """The room of an imported module name, None outside fastgraph."""
    parts = module.split(".")
    if parts[0] != "fastgraph":
        return None
    return "api" if len(parts) == 1 else parts[1]


def imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            if module == "fastgraph":  # `from fastgraph import data` names a room (or the API)
                found += [(node.lineno, f"fastgraph.{a.name}" if a.name in ROOMS else module)
                          for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def sources():
    for folder in (ROOT / "fastgraph", *FOLDERS.values()):
        yield from sorted(folder.rglob("*.py"))


def package_of(path: Path) -> str:
    room = room_of_file(path)
    if room in FOLDERS:
        rel = path.parent.relative_to(FOLDERS[room])
        return ".".join(("fastgraph", room, *rel.parts))
    return ".".join(path.parent.relative_to(ROOT).parts)


def test_imports_point_down_only():
    wrong = []
    for path in sources():
        room = room_of_file(path)
        for line, module in imported(ast.parse(path.read_text()), package_of(path)):
            target = room_of_module(module)
            if target is None or target == room:
                continue
            if target not in MAY_IMPORT[room]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {room} imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_every_room_says_what_it_owns_and_may_import():
    for folder in sorted(p for p in (ROOT / "fastgraph").iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        where = f"fastgraph/{folder.name}/__init__.py"
        assert doc and "May import" in doc, f"{where}: say what it owns and may import"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a deferred import of the CLI from core is caught."""
    tree = ast.parse("def f():\n    from fastgraph.cli.main import main\n")
    modules = [m for _, m in imported(tree, "fastgraph.core")]
    assert room_of_module(modules[0]) == "cli" and "cli" not in MAY_IMPORT["core"]
    tree = ast.parse("from . import register\nfrom ..core import errors\n")
    assert [m for _, m in imported(tree, "fastgraph.passes")] == ["fastgraph.passes", "fastgraph.core"]


def test_every_subpackage_is_installed():
    """pyproject lists packages by hand (passes/, kernels/, profiles/ install under other
    names): a subpackage missing from the list would work in a checkout and be absent
    from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastgraph").rglob("__init__.py")}
    found |= {f"fastgraph.{room}" for room in FOLDERS}
    assert found == listed, f"not installed: {sorted(found - listed)}; absent: {sorted(listed - found)}"


def module_name(path: Path) -> str:
    name = package_of(path)
    return name if path.name == "__init__.py" else f"{name}.{path.stem}"


def test_no_import_cycles_between_modules():
    """No two modules import each other, directly or around a loop, deferred imports inside
    functions included: such a circle (export <-> export_onnx, each deferring its import of
    the other) works only as long as nobody moves an import to the top."""
    paths = {module_name(p): p for p in sources()}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        top = ast.Module(body=[n for n in ast.walk(ast.parse(path.read_text()))
                               if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in top.body:
            for _, module in imported(ast.Module(body=[node], type_ignores=[]), package):
                targets.add(module)
            if isinstance(node, ast.ImportFrom):  # `from pkg import submodule`
                base = next(m for _, m in imported(ast.Module(body=[node], type_ignores=[]), package))
                targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in paths}
        edges[name] = {t for t in targets if t in paths and t != name}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(edges)) if c]
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
