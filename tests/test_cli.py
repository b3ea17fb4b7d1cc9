"""The ``rpsft`` command line: one grammar (verbs under ``sweep``, one option name per concept), one error handler
(bad input exits 2 naming the user's own option or field and the fix, a bug keeps its traceback), and help
screens that read cleanly. No model is loaded: each command is stopped where it hands its parsed input to the
package that does the work, or refused before."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
import typer
import yaml
from rpsft.core.cli_errors import InputErrorGroup
from rpsft.core.cli_help import RpsftCommand
from rpsft.core.errors import InputError
from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()


def commands(group: click.Command, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    found = {}
    for name, command in getattr(group, "commands", {}).items():
        found[(*path, name)] = command
        found.update(commands(command, (*path, name)))
    return found


def _refused(args: list[str]) -> str:
    """The output of a command that must exit 2 (bad input) without a traceback."""
    result = runner.invoke(app, args, prog_name="rpsft")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_sweep_verbs_and_no_hidden_commands():
    root = typer.main.get_command(app)
    assert set(root.commands["sweep"].commands) == {"run", "resume", "select", "report"}
    assert not {"select", "report"} & set(root.commands)  # the verbs live under `sweep` only
    assert not [path for path, command in commands(root).items() if command.hidden]
    for path, command in commands(root).items():  # every command lays out its help the same way
        assert isinstance(command, InputErrorGroup if hasattr(command, "commands") else RpsftCommand), path


def test_one_option_name_per_concept():
    """The output path is --out and the stored sweeps --runs-dir, wherever a command takes them."""
    declared = {}
    for path, command in commands(typer.main.get_command(app)).items():
        for param in command.params:
            if param.param_type_name == "option":
                declared[path, param.name] = set(param.opts)
    assert declared, "no options found"
    for (path, name), opts in declared.items():
        if name == "out":
            assert "--out" in opts, path
        if name == "runs_dir":
            assert opts == {"--runs-dir"}, path
    assert declared[("eval",), "samples"] == {"--samples"}
    assert [path for (path, name) in declared if name == "runs_dir"]  # the concept exists and has one name


def test_an_unknown_option_or_command_exits_2_naming_it():
    output = _refused(["train", "--output-dir", "X"])
    assert "No such option: --output-dir" in output and "rpsft train --help" in output
    output = _refused(["sweep", "c.yaml"])
    assert "No such command 'c.yaml'" in output


STOPPED = "stopped before any work"
# where each command hands over its parsed input: (module, function)
HANDOVERS = (
    ("rpsft.core.config", "load_train_config"),
    ("rpsft.evaluation.settings", "load_eval_settings"),
    ("rpsft.sweeps.config.sweep", "load_sweep_config"),
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


def _handed_over(args: list[str], calls: list) -> list:
    calls.clear()
    assert f"error: {STOPPED}" in _refused(args)
    return list(calls)


def test_options_reach_the_package_under_their_own_field(handovers):
    (call,) = _handed_over(["train", "--out", "runs/x", "--k", "8"], handovers)
    assert call[1][1]["output_dir"] == "runs/x" and call[1][1]["k"] == 8  # train --k stays the protected rank
    (call,) = _handed_over(["eval", "--samples", "3"], handovers)
    assert call[1][1]["k"] == 3
    (call,) = _handed_over(["sweep", "run", "c.yaml", "--name", "n"], handovers)
    assert call[1] == ("c.yaml", {"name": "n"})
    (call,) = _handed_over(["sweep", "resume", "s", "--runs-dir", "elsewhere"], handovers)
    assert str(call[2]["root"]) == "elsewhere"
    (call,) = _handed_over(["sweep", "select", "s", "--runs-dir", "X", "--beta", "0.5"], handovers)
    assert call[1] == ("s",) and str(call[2]["root"]) == "X" and call[2]["beta"] == 0.5
    (call,) = _handed_over(["sweep", "report", "s", "--runs-dir", "X"], handovers)
    assert call[1] == ("s", Path("X"))
    (call,) = _handed_over(["regress", "--config", "c", "--baseline", "b", "--runs-dir", "X"], handovers)
    assert call[2]["work_dir"] == Path("X")


def test_train_names_the_options_of_bad_values_and_the_fields_of_a_bad_file(tmp_path):
    output = _refused(["train", "--max-steps", "-3", "--lambda", "-1", "--out", str(tmp_path)])
    assert "--max-steps -3: input should be greater than 0" in output
    assert "--lambda -1.0: lambda must be >= 0" in output
    assert "max_steps:" not in output and "Fix: change the value(s) above" in output
    bad = tmp_path / "train.yaml"
    bad.write_text("max_steps: -3\n")
    output = _refused(["train", "--config", str(bad), "--lambda", "2"])
    assert "max_steps: Input should be greater than 0" in output and "--lambda" not in output


def test_bad_input_exits_2_without_a_traceback_and_a_bug_keeps_it(monkeypatch):
    import rpsft.core.config

    assert "error: --k: 'abc' is not a number" in _refused(["train", "--k", "abc"])

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(rpsft.core.config, "load_train_config", bug)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)  # not turned into exit 2


def test_python_dash_m_rpsft_runs_the_app(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rpsft", "sweep", "run", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "none.yaml" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ the messages


def test_a_bad_sweep_name_says_which_characters_and_gives_an_example(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"name": "bad name!"}))
    output = _refused(["sweep", "run", str(config)])
    assert "name: 'bad name!' is not a sweep name" in output
    assert "letters, digits, '.', '_' and '-'" in output and "Fix: e.g. demo-1" in output
    assert "pattern" not in output
    output = _refused(["sweep", "run", str(config), "--name", "x y"])
    assert "--name: 'x y' is not a sweep name" in output and "Fix: e.g. demo-1" in output
    config.write_text(yaml.safe_dump({"name": "ok", "search": {"warm_start": ["earlier!"]}}))
    assert "search.warm_start[0]: 'earlier!' is not a sweep name" in _refused(["sweep", "run", str(config)])


def test_eval_names_the_option_not_the_field():
    output = _refused(["eval", "--samples", "0"])
    assert "--samples 0: input should be greater than or equal to 1" in output and "Fix:" in output
    assert " k:" not in output and "- k" not in output
    output = _refused(["eval", "--beta", "x", "--subset", "all"])
    assert "--beta x:" in output and "--subset all: input should be 'full' or 'test'" in output


@pytest.mark.parametrize("beta", ["-1", "nan", "inf"])
def test_select_refuses_a_beta_that_is_not_a_forgetting_weight(beta, handovers):
    output = _refused(["sweep", "select", "s", "--beta", beta])
    assert "--beta:" in output and "beta >= 0" in output and "Fix: e.g. --beta 1" in output
    assert not handovers  # refused before any stored sweep is read


def test_a_missing_local_model_fails_without_a_preflight_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in (
        str(tmp_path / "none"),
        "./none",
        "../none",
        "~/no-such-model-here",
        "models/none",
        "x.gguf",
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = _refused(["train", "--model", model, "--max-steps", "1", "--out", str(tmp_path / "out")])
        assert f"model: no such directory or file {model}. Fix:" in output, output
        assert "huggingface-cli" not in output and not caught, [str(w.message) for w in caught]
    assert sorted(os.listdir(tmp_path)) == ["models"]  # nothing written


def test_only_a_hub_id_gets_the_hub_advice(tmp_path):
    from rpsft.core.errors import ModelSourceError
    from rpsft.core.memory.dims import looks_local, model_dims_for

    assert not looks_local("HuggingFaceTB/SmolLM2-135M-Instruct") and not looks_local("gpt2")
    assert looks_local(str(tmp_path / "x")) and looks_local("~/x") and looks_local("./x")
    with pytest.raises(ModelSourceError, match=r"huggingface-cli download no-such-org/no-such-model"):
        model_dims_for("no-such-org/no-such-model", local_files_only=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError) as refused:
        model_dims_for(str(broken), local_files_only=True)
    assert "huggingface-cli" not in str(refused.value) and "Fix: check that" in str(refused.value)


def _refused_sweep_config(tmp_path: Path, **overrides) -> Path:
    raw = {
        "name": "refused",
        "references": ["sft"],
        "output_dir": str(tmp_path / "sweeps"),
        "cache_dir": str(tmp_path / "cache"),
        "evaluation": {"data_dir": str(tmp_path / "no-data")},
        **overrides,
    }
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_sweep_refused_for_its_inputs_leaves_no_files(tmp_path):
    output = _refused(["sweep", "run", str(_refused_sweep_config(tmp_path))])
    assert "evaluation: data_dir:" in output and "Fix:" in output
    assert not (tmp_path / "sweeps").exists()
    missing = str(tmp_path / "no-model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = _refused(["sweep", "run", str(_refused_sweep_config(tmp_path, model=missing))])
    assert f"model: no such directory or file {missing}. Fix:" in output and not caught
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_refused_after_its_storage_leaves_what_existed_before(tmp_path, monkeypatch):
    """A refusal after the storage check (here: the resources) removes the storage files and folders this run
    made, and nothing that was there before."""
    import sqlite3

    from rpsft.sweeps import preflight, runner
    from rpsft.sweeps.config.errors import SweepConfigError

    def too_many_cpus(config, cluster):
        raise SweepConfigError("resources.cpus: more CPUs than the cluster has. Fix: fewer")

    monkeypatch.setattr(preflight, "check_inputs", lambda config, scorer: None)
    monkeypatch.setattr(runner, "init_ray", lambda address, hooks=False: {"CPU": 1.0})
    monkeypatch.setattr(preflight, "check_resources", too_many_cpus)
    config = _refused_sweep_config(tmp_path)
    output = _refused(["sweep", "run", str(config)])
    assert "resources.cpus: more CPUs" in output
    assert not (tmp_path / "sweeps").exists()  # its optuna.db, driver.lock and the shared mlflow.db went

    earlier = tmp_path / "sweeps" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "sweep.json").write_text("{}")
    sqlite3.connect(tmp_path / "sweeps" / "mlflow.db").close()  # another sweep's tracking store
    _refused(["sweep", "run", str(config)])
    assert sorted(os.listdir(tmp_path / "sweeps")) == ["earlier", "mlflow.db"]
    assert (earlier / "sweep.json").read_text() == "{}"


def test_a_refusal_keeps_a_shared_store_another_sweep_wrote_to_meanwhile(tmp_path):
    """The shared ``mlflow.db`` did not exist when this run started, but another sweep created it and logged a
    run before this one was refused: it stays. The refused run's own empty database goes."""
    from rpsft.sweeps.driver_guard import NotYetThere
    from rpsft.sweeps.store import tracking
    from rpsft.sweeps.store.sweep_store import SweepStore

    root = tmp_path / "sweeps"
    shared, own = root / "mlflow.db", root / "refused" / "optuna.db"
    created = NotYetThere.now(SweepStore(root, "refused"), [shared, own])
    assert shared in created.files and own in created.files

    client = tracking.client_for(f"sqlite:///{shared}")  # the other sweep
    experiment = tracking.ensure_experiment(client, "rpsft-sweeps", None)
    other = tracking.create_parent_run(client, experiment, "other", {})
    own.parent.mkdir(parents=True)
    from rpsft.sweeps.store.optuna_storage import optuna_storage

    optuna_storage(f"sqlite:///{own}")  # the refused run's own store: tables, no study

    created.remove()
    assert not own.parent.exists()
    import sqlite3

    with sqlite3.connect(shared) as db:  # the other sweep's store is still there, with its run
        assert db.execute("SELECT run_uuid FROM runs").fetchall() == [(other,)]


