"""The layering seen in the tree: rpsft.core < rpsft.evaluation < rpsft.sweeps < rpsft.dashboards < rpsft (the app).

Every module is parsed, not imported: no package imports a higher one (at module level or inside a function),
``rpsft.core`` imports nothing by string, and no module of ``rpsft.core`` imports Ray, MLflow or Optuna. A
subprocess then imports every module of ``rpsft.core`` and checks that none of them pulled those in.

The whole module import graph of the rpsft packages has no cycle, and the parts of ``rpsft.sweeps`` import
each other in one order (:data:`SWEEPS_ORDER`). An edge of the graph is any ``import`` / ``from ... import``
anywhere in a module, inside function bodies too (an import deferred to call time still ties the two modules
together); ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one. Imports under
``if TYPE_CHECKING:`` do not count: they never run, and only name types for annotations.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each layer's import name and the folder it is installed from (pyproject.toml's package-dir), lowest first.
FOLDERS = {
    "rpsft.core": "rpsft_core",
    "rpsft.evaluation": "evaluation",
    "rpsft.sweeps": "sweeps",
    "rpsft.dashboards": "dashboards",
    "rpsft": "rpsft",
}
LAYERS = tuple(FOLDERS)
SERVICE_PACKAGES = {"ray", "mlflow", "optuna"}


def modules(package: str) -> list[Path]:
    paths = sorted((REPO / FOLDERS[package]).rglob("*.py"))
    assert paths, f"{package} has no modules"
    return paths


def module_name(path: Path, root: Path = REPO) -> str:
    """The import name of a file: its folder's package name (``FOLDERS``) and its path inside."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    if root == REPO:
        package = {folder: name for name, folder in FOLDERS.items()}[parts[0]]
        parts = [*package.split("."), *parts[1:]]
    return ".".join(parts)


def layer_of(name: str) -> str | None:
    """The layer an imported module belongs to (the longest matching package name), or None outside rpsft."""
    for layer in sorted(LAYERS, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import statement in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module))
    return found


