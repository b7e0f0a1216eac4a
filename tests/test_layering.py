"""The package's imports run one way (docs/design.md, "The house"): no circle between its parts, and the
functional core (``pruning``, ``validation``) imports nothing above it. Imports inside functions (lazy
imports of optional parts) and under ``if TYPE_CHECKING:`` are not part of the import order."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lightning_fedprune"


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _part(name: list[str]) -> str:
    """The part of the package a module belongs to: ``federated``, ``pruning``, ..., ``cli``; the root ``__init__``."""
    return name[1] if len(name) > 1 else "__init__"


def _top_level_imports(path: Path) -> set[str]:
    module = _module(path)
    found = set()
    nodes = []
    for node in ast.parse(path.read_text()).body:  # try/except imports run at import time too
        nodes += [node, *node.body, *(n for h in node.handlers for n in h.body)] if isinstance(node, ast.Try) else [node]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if path.name == "__init__.py" else module[:-1]
                base = base[: len(base) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] == "lightning_fedprune"}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PKG.rglob("*.py"):
        source = _part(_module(path))
        for target in _top_level_imports(path):
            part = _part(target.split("."))
            if part != source:
                graph[source].add(part)
    return graph


def test_no_circle_between_the_parts():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_functional_core_imports_nothing_above_it():
    graph = _graph()
    assert graph.get("pruning", set()) <= {"validation"}, graph["pruning"]
    assert not graph.get("validation"), graph["validation"]
    assert graph.get("federated", set()) <= {"_compat", "pruning", "validation"}, graph["federated"]
