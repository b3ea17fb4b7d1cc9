"""The sweep store: the sweep directory's layout, ``sweep.json`` and the JSON records round trips, trial records
read from a real local MLflow (SQLite) store, and Phi computed in one place that agrees with the intervals' Phi."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rpsft.evaluation.intervals import TradeOffDraws
from rpsft.evaluation.metrics import phi
from rpsft.sweeps.analysis.points import trial_points
from rpsft.sweeps.analysis.selection import TrialPoint, select
from rpsft.sweeps.analysis.stored_sweep import StoredSweep
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore, TrialRecord
from sweep_helpers import log_trial_run


def _config(tmp_path, name="store-unit") -> SweepConfig:
    return SweepConfig.model_validate(
        {"name": name, "references": [{"method": "sft"}], "output_dir": str(tmp_path / "sweeps")}
    )


def test_one_layout_for_every_path_of_a_sweep(tmp_path):
    config = _config(tmp_path)
    store = SweepStore.of(config)
    top = (tmp_path / "sweeps" / "store-unit").resolve()
    assert store.dir == top == config.sweep_dir()
    expected = {
        store.state_file: "sweep.json",
        store.tune_dir: "tune",
        store.lock_file: "driver.lock",
        store.optuna_db: "optuna.db",
        store.bases_dir: "bases",
        store.rotation_base: "rotation_base.pt",
        store.base_item_scores: "base_item_scores.json",
        store.intervals: "intervals.json",
        store.ray_train_dir: "ray_train",
        store.trial_dir("t1"): "trials/t1",
        store.trial_model_dir("t1"): "trials/t1/model",
        store.export_dir("t1"): "exports/t1",
        store.rl_dir: "rl",
        store.rl_inits_dir: "rl/inits",
    }
    for path, relative in expected.items():
        assert path == top / relative
    # the driver's default Optuna storage is the store's, and a check-only TrainConfig stays in the sweep's dir
    from rpsft.sweeps.runner import storage_urls

    assert storage_urls(config)[0] == f"sqlite:///{store.optuna_db}"
    assert config.trial_train_config({"k": 4, "lambda": 1.0}).output_dir == str(store.dir)
    assert not store.dir.exists()  # naming paths creates nothing
    # a relative root is resolved once, so two spellings of one sweep are one store
    assert SweepStore(tmp_path / "sweeps" / ".." / "sweeps", "store-unit") == store


def test_state_round_trip_and_a_missing_sweep_names_the_fix(tmp_path):
    config = _config(tmp_path)
    store = SweepStore.of(config)
    with pytest.raises(
        SweepConfigError, match=r"name: no sweep 'store-unit'.*Fix: .*rpsft sweep run.*--runs-dir"
    ):
        store.read_state()
    assert not store.exists() and store.status() is None
    context = SweepContext(
        config=config.model_dump(mode="json", by_alias=True),
        tracking_uri="sqlite:///x.db",
        experiment_id="3",
        parent_run_id="parent",
        base_key="abc",
        cache_dir="/c",
        bases_dir=str(store.bases_dir),
        auto_k={"auto@0.9": 0.25},
    )
    store.write_state(config, context, "running", "sqlite:///o.db")
    raw = json.loads(store.state_file.read_text())  # the file itself, as `rpsft sweep resume` reads it
    assert raw == {
        "name": "store-unit",
        "status": "running",
        "optuna_storage": "sqlite:///o.db",
        "context": vars(context),
    }
    assert store.exists() and store.status() == "running"
    assert store.context() == context
    assert store.config() == config
    store.write_state(config, context, "finished", "sqlite:///o.db")
    assert store.status() == "finished" and not list(store.dir.glob("*.partial"))


def test_the_base_item_scores_and_intervals_round_trip_through_the_store(tmp_path):
    store = SweepStore.of(_config(tmp_path))
    assert store.read_base_item_scores() is None  # not written yet: the parent run's artifact is the fallback
    scores = {"id_nll": {"math500": [[1.25, 3]]}, "ood_nll": {"gpqa": [[2.5, 4]]}}
    store.write_base_item_scores(scores)
    assert store.read_base_item_scores() == scores
    assert json.loads(store.base_item_scores.read_text()) == scores
    store.write_intervals({"items": "all", "configurations": []})
    assert json.loads(store.intervals.read_text()) == {"items": "all", "configurations": []}
    assert not list(store.dir.glob("*.partial"))


def _log_trial(client, experiment_id, parent, trial_id, params, metrics, status="FINISHED", tags=None):
    return log_trial_run(client, experiment_id, parent, trial_id, params, metrics, tags=tags, status=status)


@pytest.fixture
def logged_sweep(tmp_path):
    """A sweep in a real SQLite MLflow store: a parent run with base metrics, four trial runs (a reference,
    two searched, one failed), an RL run and a run of another sweep, plus its ``sweep.json``."""
    config = _config(tmp_path)
    store = SweepStore.of(config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, "store-test")
    parent = tracking.create_parent_run(client, experiment_id, config.name, {"model": "m"})
    tracking.log_metrics(client, parent, {"base/nll/id/math500": 1.5, "base/nll/ood/gpqa": 2.5})
    other_parent = tracking.create_parent_run(client, experiment_id, "another", {})
    logged = {
        "sft": ({"method": "sft", "seed": 0, "reference": "sft"}, {"g_id": 0.30, "f_ood": 0.20}, "FINISHED"),
        "k8": (
            {"method": "rpsft", "k": 8, "lambda": 10.0, "seed": 0},
            {"g_id": 0.20, "f_ood": 0.05},
            "FINISHED",
        ),
        "k32": (
            {"method": "rpsft", "k": 32, "lambda": 1.0, "seed": 0},
            {"g_id": 0.25, "f_ood": 0.12},
            "FINISHED",
        ),
        "bad": ({"method": "rpsft", "k": 4, "lambda": 1.0, "seed": 0}, {"train_loss": 2.0}, "FAILED"),
    }
    run_ids = {}
    for trial_id, (params, metrics, status) in logged.items():
        tags = {tracking.TAG_REFERENCE: params["reference"]} if "reference" in params else {}
        if status == "FAILED":
            tags[tracking.TAG_FAILURE] = "FloatingPointError: loss is nan"
        run_ids[trial_id] = _log_trial(client, experiment_id, parent, trial_id, params, metrics, status, tags)
    _log_trial(
        client, experiment_id, parent, "rl-0", {}, {"g_id": 9.0, "f_ood": 0.0}, tags={tracking.TAG_ROLE: "rl"}
    )
    _log_trial(
        client, experiment_id, other_parent, "elsewhere", {"method": "sft"}, {"g_id": 9.0, "f_ood": 0.0}
    )
    context = SweepContext(
        config.model_dump(mode="json", by_alias=True), uri, experiment_id, parent, "", "", ""
    )
    store.write_state(config, context, "finished", "sqlite:///unused.db")
    return store, client, context, logged, run_ids


def test_trials_are_read_from_mlflow_into_one_record(logged_sweep):
    store, client, context, logged, run_ids = logged_sweep
    trials = store.trials(context)
    # only this sweep's trial runs, in start order; without a context the store reads it from sweep.json
    assert [t.trial_id for t in trials] == list(logged)
    assert store.trials() == trials
    by_id = {t.trial_id: t for t in trials}
    for trial_id, (params, metrics, status) in logged.items():
        record = by_id[trial_id]
        assert record.run_id == run_ids[trial_id] and record.status == status
        assert record.params == {k: str(v) for k, v in params.items()}  # as MLflow holds them
        assert record.metrics == pytest.approx(metrics)
        assert record.method == params["method"] and record.seed == params["seed"]
        assert record.finished == (status == "FINISHED")
        assert record.wall_seconds == (record.end_time - record.start_time) / 1000 >= 0
        for beta in (0.0, 0.5, 2.0):
            want = metrics["g_id"] - beta * metrics["f_ood"] if "g_id" in metrics else None
            assert record.phi(beta) == (pytest.approx(want) if want is not None else None)
    assert (
        by_id["sft"].reference == "sft" and by_id["sft"].label == "[ref] sft" and by_id["k8"].reference == ""
    )
    assert by_id["k8"].label == "rpsft k=8 lambda=10"  # the knobs it logged
    assert by_id["k8"].knobs == {"method": "rpsft", "k": "8", "lambda": "10.0"}
    assert by_id["bad"].failure == "FloatingPointError: loss is nan" and not by_id["bad"].done
    # the records' points are the finished trials', exactly
    points = trial_points(trials)
    assert [(p.trial_id, p.run_id, p.g_id, p.f_ood) for p in points] == [
        (t, run_ids[t], pytest.approx(logged[t][1]["g_id"]), pytest.approx(logged[t][1]["f_ood"]))
        for t in ("sft", "k8", "k32")
    ]
    rl = store.trials(context, role="rl")
    assert [t.trial_id for t in rl] == ["rl-0"]


def test_a_loaded_sweep_serves_selection_and_base_metrics(logged_sweep):
    store, client, context, logged, run_ids = logged_sweep
    stored = StoredSweep.read(store)
    assert [t.trial_id for t in stored.trials] == list(logged) and stored.context == context
    assert stored.base_metrics() == {"nll/id/math500": 1.5, "nll/ood/gpqa": 2.5}
    for beta in (0.0, 0.5, 2.0):
        finished = {t: m for t, (_, m, s) in logged.items() if s == "FINISHED"}
        # the max-Phi trial found by hand (no tie among these numbers at these betas)
        want = max(finished, key=lambda t: finished[t]["g_id"] - beta * finished[t]["f_ood"])
        assert stored.selection(beta).best.run_id == run_ids[want]
    assert [t.trial_id for t in stored.rl_runs()] == ["rl-0"]
    from rpsft.sweeps.stages.checkpoints import find_trial_run

    assert find_trial_run(stored, "sft").run_id == run_ids["sft"]
    assert find_trial_run(stored, "k32").trial_id == "k32"


def test_phi_is_one_function_on_floats_and_arrays_and_the_intervals_agree():
    rng = np.random.default_rng(0)
    g, f = rng.normal(size=50), rng.normal(size=50)
    for beta in (0.0, 0.3, 1.0, 4.0):
        assert np.allclose(phi(g, f, beta), [gi - beta * fi for gi, fi in zip(g, f, strict=True)])
        assert phi(0.25, 0.1, beta) == pytest.approx(0.25 - beta * 0.1)
    draws = TradeOffDraws(
        point_g={"a": 0.2, "b": 0.1},
        point_f={"a": 0.05, "b": -0.02},
        draws_g={"a": 0.2 + 0.01 * g, "b": 0.1 + 0.01 * f},
        draws_f={"a": 0.05 + 0.01 * f, "b": -0.02 + 0.01 * g},
    )
    for beta in (0.0, 0.5, 2.0):
        interval = draws.phi("a", beta)
        assert interval.estimate == pytest.approx(phi(0.2, 0.05, beta))
        quantiles = np.quantile(phi(draws.draws_g["a"], draws.draws_f["a"], beta), [0.025, 0.975])
        assert (interval.low, interval.high) == pytest.approx(tuple(quantiles))
        diff = draws.phi_difference("a", "b", beta)
        assert diff.estimate == pytest.approx(phi(0.2, 0.05, beta) - phi(0.1, -0.02, beta))
        point = TrialPoint("a", 0.2, 0.05)
        record = TrialRecord("a", "r", "a", "FINISHED", "finished", "", {}, {"g_id": 0.2, "f_ood": 0.05})
        assert point.phi(beta) == record.phi(beta) == interval.estimate
        assert select([point], beta).best.phi(beta) == interval.estimate
    assert math.isnan(phi(float("nan"), 0.0, 1.0))


def test_the_experiment_opens_as_model_training_in_mlflow_and_the_summary_names_the_venv_mlflow(
    tmp_path, monkeypatch
):
    import sys

    from rpsft.sweeps.cli import mlflow_command

    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, "kind")
    assert tracking.ensure_experiment(client, "kind") == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    assert mlflow_command() == ".venv/bin/mlflow"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not below the venv's folder: the absolute path
    assert mlflow_command() == str(tmp_path / ".venv" / "bin" / "mlflow")