def string_imports(path: Path) -> list[int]:
    """Lines that call ``importlib.import_module``, ``import_module`` or ``__import__``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib":
            lines += [node.lineno for alias in node.names if alias.name == "import_module"]
    return lines


# The parts of rpsft.sweeps, lowest first: a part imports only the parts of earlier ranks (never one of its own
# rank, nor a later one). Each module belongs to the part with the longest matching name.
#   trial.hooks  the contract of the user's trial hooks, which the sweep config validates
#   config       the typed sweep config; names the sweep directory, but knows nothing of what is in it
#   store        the sweep's persisted state (SweepStore: the directory, sweep.json, trial records in MLflow)
#   analysis     the trade-off read out of stored trials: points, selection, intervals, trajectories, summaries
#   trial        one trial: training and scoring, in one process or over Ray Train workers
#   preflight    the checks a sweep passes before any trial starts
#   shared_storage  on a cluster of several nodes, the check that every node sees the sweep's paths
#   retention    which trials keep their weights, and the kept ones in the Model Registry
#   ray_session  the driver's Ray connection and the environment its workers get
#   search       the search: samplers, initial design, warm starts, and the Tune callback that prunes weights
#   runner       the driver: a sweep from its config to its selection
#   stages       what comes after (and around) a sweep: export, RL, regression, the study, reports
#   cli          the ``rpsft sweep`` commands
SWEEPS_ORDER = (
    ("rpsft.sweeps.trial.hooks",),
    ("rpsft.sweeps.config",),
    ("rpsft.sweeps.store",),
    ("rpsft.sweeps.analysis",),
    (
        "rpsft.sweeps.trial",
        "rpsft.sweeps.preflight",
        "rpsft.sweeps.shared_storage",
        "rpsft.sweeps.retention",
        "rpsft.sweeps.ray_session",
        "rpsft.sweeps.driver_guard",
    ),
    ("rpsft.sweeps.search",),
    ("rpsft.sweeps.runner",),
    ("rpsft.sweeps.stages",),
    ("rpsft.sweeps.cli",),
)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST):
    """Every node under ``node`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs, so it counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for branch in child.orelse:
                yield branch
                yield from _runtime_nodes(branch)
            continue
        yield child
        yield from _runtime_nodes(child)


def package_modules(root: Path = REPO) -> dict[str, Path]:
    """``{import name: file}`` of every module: of every layer (``FOLDERS``), or of every file under ``root``."""
    paths = [p for package in LAYERS for p in modules(package)] if root == REPO else sorted(root.rglob("*.py"))
    return {module_name(path, root): path for path in paths}


def import_graph(root: Path = REPO) -> tuple[dict[str, list[tuple[int, str]]], dict[str, Path]]:
    """``({module: [(line, imported module), ...]}, {module: file})`` over the modules of
    :func:`package_modules`: each import resolved to the longest module name it starts with, ``from pkg import
    name`` to ``pkg.name`` when that is a module; imports of anything else are left out."""
    known = package_modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, list[tuple[int, str]]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = []
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base) for a in node.names]
            else:
                continue
            edges += [(node.lineno, target) for target in dict.fromkeys(targets) if target and target != name]
        graph[name] = edges
    return graph, known


def import_cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[tuple[str, int]]]:
    """Every cycle that closes over one import: for each import ``a -> b`` inside a strongly connected set of
    modules, the shortest path back from ``b`` to ``a``. A cycle is ``[(module, line of its import of the next
    module), ...]``, the last importing the first, started at its smallest module; each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    component: dict[str, int] = {}

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for _, target in graph.get(node, []):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            while True:
                member = stack.pop()
                component[member] = index[node]
                if member == node:
                    break

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for start in sorted(graph):
        for line, target in graph[start]:
            if component.get(target) != component[start]:
                continue
            back = {target: None}  # breadth-first from target to start, inside the component
            queue = [target]
            while start not in back:
                node = queue.pop(0)
                for _, nxt in graph[node]:
                    if nxt not in back and component.get(nxt) == component[start]:
                        back[nxt] = node
                        queue.append(nxt)
            path = [start]
            while path[-1] != target:
                path.append(back[path[-1]])
            chain = [start, *reversed(path[1:])]  # start -> target -> ... -> (back to start)
            lines = [line] + [
                next(n for n, t in graph[a] if t == b) for a, b in zip(chain[1:], [*chain[2:], start], strict=True)
            ]
            first = chain.index(min(chain))
            cycle = list(zip(chain, lines, strict=True))
            cycle = cycle[first:] + cycle[:first]
            cycles.setdefault(tuple(m for m, _ in cycle), cycle)
    return list(cycles.values())


def cycle_text(cycle: list[tuple[str, int]], paths: dict[str, Path], root: Path = REPO) -> str:
    """``a (file:line) -> b (file:line) -> a``: each module with the line of its import of the next."""
    steps = [f"{module} ({paths[module].relative_to(root)}:{line})" for module, line in cycle]
    return " -> ".join([*steps, cycle[0][0]])


def sweeps_rank(module: str) -> tuple[int, str] | None:
    """``(rank, part)`` of a module of rpsft.sweeps in :data:`SWEEPS_ORDER`; None for the package itself or
    a module outside it."""
    best = None
    for rank, parts in enumerate(SWEEPS_ORDER):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (best is None or len(part) > len(best[1])):
                best = (rank, part)
    return best


def sweeps_order_violations(graph: dict[str, list[tuple[int, str]]], paths: dict[str, Path]) -> list[str]:
    """The imports between parts of rpsft.sweeps against :data:`SWEEPS_ORDER`, and modules of no part."""
    out = []
    for module, edges in graph.items():
        if not module.startswith("rpsft.sweeps.") or module == "rpsft.sweeps":
            continue
        mine = sweeps_rank(module)
        if mine is None:
            out.append(f"{paths[module].relative_to(REPO)}: {module} is in no part of SWEEPS_ORDER")
            continue
        for line, target in edges:
            theirs = sweeps_rank(target)
            if theirs is not None and theirs[1] != mine[1] and theirs[0] >= mine[0]:
                out.append(f"{paths[module].relative_to(REPO)}:{line}: {mine[1]} imports {target} ({theirs[1]})")
    return out


def test_the_import_parser_sees_every_kind_of_import(tmp_path):
    """The checks below rely on it: plain, from, relative and function-level imports, and string imports."""
    pkg = tmp_path / "sweeps" / "sub"
    pkg.mkdir(parents=True)
    source = pkg / "mod.py"
    source.write_text(
        "import rpsft.dashboards.report\nfrom evaluation import x\nfrom ..other import y\nfrom . import z\n"
        "def f():\n    import importlib\n    importlib.import_module('dashboards')\n    __import__('ray')\n"
    )
    names = [name for _, name in imported_modules(source, root=tmp_path)]
    assert names == ["rpsft.dashboards.report", "evaluation", "sweeps.other", "sweeps.sub", "importlib"]
    assert string_imports(source) == [7, 8]


def test_no_package_imports_a_higher_layer():
    violations = []
    for rank, package in enumerate(LAYERS):
        for path in modules(package):
            for line, name in imported_modules(path):
                layer = layer_of(name)
                if layer is not None and LAYERS.index(layer) > rank:
                    violations.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not violations, "\n".join(violations)


def test_the_core_imports_nothing_by_string_and_no_service_client():
    by_string = [f"{p.relative_to(REPO)}:{line}" for p in modules("rpsft.core") for line in string_imports(p)]
    assert not by_string, by_string
    services = [
        f"{p.relative_to(REPO)}:{line} imports {name}"
        for p in modules("rpsft.core")
        for line, name in imported_modules(p)
        if name.split(".")[0] in SERVICE_PACKAGES
    ]
    assert not services, services


def test_the_import_graph_resolves_submodules_counts_deferred_imports_and_finds_a_cycle(tmp_path):
    """The cycle check can fail: a cycle hidden in a function body and closed by ``from pkg import module`` is
    found, with every import's line; a ``TYPE_CHECKING`` import is no edge."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\n\ndef f():\n    import pkg.b.c\n")
    (pkg / "b").mkdir()
    (pkg / "b" / "__init__.py").write_text("")
    (pkg / "b" / "c.py").write_text("from pkg import a\nfrom . import d\n")
    (pkg / "b" / "d.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.b import c\nelse:\n    import pkg\n"
    )
    graph, paths = import_graph(tmp_path)
    assert graph["pkg.a"] == [(5, "pkg.b.c")]  # os is no module of the tree
    assert graph["pkg.b.c"] == [(1, "pkg.a"), (2, "pkg.b.d")]
    assert graph["pkg.b.d"] == [(6, "pkg")]  # the else branch runs; the TYPE_CHECKING import does not
    cycles = import_cycles(graph)
    assert cycles == [[("pkg.a", 5), ("pkg.b.c", 1)]]
    assert cycle_text(cycles[0], paths, tmp_path) == "pkg.a (pkg/a.py:5) -> pkg.b.c (pkg/b/c.py:1) -> pkg.a"
    (pkg / "b" / "d.py").write_text("from pkg.b import c\n")  # a second cycle, through the package of c
    assert import_cycles(import_graph(tmp_path)[0]) == [[("pkg.a", 5), ("pkg.b.c", 1)], [("pkg.b.c", 2), ("pkg.b.d", 1)]]


def test_the_rpsft_packages_import_no_cycle():
    graph, paths = import_graph()
    assert len(graph) >= 100 and graph["rpsft.sweeps.runner"]  # the whole tree, with its imports
    cycles = [cycle_text(cycle, paths) for cycle in import_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_parts_of_sweeps_import_in_one_order():
    graph, paths = import_graph()
    assert sweeps_rank("rpsft.sweeps.store.sweep_store") == (2, "rpsft.sweeps.store")
    assert sweeps_rank("rpsft.sweeps.trial.hooks") == (0, "rpsft.sweeps.trial.hooks")
    # the check can fail: a store that reads the analysis, and a trial that imports preflight (the same rank)
    wrong = {
        "rpsft.sweeps.store.sweep_store": [(3, "rpsft.sweeps.analysis.selection"), (4, "rpsft.sweeps.config")],
        "rpsft.sweeps.trial.run": [(7, "rpsft.sweeps.preflight"), (8, "rpsft.sweeps.trial.hooks")],
    }
    assert sweeps_order_violations(wrong, paths) == [
        "sweeps/store/sweep_store.py:3: rpsft.sweeps.store imports rpsft.sweeps.analysis.selection "
        "(rpsft.sweeps.analysis)",
        "sweeps/trial/run.py:7: rpsft.sweeps.trial imports rpsft.sweeps.preflight (rpsft.sweeps.preflight)",
    ]
    violations = sweeps_order_violations(graph, paths)
    assert not violations, "\n".join(violations)


@pytest.mark.slow  # imports torch, transformers and TRL: a minute or more on a loaded CPU
def test_importing_every_core_module_loads_no_ray_mlflow_or_optuna():
    names = [module_name(p) for p in modules("rpsft.core")]
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(SERVICE_PACKAGES)!r}))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert len(names) >= 20  # every module, the diagnostics included
