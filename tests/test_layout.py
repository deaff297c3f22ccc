"""The layout README.md's Layout section describes, checked on the source: what each folder
may import, and no import cycle between modules. A node importing the CLI, or the protocol
importing a node, fails here before it confuses a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"optinfer_root": "optinfer", "models": "optinfer.models",
           "prover": "optinfer.prover", "contracts": "optinfer.contracts",
           "services": "optinfer.services", "challenger": "optinfer.challenger"}

EDGES = {f"optinfer.services.{name}" for name in (
    "store", "chain", "events", "settings", "statuses", "deployments", "responder", "payouts",
    "metrics")}
"""The services the nodes are built on: chain, database, configuration, the shared responder."""
TOP = ("optinfer.services.cli", "optinfer.services.api", "optinfer.services.demo")
"""Modules that start nodes (the CLI, the API, the demo): nothing below them imports them."""


def _modules() -> dict[str, ast.Module]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts]).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text())
    return found


MODULES = _modules()


def _imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    """The optinfer modules `tree` imports (a package when no module is named)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optinfer"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("optinfer")}
    return names


def _importing(prefix: str) -> dict[str, set[str]]:
    return {name: _imports(tree, top_level_only=False) for name, tree in MODULES.items()
            if name == prefix or name.startswith(prefix + ".")}


def test_every_folder_is_found():
    assert {"optinfer.prover.game", "optinfer.services.responder",
            "optinfer.challenger.watchtower", "optinfer.services.provider"} <= set(MODULES)


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: {dep for dep in _imports(tree, top_level_only=True)
                    if dep in MODULES and dep != name} for name, tree in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_protocol_is_pure():
    """prover/ (commitments, claims, one-step, game) imports the model's op set and itself
    only, never a node, the chain or the database; models/ uses the protocol's commitments
    alone, which import nothing of optinfer's."""
    for name, deps in _importing("optinfer.prover").items():
        assert all(d.startswith(("optinfer.prover", "optinfer.models")) for d in deps), \
            (name, deps)
    assert _importing("optinfer.prover.commitments")["optinfer.prover.commitments"] == set()
    for name, deps in _importing("optinfer.models").items():
        outside = {d for d in deps if not d.startswith("optinfer.models")}
        assert outside <= {"optinfer.prover.commitments", "optinfer.errors"}, (name, outside)


def test_the_contracts_know_nothing_of_the_services_or_the_nodes():
    for name, deps in _importing("optinfer.contracts").items():
        assert not any(d.startswith(("optinfer.services", "optinfer.challenger"))
                       for d in deps), (name, deps)


@pytest.mark.parametrize("below", sorted(EDGES) + ["optinfer.services.provider",
                                                   "optinfer.challenger"])
def test_nothing_below_the_cli_api_and_demo_imports_them(below):
    for name, deps in _importing(below).items():
        assert not any(d.startswith(TOP) for d in deps), (name, deps)


def test_the_services_the_nodes_stand_on_import_no_node():
    nodes = ("optinfer.services.provider", "optinfer.challenger")
    for edge in EDGES:
        deps = _importing(edge)[edge]
        assert not any(d.startswith(nodes) for d in deps), (edge, deps)
    provider = _importing("optinfer.services.provider")["optinfer.services.provider"]
    assert not any(d.startswith("optinfer.challenger") for d in provider)
