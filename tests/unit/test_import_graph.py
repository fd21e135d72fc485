"""The appliance's import graph is one-way: no cycle, and the local API never needs the daemon.

Two checks. The static one reads every module with `ast` and counts every import of an
`appliance` module, wherever it is written (top level, inside a function, under
TYPE_CHECKING), so a cycle cannot hide behind a function-level import. The dynamic one
imports each module in a fresh interpreter: every module imports on its own, and importing
the local API does not drag the daemon in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "appliance"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
}


def imported(name: str, path: Path) -> set[str]:
    """The appliance modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from appliance import localapi` imports the module appliance.localapi
            targets = [f"{base_name}.{a.name}" for a in node.names
                       if f"{base_name}.{a.name}" in MODULES] or [base_name]
        else:
            continue
        for target in targets:
            # `import appliance.console.app` also imports its packages; only the module
            # itself matters for a cycle between modules.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("appliance"):
                found.add(target)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read() -> None:
    assert "appliance.daemon" in GRAPH["appliance.cli"]  # a function-level import counts
    assert {"appliance.localapi", "appliance.keyissuer"} <= GRAPH["appliance.daemon"]


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_appliance() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_local_api_does_not_import_the_daemon() -> None:
    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert "appliance.daemon" not in reachable("appliance.localapi")


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Every module on its own (a cycle can depend on which module comes first)."""
    names = [n for n in MODULES if not n.endswith("__main__")]  # that one runs the CLI
    check = (
        "import importlib, sys; name = sys.argv[1]; importlib.import_module(name); "
        "assert name != 'appliance.localapi' or 'appliance.daemon' not in sys.modules, "
        "'appliance.localapi imported appliance.daemon'"
    )
    # All at once: each is a separate interpreter, started in parallel to keep this quick.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", check, name], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in names
    }
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        if proc.returncode != 0:
            failed[name] = out.strip().splitlines()[-1:]
    assert not failed, failed


@pytest.mark.parametrize("name", ["appliance.localapi", "appliance.console.app"])
def test_no_daemon_behind_the_api_or_the_console(name: str) -> None:
    assert "appliance.daemon" not in GRAPH[name]


# Which top-level packages each package may import: the shared core imports neither side,
# and neither side imports the other (the control plane installs without the appliance).
ALLOWED = {
    "gatewaycore": {"gatewaycore"},
    "appliance": {"appliance", "gatewaycore"},
    "controlplane": {"controlplane", "gatewaycore"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(package: str) -> None:
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for top in {n.split(".")[0] for n in names} & set(ALLOWED):
                if top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(REPO)} imports {top}")
    assert not wrong, wrong
