"""The modules of ``fullsparse.train`` import each other one way: no import circle, counting
every import (module level, inside functions, under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import fullsparse.train

TRAIN = Path(fullsparse.train.__file__).resolve().parent
MODULES = sorted(p.stem for p in TRAIN.glob("*.py"))


def imports_of(name: str) -> set[str]:
    """The sibling modules ``name`` imports anywhere in its file (``__init__`` for a name
    taken from the package itself)."""
    tree = ast.parse((TRAIN / f"{name}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fullsparse.train":
                found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
            elif node.module.startswith("fullsparse.train."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("fullsparse.train.")
            }
    return found - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` as a path (first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_checker_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_train() -> None:
    assert len(MODULES) > 20
    assert find_cycle(GRAPH) == []


def test_the_protocols_are_at_the_bottom_and_the_trainer_on_top() -> None:
    assert GRAPH["protocol"] == set()
    assert GRAPH["task"] <= {"config", "guard", "protocol"}
    importers = {name for name, deps in GRAPH.items() if "trainer" in deps}
    assert importers == {"__init__", "compare"}  # the package and the command above it
