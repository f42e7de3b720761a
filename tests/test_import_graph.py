"""No import cycles, at two levels: between modules, and between the packages of `lemonade` (a
subpackage and everything under it count as one node, so `model_manager` ↔ `backends` through any pair
of their modules is a cycle). Every import counts, also the ones inside functions (a lazy import hides
a cycle from the interpreter, not from a reader). `if TYPE_CHECKING:` blocks are skipped: they never run.
Each module must also import on its own, in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lemonade"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The lemonade modules `path` imports (the most specific known module of each import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("lemonade"):
                        found.add(resolve(alias.name))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.startswith("lemonade"):
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        found.add(full if full in known else resolve(base))
            visit(child)

    visit(tree)
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def _package_of(module: str, packages: set[str]) -> str:
    """The lemonade subpackage a module belongs to, or the module itself when it is top level."""
    parts = module.split(".")
    return f"lemonade.{parts[1]}" if len(parts) > 2 and f"lemonade.{parts[1]}" in packages else module


def test_no_cycle_between_modules():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_no_cycle_between_packages():
    graph = _graph()
    packages = {n for n, p in _modules().items() if p.name == "__init__.py" and n != "lemonade"}
    collapsed: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = _package_of(module, packages)
        edges = collapsed.setdefault(source, set())
        edges.update(t for t in (_package_of(t, packages) for t in targets) if t != source)
    cycle = _cycle(collapsed)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(_modules()))
def test_each_module_imports_alone(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
