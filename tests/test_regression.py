"""``rpsft regress``: a fixed sweep against a stored baseline under declared tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import PAPER_DATA
from rpsft.sweeps.stages.regression import RegressionConfig, Tolerance, compare_metrics
from sweep_helpers import sweep_dict, tiny_model_dir
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def rules(*tolerances: dict) -> RegressionConfig:
    return RegressionConfig(sweep={}, tolerances=[Tolerance(**t) for t in tolerances])


def test_compare_respects_direction_and_tolerance():
    config = rules(
        {"metric": "g_id", "direction": "higher", "abs": 0.01},
        {"metric": "nll/*", "direction": "lower", "rel": 0.1},
        {"metric": "drift*", "direction": "both", "abs": 0.001},
    )
    baseline = {"a": {"g_id": 0.5, "nll/id/x": 2.0, "drift_mean": 0.1}, "gone": {"g_id": 0.1}}
    current = {
        "a": {"g_id": 0.485, "nll/id/x": 1.7, "drift_mean": 0.1005, "other": 9.0},
        "new": {"g_id": 0.3},
    }
    got = {(r.trial, r.metric): r.status for r in compare_metrics(baseline, current, config)}
    assert got == {
        ("a", "g_id"): "REGRESSED",  # fell by 0.015 > 0.01
        ("a", "nll/id/x"): "improved",  # fell by 0.3 > 10% of 2.0
        ("a", "drift_mean"): "ok",  # moved 5e-4 < 1e-3
        ("gone", "g_id"): "MISSING",
        ("new", "g_id"): "new",
    }  # "other" has no rule: not compared
    within = {"a": {"g_id": 0.495, "nll/id/x": 2.19, "drift_mean": 0.1}, "gone": {"g_id": 0.1}}
    assert not any(r.failed for r in compare_metrics(baseline, within, config))


@pytest.fixture(scope="module")
def regression_config(tmp_path_factory, smol_tokenizer):
    if not PAPER_DATA.is_dir():
        pytest.skip("shared/paper-data is not present")
    root = tmp_path_factory.mktemp("regress")
    sweep = sweep_dict(
        "regress-tiny",
        tiny_model_dir(root, smol_tokenizer),
        root,
        references=["sft", {"method": "rpsft", "k": 4, "lambda": 1.0, "layers": "attn"}],
        search={"num_trials": 0},
    )
    tolerances = [
        {"metric": "g_id", "direction": "higher", "abs": 0.01},
        {"metric": "f_ood", "direction": "lower", "abs": 0.01},
        {"metric": "nll/*/*", "direction": "lower", "abs": 0.01},
        {"metric": "train_loss", "direction": "lower", "abs": 0.01},
    ]

    def write(name: str, **train) -> str:
        raw = {**sweep, "name": name, "train": {**sweep["train"], **train}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"sweep": raw, "tolerances": tolerances, "operating_point": False}))
        return str(path)

    yield root, write
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cli(*args: str):
    from rpsft.cli import app

    return CliRunner().invoke(app, ["regress", *args])


@pytest.mark.slow
@pytest.mark.integration
def test_regress_passes_unchanged_and_fails_degraded(regression_config):
    root, write = regression_config
    config = write("regress-tiny")
    baseline = root / "baseline.json"

    created = cli("--config", config, "--baseline", str(baseline), "--update-baseline")
    assert created.exit_code == 0, created.output
    stored = json.loads(baseline.read_text())
    assert set(stored["metrics"]) == {"[ref] sft", "[ref] rpsft k=4 lambda=1 layers=attn"}
    assert {"g_id", "f_ood", "train_loss", "nll/id/math500"} <= set(stored["metrics"]["[ref] sft"])

    unchanged = cli("--config", config, "--baseline", str(baseline))
    assert unchanged.exit_code == 0, unchanged.output
    assert "no regression" in unchanged.output and "REGRESSED" not in unchanged.output

    # the same sweep with a learning rate 40x too high: the ID gain collapses and the training loss rises
    degraded = cli("--config", write("regress-tiny-degraded", learning_rate=0.2), "--baseline", str(baseline))
    assert degraded.exit_code == 1, degraded.output
    regressed = [line for line in degraded.output.splitlines() if line.rstrip().endswith("REGRESSED")]
    assert any(" g_id " in line for line in regressed), degraded.output
    assert json.loads(baseline.read_text()) == stored  # a failed comparison never rewrites the baseline


def test_regress_bad_input_fails_before_training(regression_config, tmp_path):
    root, write = regression_config
    missing = cli("--config", write("regress-tiny-missing"), "--baseline", str(tmp_path / "none.json"))
    assert missing.exit_code == 2 and "--update-baseline" in missing.output
    assert not (root / "sweeps" / "regress-tiny-missing").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sweep": "../nowhere.yaml", "tolerances": []}))
    result = cli("--config", str(bad), "--baseline", str(tmp_path / "b.json"), "--update-baseline")
    assert result.exit_code == 2 and "sweep:" in result.output


def test_shipped_regression_config_and_baseline_agree():
    from rpsft.sweeps.stages.regression import load_regression_config, read_baseline

    config = load_regression_config(REPO / "sweeps" / "configs" / "regress-smoke.yaml")
    baseline = read_baseline(REPO / "sweeps" / "baselines" / "regress-smoke.json")
    raw = yaml.safe_load((REPO / "sweeps" / "configs" / "regress-smoke.yaml").read_text())["sweep"]
    assert raw["search"]["num_trials"] == 0  # the baseline holds the references alone

    def reference_label(ref) -> str:  # the knobs as the YAML gives them: `[ref] rpsft k=8 lambda=10 ...`
        if isinstance(ref, str):
            return f"[ref] {ref}"
        knobs = [
            f"{key}={ref[key]:g}" if isinstance(ref[key], float) else f"{key}={ref[key]}"
            for key in ("k", "lambda", "layers")
            if key in ref
        ]
        return " ".join([f"[ref] {ref['method']}", *knobs])

    labels = {reference_label(ref) for ref in raw["references"]}
    assert len(labels) == len(raw["references"]) >= 2
    assert set(baseline["metrics"]) == labels
    for metrics in baseline["metrics"].values():
        assert all(config.rule_for(name) for name in metrics)
        assert {"g_id", "f_ood", "phi"} <= set(metrics)
