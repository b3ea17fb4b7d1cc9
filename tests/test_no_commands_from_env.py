"""No production module runs a command a variable chose: every module of the packages (rpsft_core/, evaluation/,
sweeps/, dashboards/, rpsft/) is parsed, and a shell (``shell=True``, ``os.system``, ``os.popen``, ...) or a
process started with an argument read from the environment (``os.environ``, ``os.getenv``), directly or through
names and attributes assigned from it, fails the test. Fault injection lives in the tests, as a trial hook."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rpsft_core", "evaluation", "sweeps", "dashboards", "rpsft")

# calls that start a process; the ones that always go through a shell are flagged whatever their arguments
PROCESS_MODULES = ("subprocess.",)
PROCESS_CALLS = {
    "os.system", "os.popen", "os.startfile", "os.posix_spawn", "os.posix_spawnp",
    "pty.spawn", "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
    *(f"os.exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
    *(f"os.spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
}  # fmt: skip
SHELLS = {"os.system", "os.popen", "asyncio.create_subprocess_shell", "subprocess.getoutput",
          "subprocess.getstatusoutput"}  # fmt: skip
COMMAND_KEYWORDS = {"args", "cmd", "command", "executable", "path", "file", "program"}  # not env=, cwd=, ...
ENV_READS = {"os.getenv", "os.environ.get", "os.environ.pop", "os.environ.setdefault", "os.environ.copy",
             "os.getenvb", "os.environb.get"}  # fmt: skip
ENVIRON = {"os.environ", "os.environb"}


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _functions(tree: ast.AST) -> list[ast.AST]:
    return [node for node in ast.walk(tree) if isinstance(node, FUNCTIONS)]


def _walk_scope(scope: ast.AST):
    """The nodes of ``scope``: a function's, the functions nested in it included (they see its names); the
    module's, without its functions (each is a scope of its own)."""
    stack = [scope]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(scope, ast.Module) and isinstance(child, FUNCTIONS):
                continue
            stack.append(child)


class _Module:
    """One parsed module: its import aliases, and the names and attributes that hold values read from the
    environment."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.aliases: dict[str, str] = {}  # local name -> the module or object it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self.attribute_taint: set[str] = set()
        self.module_taint: set[str] = set()
        self.any_env = self._env_read(tree)  # most modules read no variable: nothing to follow
        if self.any_env:
            self.module_taint = self._tainted_names(tree, set())
            self.attribute_taint = self._tainted_attributes()

    def resolve(self, node: ast.AST) -> str | None:
        """The full dotted name an expression refers to, imports resolved (``sp.run`` -> ``subprocess.run``)."""
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def _env_read(self, node: ast.AST, walk: bool = True) -> bool:
        """Whether ``node`` is (``walk``: holds) an ``os.environ`` lookup or an ``os.getenv``-like call."""
        for sub in ast.walk(node) if walk else [node]:
            if isinstance(sub, ast.Subscript) and self.resolve(sub.value) in ENVIRON:
                return True
            if isinstance(sub, ast.Call) and self.resolve(sub.func) in ENV_READS:
                return True
        return False

    def reads_env(self, node: ast.AST, names: set[str]) -> bool:
        """Whether ``node`` holds a value read from the environment: an ``os.environ`` lookup, ``os.getenv``,
        or a name/attribute assigned from one."""
        if not self.any_env:
            return False
        for sub in ast.walk(node):
            if self._env_read(sub, walk=False):
                return True
            if isinstance(sub, ast.Name) and sub.id in names:
                return True
            if isinstance(sub, ast.Attribute) and _dotted(sub) in self.attribute_taint:
                return True
        return False

    def _assignments(self, scope: ast.AST):
        """``(targets, value)`` of every assignment in ``scope``: a function's, with the functions nested in it;
        the module's, without its functions."""
        for node in _walk_scope(scope):
            if isinstance(node, ast.Assign):
                yield node.targets, node.value
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                yield [node.target], node.value
            elif isinstance(node, ast.NamedExpr):
                yield [node.target], node.value
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                yield [node.target], node.iter
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        yield [item.optional_vars], item.context_expr

    def _tainted_names(self, scope: ast.AST, names: set[str]) -> set[str]:
        """The names assigned in ``scope`` from values read from the environment, to a fixed
        point: ``a = os.environ["X"]; b = f"run {a}"`` taints both."""
        tainted = set(names)
        changed = True
        while changed:
            changed = False
            for targets, value in self._assignments(scope):
                if not self.reads_env(value, tainted):
                    continue
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name) and sub.id not in tainted:
                            tainted.add(sub.id)
                            changed = True
        return tainted

    def _tainted_attributes(self) -> set[str]:
        """``self.command``-like attributes assigned, anywhere in the module, from values read from the
        environment (within the function that assigns them)."""
        out = self.attribute_taint  # grows while it is computed: an attribute set from another counts
        changed = True
        while changed:
            changed = False
            for scope in [self.tree, *_functions(self.tree)]:
                names = self._tainted_names(scope, self.module_taint)
                for targets, value in self._assignments(scope):
                    if not self.reads_env(value, names):
                        continue
                    for target in targets:
                        name = _dotted(target) if isinstance(target, ast.Attribute) else None
                        if name is not None and name not in out:
                            out.add(name)
                            changed = True
        return out

    def findings(self) -> list[tuple[int, str]]:
        """``(line, what)`` of every shell and every process started with an argument from the environment."""
        found = []
        for scope in [self.tree, *_functions(self.tree)]:
            names = self._tainted_names(scope, self.module_taint) if self.any_env else set()
            for node in _walk_scope(scope):
                if not isinstance(node, ast.Call):
                    continue
                callee = self.resolve(node.func) or ""
                if not (callee.startswith(PROCESS_MODULES) or callee in PROCESS_CALLS):
                    continue
                shell = next((k.value for k in node.keywords if k.arg == "shell"), None)
                if callee in SHELLS or (
                    shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False)
                ):
                    found.append((node.lineno, f"{callee}(...) runs a shell"))
                    continue
                command = [*node.args, *(k.value for k in node.keywords if k.arg in COMMAND_KEYWORDS)]
                if any(self.reads_env(arg, names) for arg in command):
                    found.append((node.lineno, f"{callee}(...) runs a command read from the environment"))
        return sorted(set(found))


