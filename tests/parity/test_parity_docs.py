"""Every `differs_from_cpp` test has its line in CMake-parity-docs/parity-harness.md."""
from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "CMake-parity-docs" / "parity-harness.md"


def marked_tests() -> set[str]:
    """Names of test functions decorated with `pytest.mark.differs_from_cpp(...)`, read from the source
    (so the check does not depend on which tests were collected)."""
    names = set()
    for path in HERE.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("mark.differs_from_cpp"):
                        names.add(node.name)
    return names


def test_every_intended_difference_is_documented():
    text = DOC.read_text()
    marked = marked_tests()
    assert len(marked) >= 10
    missing = sorted(name for name in marked if f"`{name}`" not in text)
    assert not missing, f"add these to {DOC.name}: {missing}"
