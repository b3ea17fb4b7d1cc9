"""Property-based fuzzing of every config reader and of data rows (hypothesis).

Each example changes one field of a valid config to an arbitrary value (or adds an unknown field). Then either
the config is valid and round-trips through its dump, or it fails with the reader's bad-input error, naming
the field; through the CLI it exits 2 before anything is computed and prints no traceback.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import yaml
from conftest import PAPER_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpsft.core.config import ConfigError, TrainConfig, load_train_config
from rpsft.core.data import DataError, row_to_messages
from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()
TALLY: collections.Counter = collections.Counter()  # (reader, outcome) -> examples, printed by the last test
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**9), max_value=10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["sft", "rpsft", "auto", "all", "attn", "0:4", "-1", "1e-3", "{}", "[]", ""]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["low", "high", "log", "types", "layers", "x"]), scalars, max_size=3),
)


def _yaml_file(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _cli_refuses(args: list[str], field: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert "Traceback" not in result.output
    assert field in result.output, (field, result.output)


# ------------------------------------------------------------------------------------------------- train


TRAIN_FIELDS = [name if info.alias is None else info.alias for name, info in TrainConfig.model_fields.items()]


@FUZZ
@given(field=st.sampled_from([*TRAIN_FIELDS, "unknown_knob"]), value=values)
def test_train_config(tmp_path_factory, field, value):
    raw = {"method": "rpsft", "k": 8, "max_steps": 2, field: value}
    path = _yaml_file(tmp_path_factory.mktemp("train"), raw)
    try:
        config = load_train_config(path)
    except ConfigError as exc:
        TALLY["train", "refused"] += 1
        assert field in str(exc), str(exc)
        _cli_refuses(["train", "--config", str(path)], field)
        return
    TALLY["train", "valid"] += 1
    dumped = config.model_dump(mode="json", by_alias=True)
    assert TrainConfig.model_validate(json.loads(json.dumps(dumped))) == config


# ------------------------------------------------------------------------------------------------- sweep


def _valid_sweep(tmp_path: Path) -> dict:
    return {
        "name": "fuzz",
        "model": "smollm2-135m-instruct",
        "data": "demo-math:16",
        "output_dir": str(tmp_path / "sweeps"),
        "train": {"max_steps": 2, "batch_size": 2, "max_length": 64},
        "space": {"k": [4, 8], "lambda": {"low": 0.1, "high": 10.0, "log": True}, "layers": ["all"]},
        "references": ["sft"],
        "evaluation": {"data_dir": str(PAPER_DATA), "loss": {"n_id": 2, "n_ood": 2}},
        "search": {"num_trials": 2},
    }


SWEEP_PATHS = [
    ("name",),
    ("data",),
    ("seed",),
    ("concurrency",),
    ("algorithm",),
    ("train", "max_steps"),
    ("train", "learning_rate"),
    ("train", "method"),
    ("space", "k"),
    ("space", "lambda"),
    ("space", "layers"),
    ("space", "period"),
    ("references",),
    ("evaluation", "every"),
    ("evaluation", "loss", "n_id"),
    ("evaluation", "loss", "ood_benchmarks"),
    ("evaluation", "intervals", "level"),
    ("objective", "metric"),
    ("objective", "betas"),
    ("search", "num_trials"),
    ("scheduler", "type"),
    ("resources", "cpus"),
    ("failure", "max_retries"),
    ("storage", "optuna"),
    ("bogus",),
]


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
@FUZZ
@given(where=st.sampled_from(SWEEP_PATHS), value=values)
def test_sweep_config(tmp_path_factory, where, value):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import SweepConfig, load_sweep_config

    tmp_path = tmp_path_factory.mktemp("sweep")
    raw = _valid_sweep(tmp_path)
    node = raw
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    path = _yaml_file(tmp_path, raw)
    field = where[-1]
    try:
        config = load_sweep_config(path)
    except SweepConfigError as exc:
        TALLY["sweep", "refused"] += 1
        assert field in str(exc), str(exc)
        _cli_refuses(["sweep", "run", str(path)], field)
        return
    TALLY["sweep", "valid"] += 1
    dumped = json.loads(config.model_dump_json(by_alias=True))
    assert SweepConfig.model_validate(dumped) == config


# -------------------------------------------------------------------------------------------- eval, regress

EVAL_FIELDS = ["suite", "exclude", "subset", "k", "pass_k", "max_new_tokens", "batch_size", "limit",
               "temperature", "top_p", "betas", "backend", "benchmarks", "bogus"]  # fmt: skip


@FUZZ
@given(field=st.sampled_from(EVAL_FIELDS), value=values)
def test_eval_settings(tmp_path_factory, field, value):
    from rpsft.evaluation.benchmarks import EvalConfigError
    from rpsft.evaluation.settings import EvalSettings, load_eval_settings

    path = _yaml_file(tmp_path_factory.mktemp("eval"), {field: value})
    try:
        config = load_eval_settings(path)
    except EvalConfigError as exc:
        TALLY["eval", "refused"] += 1
        assert field in str(exc), str(exc)
        return
    TALLY["eval", "valid"] += 1
    assert EvalSettings.model_validate(json.loads(config.model_dump_json())) == config


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
@FUZZ
@given(field=st.sampled_from(["tolerances", "operating_point", "bogus", "metric", "abs", "rel", "direction"]),
       value=values)  # fmt: skip
def test_regression_config(tmp_path_factory, field, value):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.stages.regression import RegressionConfig, load_regression_config

    tmp_path = tmp_path_factory.mktemp("regress")
    raw = {"sweep": _valid_sweep(tmp_path), "tolerances": [{"metric": "g_id", "abs": 0.01}]}
    if field in ("metric", "abs", "rel", "direction"):
        raw["tolerances"][0][field] = value
    else:
        raw[field] = value
    path = _yaml_file(tmp_path, raw)
    try:
        config = load_regression_config(path)
    except SweepConfigError as exc:
        TALLY["regress", "refused"] += 1
        assert field in str(exc), str(exc)
        _cli_refuses(["regress", "--config", str(path), "--baseline", str(tmp_path / "none.json")], field)
        return
    TALLY["regress", "valid"] += 1
    assert RegressionConfig.model_validate(json.loads(config.model_dump_json())) == config


# ------------------------------------------------------------------------------------------------ data rows

messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 3]), "content": scalars}),
    max_size=3,
)
rows = st.one_of(
    values,
    st.fixed_dictionaries({"messages": st.one_of(messages, values)}),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=8), messages, values), "response": scalars}),
    st.fixed_dictionaries({"problem": scalars, "solution": scalars}),
)


@FUZZ
@given(row=rows)
def test_data_rows(row):
    try:
        converted = row_to_messages(row, "data.jsonl:7")
    except DataError as exc:
        TALLY["data row", "refused"] += 1
        assert str(exc).startswith("data.jsonl:7: ") and "Fix:" in str(exc), str(exc)
        return
    TALLY["data row", "valid"] += 1
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in converted)
    assert any(m["role"] == "assistant" and m["content"].strip() for m in converted)
    assert row_to_messages({"messages": converted}, "again") == converted  # round trip


def test_zz_tally():
    """The fuzzing's figures (run with -s to see them): every refusal above named its field, exited 2 and
    printed no traceback."""
    for (reader, outcome), count in sorted(TALLY.items()):
        print(f"fuzz {reader:9s} {outcome:8s} {count}")
    refused = sum(count for (_, outcome), count in TALLY.items() if outcome == "refused")
    assert refused > 0 or not TALLY
