"""The package's modules import each other one way: no module imports a sibling that imports
it back, directly or round a longer loop (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rabbitq"


def _imports(path: Path) -> set[str]:
    """The sibling modules `path` imports, by name (`_wire`, `_errors`, ...)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "rabbitq":
            found |= {alias.name for alias in node.names if alias.name.startswith("_")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rabbitq."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rabbitq.")}
    return found - {path.stem}


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("_*.py") if p.stem != "__main__"}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert "_errors" in order and graph["_errors"] == set()  # errors sit at the bottom