@pytest.mark.parametrize(
    "args",
    [
        ["sweep", "select", "../sweeps/demo"],
        ["sweep", "resume", "../sweeps/demo"],
        ["sweep", "report", "../sweeps/demo"],
        ["export", "../sweeps/demo"],
        ["rl", "--from", "../sweeps/demo"],
    ],
)
def test_a_sweep_name_that_is_a_path_is_refused_with_the_runs_dir_fix(args, handovers):
    output = _refused(args)
    what = "--from" if "--from" in args else "NAME"
    assert f"{what}: '../sweeps/demo' is a path" in output
    assert (
        "Fix: pass the name and the folder that holds the sweep with --runs-dir, e.g. demo --runs-dir ../sweeps"
        in output
    )
    assert not handovers


def test_an_export_that_compared_nothing_says_so(tmp_path, monkeypatch):
    from rpsft.sweeps.analysis import stored_sweep
    from rpsft.sweeps.stages import checkpoints

    kept = checkpoints.Export("t1", "r1", tmp_path, "kept", {"g_id": 0.2, "f_ood": 0.1}, {}, 1e-4)
    assert kept.matches is None and kept.to_dict()["matches"] is None
    assert kept.check_text() == "not compared (kept weights, downloaded as stored)"
    close = checkpoints.Export("t1", "r1", tmp_path, "retrained", {"g_id": 0.2}, {"g_id": 0.20001}, 1e-4)
    far = checkpoints.Export("t1", "r1", tmp_path, "retrained", {"g_id": 0.2}, {"g_id": 0.3}, 1e-4)
    assert close.matches is True and far.matches is False and close.check_text().startswith("matches: g_id")

    monkeypatch.setattr(stored_sweep, "load_stored_sweep", lambda name, root: None)
    monkeypatch.setattr(checkpoints, "export_trial", lambda *args, **kwargs: kept)
    result = runner.invoke(app, ["export", "demo", "--trial", "op", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[: result.output.rindex("}") + 1])
    assert payload["matches"] is None and "check:      not compared" in result.output


@pytest.mark.parametrize(
    "args",
    [["--help"], ["sweep", "--help"], ["sweep", "run", "--help"], ["eval", "--help"], ["train", "--help"]],
)
def test_help_screens_read_cleanly(args):
    result = runner.invoke(app, args, prog_name="rpsft")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "{" not in result.output
    if args == ["sweep", "run", "--help"]:
        assert "Usage: rpsft sweep run [OPTIONS] CONFIG" in result.output


def test_each_command_is_listed_by_one_short_sentence():
    root = typer.main.get_command(app)
    for path, command in commands(root).items():
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert first and "\n" not in first and len(first) <= 70, (path, first)
        assert first.endswith(".") and first.count(". ") == 0, (path, first)
    listing = runner.invoke(app, ["--help"]).output
    assert "Diagnose tuned checkpoints against their base." in listing
    assert "Export a trial's weights (safetensors + tokenizer)." in listing


def test_rpsft_downloads_its_json_artifacts_without_progress_bars(tmp_path, capfd, monkeypatch):
    from rpsft.sweeps.store import tracking

    monkeypatch.delenv(tracking.PROGRESS_BAR_VARIABLE, raising=False)
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.ensure_experiment(client, "bars", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    tracking.log_json_artifact(client, run_id, "scores.json", {"a": 1})
    capfd.readouterr()
    client.download_artifacts(run_id, "scores.json", str(tmp_path))  # MLflow's own call shows its bar
    assert "Downloading artifacts" in capfd.readouterr().err
    assert tracking.download_json(client, run_id, "scores.json") == {"a": 1}
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert tracking.PROGRESS_BAR_VARIABLE not in os.environ  # the user's setting is as it was
    monkeypatch.setenv(tracking.PROGRESS_BAR_VARIABLE, "true")
    assert tracking.download_json(client, run_id, "scores.json") == {"a": 1}
    assert os.environ[tracking.PROGRESS_BAR_VARIABLE] == "true"
