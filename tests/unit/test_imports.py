"""The package's import rules, read from the source with ``ast`` (nothing is imported):

- no private name (``_name``) of one module is imported by another, or read from it as
  ``module._name``;
- no import circle between modules, counting imports inside functions too (an import
  moved into a function hides a circle from Python, not from the reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distributed"

# Circles another change removes; each entry names the modules of one circle. Empty is the goal.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """{dotted name: (tree, is a package __init__)} for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (ast.parse(path.read_text(encoding="utf-8"), str(path)), is_pkg)
    return out


MODULES = _modules()


def _base(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` reads from."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_pkg:
        parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, str | None, int]]:
    """(imported module, name taken from it or None, local alias, line) for every import."""
    tree, is_pkg = MODULES[module]
    out: list[tuple[str, str | None, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_pkg, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # ``from . import wire``: the module itself
                    out.append((sub, None, a.asname or a.name, node.lineno))
                else:
                    out.append((base, a.name, a.asname or a.name, node.lineno))
    return [i for i in out if i[0].split(".")[0] == "distributed"]


def test_no_private_name_crosses_a_module() -> None:
    found = []
    for module in MODULES:
        aliases = {}
        for target, name, alias, line in _imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                found.append(f"{module}:{line} imports {name} from {target}")
            if name is None and alias is not None and target in MODULES:
                aliases[alias] = target
        for node in ast.walk(MODULES[module][0]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules (make them public, or move them):\n" + "\n".join(found)


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    graph = {m: {t for t, _, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    found = _circles(graph)
    circles = [c for c in found if c not in KNOWN_CIRCLES]
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in circles)
    gone = [c for c in KNOWN_CIRCLES if c not in found]
    assert not gone, f"no longer a circle, remove it from KNOWN_CIRCLES: {[sorted(c) for c in gone]}"


def test_the_checks_see_what_they_look_for() -> None:
    """The walk finds the package, resolves relative imports, and spots a circle."""
    assert "distributed.engine.target" in MODULES and "distributed.streams" in MODULES
    targets = {t for t, _, _, _ in _imports("distributed.engine.target")}
    assert {"distributed.engine.slots", "distributed.targets.served", "distributed.engine.wire"} <= targets
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
