"""The method table is the one source of what a method trains and reads: config validation, the knobs a trial
logs, the sweep's references, the README's table and the CLI's bad-input handling all follow it."""

import re
import typing
from pathlib import Path

import pytest
from rpsft.core.config import ConfigError, TrainConfig, load_train_config
from rpsft.core.errors import DataError, InputError
from rpsft.core.method_table import METHOD_NAMES, METHODS, Method, method_spec, methods_markdown
from rpsft.sweeps.trial.run import trial_knobs
from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_config_literal_and_the_sweep_references_accept_exactly_the_table():
    from rpsft.sweeps.config.space import Reference

    assert set(typing.get_args(Method)) == set(METHODS) == set(METHOD_NAMES)
    for name in METHODS:
        assert TrainConfig(method=name, k=8).method == name
        assert Reference(method=name).method == name
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="ppo")
    with pytest.raises(ValueError, match="Fix: one of sft, rpsft"):
        method_spec("ppo")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_logs_exactly_the_knobs_it_reads(name):
    config = TrainConfig(method=name, k=8, **{"lambda": 3.0}, lora_r=4)
    logged = trial_knobs(config, {})
    spec = METHODS[name]
    assert set(logged) == set(spec.knobs)
    assert ("k" in logged) == spec.uses_k
    assert ("lambda" in logged) == spec.uses_lambda
    if "lambda" in logged:
        assert logged["lambda"] == 3.0
    if "lora_r" in logged:
        assert logged["lora_r"] == 4


def test_references_without_k_log_no_k_or_lambda():
    for name in ("sft", "dft", "iw", "lora"):
        logged = trial_knobs(TrainConfig(method=name), {})
        assert "k" not in logged and "lambda" not in logged, name


def test_auto_k_logs_its_spec_and_the_resolved_fraction():
    config = TrainConfig(method="rpsft", k=0.125)
    logged = trial_knobs(config, {"k_spec": "auto", "k": 0.125})
    assert logged["k"] == "auto" and logged["k_resolved"] == 0.125


def test_effective_k_follows_the_table():
    assert TrainConfig(method="l2-init", k=8).effective_k == 1.0
    assert TrainConfig(method="rpsft", k=8).effective_k == 8
    for name in ("sft", "dft", "iw", "lora", "osf"):
        assert TrainConfig(method=name, k=8).effective_k == 0, name


def test_rules_that_depend_on_the_method():
    with pytest.raises(ValueError, match="k: osf freezes the top-k subspace and needs k > 0"):
        TrainConfig(method="osf", k=0)
    for name in ("rpsft", "l2-init", "rpsft-lora"):
        with pytest.raises(ValueError, match="lambda is 0"):
            TrainConfig(method=name, **{"lambda": 0.0})
    TrainConfig(method="sft", **{"lambda": 0.0})  # a knob sft never reads is not checked


def test_the_table_says_which_methods_train_over_several_workers():
    """``sharded`` alone decides: those methods pass the sharded checks (and are what the sharded code runs: no
    OSF adapters, no reference model, a token loss of its steps); the others are refused with the list."""
    from rpsft.core.sharded_method import check_sharded_method

    sharded = [name for name, spec in METHODS.items() if spec.sharded]
    assert 0 < len(sharded) < len(METHODS)
    for name, spec in METHODS.items():
        config = TrainConfig(method=name, k=8, resources={"workers": 2})
        if spec.sharded:
            assert check_sharded_method(config) is spec
            assert spec.adapter in (None, "lora") and not spec.reference_model and spec.loss in ("sft", "dft")
        else:
            with pytest.raises(ConfigError, match=rf"method: '{name}'.* runs only {', '.join(sharded)}\. Fix"):
                check_sharded_method(config)


def test_readme_method_table_is_the_generated_one():
    text = README.read_text()
    block = re.search(r"<!-- methods:begin -->\n(.*?)\n<!-- methods:end -->", text, re.S)
    assert block is not None
    assert block.group(1) == methods_markdown()
    for name in METHODS:
        assert f"| `{name}` |" in block.group(1)


def test_methods_command_prints_the_table():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert result.output.strip() == methods_markdown()


def test_a_yaml_syntax_error_is_bad_input_naming_the_file(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("method: rpsft\nk: [8, 16\n")
    with pytest.raises(ConfigError, match=r"(?s)train.yaml is not valid YAML.*Fix: correct the YAML syntax"):
        load_train_config(bad)
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2
    assert "is not valid YAML" in result.output and "Traceback" not in result.output


def test_a_failure_that_is_not_bad_input_keeps_its_traceback(tmp_path, monkeypatch):
    import rpsft.core.train

    def out_of_memory(config):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rpsft.core.train, "train", out_of_memory)
    result = runner.invoke(app, ["train", "--method", "sft", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError) and "out of memory" in str(result.exception)

    def bad_data(config):
        raise DataError("data: row 3 has no assistant turn. Fix: ...")

    monkeypatch.setattr(rpsft.core.train, "train", bad_data)
    result = runner.invoke(app, ["train", "--method", "sft", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "row 3 has no assistant turn" in result.output


def test_input_errors_are_the_value_and_file_errors_callers_already_catch():
    from rpsft.core.data import DataError
    from rpsft.core.errors import ModelSourceError
    from rpsft.sweeps.config.errors import SweepConfigError

    for error in (ConfigError, DataError, SweepConfigError):
        assert issubclass(error, InputError) and issubclass(error, ValueError)
    assert issubclass(ModelSourceError, InputError) and issubclass(ModelSourceError, FileNotFoundError)
