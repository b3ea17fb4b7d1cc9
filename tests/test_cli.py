"""The ``rpsft`` command line: one grammar (verbs under ``sweep``, one option name per concept), the old
spellings still accepted with a notice, and one error handler (bad input exits 2, a bug keeps its traceback).
No model is loaded: each command is stopped where it hands its parsed input to the package that does the work."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer
from rpsft.core.errors import InputError
from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()
RENAMED = {"--root", "--output", "--output-dir", "--work-dir"}


def commands(group: click.Command, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    found = {}
    for name, command in getattr(group, "commands", {}).items():
        found[(*path, name)] = command
        found.update(commands(command, (*path, name)))
    return found


def visible_commands(group: click.Command) -> set[str]:
    return {name for name, command in group.commands.items() if not command.hidden}


def test_sweep_verbs_and_hidden_old_spellings():
    root = typer.main.get_command(app)
    assert visible_commands(root.commands["sweep"]) == {"run", "resume", "select", "report"}
    assert {"select", "report"} <= set(root.commands) and not ({"select", "report"} & visible_commands(root))
    help_text = runner.invoke(app, ["--help"]).output
    assert "sweep" in help_text and "eval" in help_text and "train" in help_text


def test_one_option_name_per_concept():
    """No command declares a renamed option; the output path is --out and the stored sweeps --runs-dir."""
    declared = {}
    for path, command in commands(typer.main.get_command(app)).items():
        for param in command.params:
            if param.param_type_name == "option":
                declared[path, param.name] = set(param.opts)
    assert declared, "no options found"
    everywhere = set().union(*declared.values())
    assert not (RENAMED & everywhere)
    for (path, name), opts in declared.items():
        if name == "out":
            assert "--out" in opts, path
        if name == "runs_dir":
            assert opts == {"--runs-dir"}, path
    assert declared[("eval",), "samples"] == {"--samples"}
    assert [path for (path, name) in declared if name == "runs_dir"]  # the concept exists and has one name


STOPPED = "stopped before any work"
# where each command hands over its parsed input: (module, function)
HANDOVERS = (
    ("rpsft.core.config", "load_train_config"),
    ("rpsft.evaluation.settings", "load_eval_settings"),
    ("rpsft.sweeps.config", "load_sweep_config"),
    ("rpsft.sweeps.runner", "resume_sweep"),
    ("rpsft.sweeps.stages.report", "load_selection"),
    ("rpsft.dashboards.sweep_data", "load_sweep_data"),
    ("rpsft.sweeps.stages.regression", "regress"),
)


@pytest.fixture
def handovers(monkeypatch) -> list:
    """Each hand-over function replaced by one that records its call and stops the command with bad input."""
    import importlib

    calls: list = []
    for module_name, function in HANDOVERS:

        def record(*args, _name=f"{module_name}.{function}", **kwargs):
            calls.append((_name, args, kwargs))
            raise InputError(STOPPED)

        monkeypatch.setattr(importlib.import_module(module_name), function, record)
    return calls


def _run(args: list[str], calls: list) -> tuple[list, list[str]]:
    calls.clear()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and f"error: {STOPPED}" in result.output, result.output
    return list(calls), [line for line in result.output.splitlines() if line.startswith("notice:")]


@pytest.mark.parametrize(
    ("new", "old", "named"),
    [
        (["train", "--out", "X"], ["train", "--output-dir", "X"], "--output-dir"),
        (["eval", "--samples", "3"], ["eval", "--k", "3"], "--k"),
        (["eval", "--samples=3"], ["eval", "--k=3"], "--k"),
        (
            ["sweep", "run", "c.yaml", "--name", "n"],
            ["sweep", "c.yaml", "--name", "n"],
            "rpsft sweep run CONFIG",
        ),
        (["sweep", "resume", "s", "--runs-dir", "X"], ["sweep", "resume", "s", "--root", "X"], "--root"),
        (
            ["sweep", "select", "s", "--runs-dir", "X"],
            ["select", "s", "--runs-dir", "X"],
            "rpsft sweep select",
        ),
        (
            ["sweep", "report", "s", "--runs-dir", "X"],
            ["report", "s", "--runs-dir", "X"],
            "rpsft sweep report",
        ),
        (
            ["regress", "--config", "c", "--baseline", "b", "--runs-dir", "X"],
            ["regress", "--config", "c", "--baseline", "b", "--work-dir", "X"],
            "--work-dir",
        ),
    ],
)
def test_an_old_spelling_makes_the_same_call_with_one_notice(handovers, new, old, named):
    new_calls, new_notices = _run(new, handovers)
    old_calls, old_notices = _run(old, handovers)
    assert len(new_calls) == 1 and not new_notices
    assert old_calls == new_calls
    assert len(old_notices) == 1 and named in old_notices[0] and "deprecated" in old_notices[0], old_notices
    assert "X" in repr(new_calls) or "3" in repr(new_calls) or "c.yaml" in repr(new_calls)


def test_an_old_command_with_an_old_option_names_both(handovers):
    calls, notices = _run(["select", "s", "--root", "X"], handovers)
    assert calls == _run(["sweep", "select", "s", "--runs-dir", "X"], handovers)[0]
    assert len(notices) == 2 and "rpsft sweep select" in notices[0] and "--runs-dir" in notices[1]


def test_options_reach_the_package_under_their_own_field(handovers):
    (call,) = _run(["train", "--out", "runs/x", "--k", "8"], handovers)[0]
    assert call[1][1]["output_dir"] == "runs/x" and call[1][1]["k"] == 8  # train --k stays the protected rank
    (call,) = _run(["eval", "--samples", "3"], handovers)[0]
    assert call[1][1]["k"] == 3
    (call,) = _run(["sweep", "resume", "s", "--runs-dir", "elsewhere"], handovers)[0]
    assert str(call[2]["root"]) == "elsewhere"


def test_bad_input_exits_2_without_a_traceback_and_a_bug_keeps_it(monkeypatch):
    import rpsft.core.config

    result = runner.invoke(app, ["train", "--k", "abc"])
    assert result.exit_code == 2 and "error: --k: 'abc' is not a number" in result.output
    assert "Traceback" not in result.output

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(rpsft.core.config, "load_train_config", bug)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)  # not turned into exit 2


def test_python_dash_m_rpsft_runs_the_app(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rpsft", "sweep", str(tmp_path / "none.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "notice:" in proc.stderr and "rpsft sweep run CONFIG" in proc.stderr
    assert "none.yaml" in proc.stderr and "Traceback" not in proc.stderr
