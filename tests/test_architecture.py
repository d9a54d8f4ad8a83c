"""The house rules of DESIGN.md, checked on the source: dependencies go one way, no import
cycles, and imports at the top of modules (only the CLI's command modules import lazily, for
start-up time). Reads the code with `ast`; imports nothing of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("hint_model", "pipelines", "hint_platform", "tune_spaces")
# What each top-level package may import of the others (DESIGN.md: one way only).
ALLOWED = {
    "hint_model": set(),
    "pipelines": set(),
    "tune_spaces": set(),  # data: search spaces, nothing of the platform
    "hint_platform": {"hint_model", "pipelines", "tune_spaces"},
}
# Rooms of hint_platform that no other room may enter: the CLI sits on top of everything,
# recipes (the demo) and paper (the paper's tables) run whole chains, and nothing below
# tuning/jobs/serving knows of them.
TOP_ROOMS = {"cli": set(), "recipes": {"cli"}, "paper": {"cli"}, "tuning": {"cli", "recipes", "paper"},
             "jobs": {"cli", "recipes", "paper"}, "serving": {"cli", "recipes", "tracking"}}
LAZY_OK = "hint_platform.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports(path: Path, *, top_level: bool) -> set[str]:
    """Internal modules `path` imports, at its top level or inside functions and classes."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level else [
        n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


GRAPH = {name: imports(path, top_level=True) for name, path in MODULES.items()}


def test_the_graph_is_read():
    assert "hint_platform.config" in GRAPH["hint_platform.training.driver"]
    assert "hint_platform.tracking.runs" in GRAPH["hint_platform.training.driver"]
    assert len(MODULES) > 40


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Edges against DESIGN.md's direction, or into a room of hint_platform that is above."""
    wrong = []
    for name, targets in graph.items():
        package = name.split(".")[0]
        mine = name.split(".")[1] if name.count(".") else ""
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{name} imports {target}")
            elif package == other == "hint_platform":
                room = target.split(".")[1] if target.count(".") else ""
                if room in TOP_ROOMS and room != mine and mine not in TOP_ROOMS[room]:
                    wrong.append(f"{name} imports {target}: {room} is above {mine or name}")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in graph and not state.get(nxt):
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            found = visit(module)
            if found:
                return found
    return None


def test_dependencies_go_one_way():
    assert wrong_arrows(GRAPH) == []


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(LAZY_OK)))
def test_imports_at_the_top(name):
    tree = ast.parse(MODULES[name].read_text())
    lazy = [f"line {n.lineno}" for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not lazy, f"{name}: imports inside functions at {', '.join(lazy)}"


def test_the_checks_catch_a_planted_cycle_and_wrong_arrows(tmp_path):
    """A check that cannot fail is no check: planted faults are found."""
    planted = tmp_path / "planted.py"
    planted.write_text("import pipelines.tokenizer\nfrom hint_platform import config\n"
                       "def f():\n    import ray\n")
    assert imports(planted, top_level=True) == {"pipelines.tokenizer", "hint_platform.config"}
    cycle = {"hint_platform.a": {"hint_platform.b"}, "hint_platform.b": {"hint_platform.a"}}
    assert find_cycle(cycle) == ["hint_platform.a", "hint_platform.b", "hint_platform.a"]
    assert wrong_arrows({"pipelines.spec": {"hint_platform.config"},
                         "hint_platform.training.driver": {"hint_platform.tuning.plan"},
                         "tune_spaces.study": {"hint_platform.config"}}) == [
        "pipelines.spec imports hint_platform.config",
        "hint_platform.training.driver imports hint_platform.tuning.plan: tuning is above training",
        "tune_spaces.study imports hint_platform.config"]