def findings(source: str) -> list[tuple[int, str]]:
    return _Module(ast.parse(source)).findings()


def production_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_production_module_runs_a_shell_or_a_command_from_the_environment():
    modules = production_modules()
    assert len(modules) > 50 and any(p.name == "run.py" and p.parent.name == "trial" for p in modules)
    bad = []
    for path in modules:
        for line, what in findings(path.read_text()):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not bad, "a production module runs a command a variable or a shell chose:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        # a shell, whatever its command
        "import subprocess\nsubprocess.run('ls', shell=True)",
        "import subprocess as sp\ndef f(flag):\n    sp.Popen(['ls'], shell=flag)",
        "from subprocess import check_output\ncheck_output('ls', shell=True)",
        "import os\nos.system('ls')",
        "from os import popen\npopen('ls')",
        # a command read from the environment, directly or through names, f-strings, lists, attributes
        "import os, subprocess\nsubprocess.run(os.environ['CMD'])",
        "import os, subprocess\ndef f():\n    subprocess.run([os.getenv('TOOL'), '-x'])",
        "import os, shlex, subprocess\ndef f():\n    c = os.environ.get('C')\n    p = shlex.split(f'{c} -v')\n"
        "    subprocess.check_call(args=p)",
        "from os import environ\nimport subprocess\ndef f():\n    subprocess.run(environ['C'].split())",
        "import os, subprocess\nCOMMAND = os.environ.get('C', 'true')\ndef f():\n    subprocess.run([COMMAND])",
        "import os, subprocess\nclass F:\n    def __init__(self):\n        self.cmd = os.environ['C']\n"
        "    def fire(self):\n        subprocess.Popen([self.cmd])",
        "import os\ndef f():\n    for c in os.environ.get('CMDS', '').split(','):\n        os.execvp(c, [c])",
    ],
)
def test_the_check_finds_a_shell_or_a_command_from_the_environment(source):
    assert findings(source), source


@pytest.mark.parametrize(
    "source",
    [
        # a fixed command, the environment handed on, a path from a parameter
        "import os, subprocess, sys\nsubprocess.run([sys.executable, '-m', 'pip'], env={**os.environ, 'A': '1'})",
        "import os, subprocess\ndef f(cache):\n    subprocess.run(['ls', str(cache)], cwd=os.environ.get('HOME'))",
        "import os\ndef f():\n    c = os.environ.get('C')\n    print(c)\n    os.makedirs('x', exist_ok=True)",
        "import subprocess\nsubprocess.run(['ls'], shell=False)",
    ],
)
def test_the_check_lets_fixed_commands_pass(source):
    assert findings(source) == [], source


def test_the_check_finds_the_fault_injection_of_environment_variables():
    """Environment-driven fault injection (a command from ``RPSFT_INJECT_COMMAND`` run through a shell by a
    trial) is found on both counts."""
    source = '''
import os
import subprocess

ENV_COMMAND = "RPSFT_INJECT_COMMAND"


class _Fault:
    def fire(self, where):
        command = os.environ.get(ENV_COMMAND)
        if command:
            subprocess.run(command, shell=True, check=True, timeout=120)
            return
        raise RuntimeError(where)
'''
    assert findings(source) == [(12, "subprocess.run(...) runs a shell")]
    assert findings(source.replace("shell=True, ", "")) == [
        (12, "subprocess.run(...) runs a command read from the environment")
    ]
