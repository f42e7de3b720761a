"""Every `differs_from_cpp` test has its line in CMake-parity-docs/parity-harness.md."""
from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "CMake-parity-docs" / "parity-harness.md"


def test_every_intended_difference_is_documented(request):
    text = DOC.read_text()
    marked = {item.originalname or item.name for item in request.session.items
              if item.get_closest_marker("differs_from_cpp") is not None and "parity" in item.nodeid}
    missing = sorted(name for name in marked if f"`{name}`" not in text)
    assert not missing, f"add these to {DOC.name}: {missing}"
