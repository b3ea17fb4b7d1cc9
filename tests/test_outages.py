"""Service outages in the middle of real sweeps: the MLflow tracking server killed with SIGKILL during a
trial's training and started again later; the Optuna storage's PostgreSQL stopped (every connection cut) just
as a trial hands its result to the driver, and started again later. Both services are the tests' own
(``tests/services.py``), so the machine's shared PostgreSQL is never touched. In both cases the sweep finishes
complete: no finished trial is lost, none is trained twice, and no step's metrics are missing."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import PAPER_DATA
from services import MlflowServer, PostgresCluster, postgres_missing
from sweep_helpers import fault_hooks, run_quietly, sweep_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_ray")]
needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
needs_postgres = pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))

DOWN_SECONDS = 8.0
STEPS = 4


def _sweep(name, tiny_dir, tmp_path, storage, hooks):
    raw = sweep_dict(
        name,
        tiny_dir,
        tmp_path,
        references=["sft", "lora"],
        search={"num_trials": 1, "seed": 0},
        storage=storage,
        hooks=hooks,
    )
    raw["train"] = {**raw["train"], "max_steps": STEPS, "logging_steps": 1}
    return raw


def _stamp(path) -> float:
    return float(path.read_text())


def _check_complete(outcome, client) -> None:
    """Every trial has exactly one run, FINISHED, with the loss of every step; the sweep chose a point."""
    from rpsft.sweeps.store import tracking

    runs = tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id)
    trial_ids = [run.data.tags[tracking.TAG_TRIAL] for run in runs]
    assert len(trial_ids) == 3 and len(set(trial_ids)) == 3, trial_ids  # no duplicate run
    assert {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(1, STEPS + 1)), (run.info.run_name, steps)
        assert run.data.metrics["resumed_from_step"] == 0  # trained once, from the start
        assert "g_id" in run.data.metrics and "f_ood" in run.data.metrics
    state = json.loads((outcome.sweep_dir / "sweep.json").read_text())
    assert state["status"] == "finished"
    assert outcome.selection is not None


@needs_paper_data
@pytest.mark.slow
def test_the_mlflow_server_killed_mid_training_and_restarted(tmp_path, tiny_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        script = server.outage_script(DOWN_SECONDS)
        hooks = fault_hooks(monkeypatch, match="[ref] sft", at_step=1, command=f"bash {script}")
        outcome = run_quietly(_sweep("mlflow-outage", tiny_dir, tmp_path, {"mlflow": server.url}, hooks))
        killed, restarted = _stamp(server.workdir / "killed_at"), _stamp(server.workdir / "restarted_at")
        assert restarted - killed >= DOWN_SECONDS  # the server really was down, during the sft trial
        assert outcome.tracking_uri == server.url
        _check_complete(outcome, MlflowClient(tracking_uri=server.url))
    finally:
        server.stop()


@needs_paper_data
@needs_postgres
@pytest.mark.slow
def test_the_optuna_postgresql_restarted_as_a_trial_reports(tmp_path, tiny_dir, monkeypatch, caplog):
    import optuna
    from mlflow.tracking import MlflowClient

    cluster = PostgresCluster(tmp_path / "pg")
    cluster.start()
    try:
        script = cluster.outage_script(DOWN_SECONDS)
        # the last reference: a searched trial follows
        hooks = fault_hooks(monkeypatch, match="[ref] lora", command=f"bash {script}")
        with caplog.at_level(logging.WARNING, logger="rpsft.sweeps.store.optuna_storage"):
            outcome = run_quietly(_sweep("pg-outage", tiny_dir, tmp_path, {"optuna": cluster.url}, hooks))
        retried = [r.getMessage() for r in caplog.records if "lost its connection" in r.getMessage()]
        assert retried, "the driver made no storage call during the outage"
        stopped, restarted = _stamp(cluster.workdir / "stopped_at"), _stamp(cluster.workdir / "restarted_at")
        assert restarted - stopped >= DOWN_SECONDS
        _check_complete(outcome, MlflowClient(tracking_uri=outcome.tracking_uri))
        study = optuna.load_study(study_name="pg-outage", storage=cluster.url)
        assert [t.state.name for t in study.trials] == ["COMPLETE"]  # the searched trial, told once
    finally:
        cluster.stop()


@pytest.fixture
def own_postgres(tmp_path):
    cluster = PostgresCluster(tmp_path / "pg")
    cluster.start()
    yield cluster
    cluster.stop()


@needs_postgres
def test_the_storage_waits_out_a_restart_and_fails_at_once_on_anything_else(own_postgres):
    """Without a driver: a study's calls made while its database is down succeed once it is back; a bad
    statement is not retried; an unreachable database at the start is reported at once, not waited for."""
    import subprocess
    import time

    import optuna
    import sqlalchemy.exc
    from rpsft.sweeps.store.optuna_storage import ReconnectingRDBStorage, optuna_storage

    storage = optuna_storage(own_postgres.url)
    assert isinstance(storage, ReconnectingRDBStorage)
    study = optuna.create_study(study_name="restart", storage=storage, direction="maximize")
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    script = own_postgres.outage_script(3.0)
    subprocess.run(["bash", str(script)], check=True)  # down now, back in 3 s
    t0 = time.monotonic()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a pooled connection, now dead
    study.tell(trial, 0.7)
    waited = time.monotonic() - t0
    stopped = float((own_postgres.workdir / "stopped_at").read_text())
    restarted = float((own_postgres.workdir / "restarted_at").read_text())
    assert restarted - stopped >= 3.0 and waited > 1.0  # the calls really waited for the restart
    reloaded = optuna.load_study(study_name="restart", storage=own_postgres.url)
    assert [t.value for t in reloaded.trials] == [0.5, 0.7]

    t0 = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError) as bad:
        storage.set_study_user_attr(study._study_id, "k" * 2000, 1)  # longer than the column: a bad statement
    assert isinstance(bad.value.__cause__, sqlalchemy.exc.DataError)
    assert time.monotonic() - t0 < 2.0  # not retried
    t0 = time.monotonic()
    unreachable = f"postgresql://postgres@127.0.0.1:{own_postgres.port + 1}/postgres"
    with pytest.raises(sqlalchemy.exc.OperationalError):
        optuna_storage(unreachable)
    assert time.monotonic() - t0 < 30
