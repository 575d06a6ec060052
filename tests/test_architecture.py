"""The architecture as tests: what ``import prunekit`` loads, no import cycle between the
modules of ``src/prunekit``, a small top-level API, and the import-linter contracts of
pyproject.toml (core < engines < app, see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grimp

import prunekit as pk

ROOT = Path(__file__).resolve().parents[1]
# The engines and the application layer (the ``layers`` contract in pyproject.toml);
# ``cli`` also stands for every ``cli_*`` module.
ENGINES = ("structured", "sparse", "llm", "training")
APP = ("analysis", "cli", "demo", "export", "llm_models", "model_spec", "recipes", "zoo")
HEAVY = ("matplotlib", "transformers")


def _is_lazy(module: str) -> bool:
    parts = module.split(".")
    if parts[0] in HEAVY:
        return True
    if parts[0] != "prunekit" or len(parts) < 2:
        return False
    child = parts[1]
    return child in ENGINES or child in APP or child.startswith("cli_")


def test_import_prunekit_loads_only_the_core() -> None:
    code = "import json, sys, prunekit; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert "prunekit.pruner" in loaded
    assert [m for m in loaded if _is_lazy(m)] == []


def test_public_api_is_small_and_every_name_resolves() -> None:
    assert len(pk.__all__) <= 40
    assert len(set(pk.__all__)) == len(pk.__all__)
    for name in pk.__all__:
        assert getattr(pk, name) is not None, name
    assert set(pk.__all__) <= set(dir(pk))


def test_subpackages_and_lazy_names_resolve_on_first_access() -> None:
    code = (
        "import prunekit as pk\n"
        "from prunekit import shrink\n"
        "from prunekit.structured import shrink as defined\n"
        "assert shrink is defined and pk.shrink is defined\n"
        "assert pk.analysis.profile and pk.llm.prune and pk.sparse.convert and pk.zoo.train\n"
        "assert {'llm', 'shrink', 'PruneSpec'} <= set(dir(pk))\n"
        "for name in ('nope', '_private', 'a.b'):\n"
        "    assert not hasattr(pk, name), name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _runtime_import_graph() -> grimp.ImportGraph:
    """The import graph of prunekit, imports inside functions and ``TYPE_CHECKING``
    included, plus the edges Python adds at run time: importing ``a.b.c`` first runs the
    ``__init__`` of ``a.b``, so an importer gets an edge to every package above what it
    imports. Packages above the importer itself are left out: they are already being
    imported when the importer runs, so a package ``__init__`` that re-exports its own
    submodules, and those submodules importing each other, is no cycle."""
    graph = grimp.build_graph("prunekit", cache_dir=None)
    for importer in sorted(graph.modules):
        own = _packages_above(importer)
        for imported in graph.find_modules_directly_imported_by(importer):
            for package in _packages_above(imported) - own - {importer}:
                graph.add_import(importer=importer, imported=package)
    return graph


def _packages_above(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components with more than one module: a module's component
    is what it imports (directly or not) that also imports it."""
    cycles: list[list[str]] = []
    seen: set[str] = set()
    for module in sorted(graph.modules):
        if module in seen:
            continue
        loop = graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        if loop:
            component = sorted(loop | {module})
            seen.update(component)
            cycles.append(component)
    return cycles


def _describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    members = set(component)
    edges = [
        f"  {a} -> {b}"
        for a in component
        for b in sorted(graph.find_modules_directly_imported_by(a) & members)
    ]
    return "\n".join([f"cycle of {len(component)} modules:", *edges])


def test_no_import_cycle_between_modules() -> None:
    graph = _runtime_import_graph()
    cycles = _cycles(graph)
    assert cycles == [], "\n".join(_describe(graph, c) for c in cycles)


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run(
        [str(lint), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
