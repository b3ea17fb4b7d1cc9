"""The layering seen in the tree: rpsft.core < rpsft.evaluation < rpsft.sweeps < rpsft.dashboards < rpsft (the app).

Every module is parsed, not imported: no package imports a higher one (at module level or inside a function),
``rpsft.core`` imports nothing by string, and no module of ``rpsft.core`` imports Ray, MLflow or Optuna. A
subprocess then imports every module of ``rpsft.core`` and checks that none of them pulled those in.
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
