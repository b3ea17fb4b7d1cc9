"""Sweeps with the real services: Ray (local), MLflow (SQLite, a tracking server, PostgreSQL), Optuna storage
(SQLite, PostgreSQL); kill and resume; bad configs failing before any trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PAPER_DATA
from sweep_helpers import drop_pg_schema, pg_available, pg_schema, resume_cli, rpsft, sweep_dict
from sweep_helpers import run_quietly as run

pytestmark = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
needs_pg = pytest.mark.skipif(not pg_available(), reason="no PostgreSQL on 127.0.0.1:5432")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _ray_shutdown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def trial_runs(outcome):
    from rpsft.sweeps.store import tracking

    client = tracking.client_for(outcome.tracking_uri)
    return client, tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id)


def independent_best(client, runs, beta, sweep_dir):
    """The max-Phi finished trial, its Phi computed here from the stored item scores on the selection items of
    the default split (evaluation.split: report_fraction 0.5, seed 0), where the sweep chooses."""
    from rpsft.evaluation.item_split import ItemSplit
    from rpsft.sweeps.store.tracking import download_json

    base = json.loads((Path(sweep_dir) / "base_item_scores.json").read_text())
    split = ItemSplit(0.5, 0)

    def gain(items, key, suite, sign):
        diffs = []
        for bench, rows in base[key].items():
            idx, _ = split.indices(suite, bench, len(rows))

            def mean(r, idx=idx):
                return sum(r[i][0] for i in idx) / sum(r[i][1] for i in idx)

            diffs.append(sign * (mean(items[key][bench]) - mean(rows)))
        return sum(diffs) / len(diffs)

    def phi(run):
        items = download_json(client, run.info.run_id, "item_scores.json")
        return gain(items, "id_nll", "id", 1) - beta * gain(items, "ood_nll", "ood", -1)

    return max((r for r in runs if r.info.status == "FINISHED"), key=phi)


def optuna_states(name, url):
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    return [t.state.name for t in study.trials]


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_sqlite_asha_end_to_end(tmp_path, tiny_dir):
    raw = sweep_dict(
        "e2e", tiny_dir, tmp_path, evaluation={"every": 1}, scheduler={"type": "asha", "grace_steps": 1}
    )
    outcome = run(raw)
    client, runs = trial_runs(outcome)
    assert len(runs) == 5  # 2 references + 3 searched, one MLflow child run each
    assert len({r.data.tags["rpsft.trial_id"] for r in runs}) == 5
    assert {r.data.tags.get("rpsft.reference") for r in runs} >= {"sft", "l2-init"}
    for r in runs:
        assert r.info.status in ("FINISHED", "KILLED"), r.info.status
        if r.info.status == "KILLED":  # stopped by ASHA at its first rung
            assert r.data.tags["rpsft.state"] == "early-stopped"
            assert not r.data.tags.get("rpsft.reference")  # references are never stopped
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) >= 3
    sample = next(r for r in finished if r.data.params["method"] == "rpsft")
    for key in ("method", "k", "lambda", "layers", "period", "seed"):
        assert key in sample.data.params
    assert [m.step for m in client.get_metric_history(sample.info.run_id, "loss")] == [1, 2]
    assert client.get_metric_history(sample.info.run_id, "rpsft/penalty")
    assert client.get_metric_history(sample.info.run_id, "eval/objective")  # the rung at step 1
    assert {"g_id", "f_ood", "phi", "phi_at_0.5", "drift_mean"} <= set(sample.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(sample.info.run_id)}
    assert {"trial_config.json", "result.json", "train_metrics.json"} <= artifacts

    # the chosen point is the max-Phi finished trial, and only it carries the tag
    best = independent_best(client, runs, 1.0, outcome.sweep_dir)
    assert outcome.selection.best.run_id == best.info.run_id
    _, runs = trial_runs(outcome)
    tagged = [r.info.run_id for r in runs if r.data.tags.get("rpsft.operating_point") == "true"]
    assert tagged == [best.info.run_id]
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rpsft.operating_point_run"] == best.info.run_id

    # Optuna saw exactly the searched trials, each told (complete or pruned), none left running
    states = optuna_states("e2e", f"sqlite:///{outcome.sweep_dir / 'optuna.db'}")
    assert len(states) == 3 and set(states) <= {"COMPLETE", "PRUNED"}
    searched_finished = [r for r in finished if not r.data.tags.get("rpsft.reference")]
    assert states.count("COMPLETE") == len(searched_finished)

    # selection from the stored results alone, at another beta, matches brute force
    from rpsft.sweeps.stages.report import load_selection

    selection, _, _ = load_selection("e2e", root=outcome.sweep_dir.parent, beta=5.0)
    assert selection.best.run_id == independent_best(client, runs, 5.0, outcome.sweep_dir).info.run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


@needs_pg
@pytest.mark.slow
@pytest.mark.integration
def test_sweep_with_tracking_server_and_postgres_optuna(tmp_path, tiny_dir, mlflow_server):
    schema, optuna_url = pg_schema()
    try:
        raw = sweep_dict(
            "server",
            tiny_dir,
            tmp_path,
            search={"num_trials": 2, "seed": 1},
            objective={"mode": "pareto"},  # NSGA-II on (G_id up, F_ood down), trials run to completion
            space={**sweep_dict("x", tiny_dir, tmp_path)["space"], "k": ["auto@0.5"]},
            storage={"optuna": optuna_url, "mlflow": mlflow_server},
        )
        outcome = run(raw)
        client, runs = trial_runs(outcome)
        assert outcome.tracking_uri == mlflow_server
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
        best = independent_best(client, runs, 1.0, outcome.sweep_dir)
        assert outcome.selection.best.run_id == best.info.run_id
        import optuna

        study = optuna.load_study(study_name="server", storage=optuna_url)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        assert all(len(t.values) == 2 for t in study.trials)  # multi-objective
        searched = [r for r in runs if not r.data.tags.get("rpsft.reference")]
        for r in searched:  # k: auto@0.5 resolved once, before the trials, to a rank fraction
            assert r.data.params["k"] == "auto@0.5"
            assert 0.0 < float(r.data.params["k_resolved"]) <= 1.0
        assert len({r.data.params["k_resolved"] for r in searched}) == 1
    finally:
        drop_pg_schema(schema)


@needs_pg
@pytest.mark.slow
@pytest.mark.integration
def test_concurrent_trials_on_postgres_lose_nothing(tmp_path, tiny_dir):
    optuna_schema, optuna_url = pg_schema()
    mlflow_schema, mlflow_url = pg_schema()
    try:
        raw = sweep_dict(
            "concurrent",
            tiny_dir,
            tmp_path,
            search={"num_trials": 4, "seed": 2},
            concurrency=3,
            resources={"cpus": 0.5},
            storage={"optuna": optuna_url, "mlflow": mlflow_url},
        )
        outcome = run(raw)
        _, runs = trial_runs(outcome)
        assert len(runs) == 6
        assert len({r.data.tags["rpsft.trial_id"] for r in runs}) == 6
        assert all(r.info.status == "FINISHED" for r in runs)
        assert all("g_id" in r.data.metrics for r in runs)
        assert optuna_states("concurrent", optuna_url) == ["COMPLETE"] * 4
    finally:
        drop_pg_schema(optuna_schema)
        drop_pg_schema(mlflow_schema)


# ----------------------------------------------------------------------------------------------- kill / resume


@pytest.mark.slow
@pytest.mark.integration
def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path, tiny_dir):
    from mlflow.tracking import MlflowClient

    raw = sweep_dict("killme", tiny_dir, tmp_path, search={"num_trials": 4, "seed": 3})
    raw["train"]["max_steps"] = 3
    config_path = tmp_path / "killme.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "first.log", "w")
    first = rpsft("sweep", "run", str(config_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    db = tmp_path / "sweeps" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")

    def finished_runs():
        if not db.exists():
            return []
        try:
            exp = client.get_experiment_by_name("rpsft-sweeps")
            if exp is None:
                return []
            return [
                r
                for r in client.search_runs([exp.experiment_id], "tags.`rpsft.role` = 'trial'")
                if r.info.status == "FINISHED"
            ]
        except Exception:
            return []

    deadline = time.time() + 600
    while len(finished_runs()) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
    first.wait(30)
    before = {r.data.tags["rpsft.trial_id"]: r for r in finished_runs()}
    assert 2 <= len(before) < 6
    time.sleep(2)
    # a kill between Optuna's ask and Tune's next experiment checkpoint leaves a trial nothing will ever tell
    import optuna

    optuna_url = f"sqlite:///{tmp_path / 'sweeps' / 'killme' / 'optuna.db'}"
    optuna.load_study(study_name="killme", storage=optuna_url).ask()

    out = resume_cli("killme", tmp_path, timeout=900)

    exp = client.get_experiment_by_name("rpsft-sweeps")
    runs = client.search_runs([exp.experiment_id], "tags.`rpsft.role` = 'trial'")
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["rpsft.trial_id"], []).append(r)
    assert all(len(v) == 1 for v in by_trial.values())  # no duplicate run for any trial
    # a trial started after Tune's last experiment checkpoint is forgotten on restore and replaced: its run is
    # closed as lost, not left RUNNING, and the budget is met by finished trials
    lost = {t: v[0] for t, v in by_trial.items() if v[0].data.tags.get("rpsft.state") == "lost"}
    assert all(
        r.info.status == "KILLED" and "lost: started before" in r.data.tags["rpsft.failure"]
        for r in lost.values()
    )
    assert ("trial run(s) started before a crash that Tune never recorded" in out) == bool(lost)
    by_trial = {t: v for t, v in by_trial.items() if t not in lost}
    assert len(by_trial) == 6  # 2 references + 4 searched: none lost
    assert all(v[0].info.status == "FINISHED" for v in by_trial.values())
    for trial_id, old in before.items():  # finished before the kill: same run, not trained again
        if trial_id in lost:  # ... unless it finished after Tune's last experiment checkpoint: Tune forgot it
            continue
        new = by_trial[trial_id][0]
        assert new.info.run_id == old.info.run_id
        assert new.info.end_time == old.info.end_time
        assert new.data.metrics["train_seconds"] == old.data.metrics["train_seconds"]
        assert [m.step for m in client.get_metric_history(new.info.run_id, "loss")] == [1, 2, 3]
    state = json.loads((tmp_path / "sweeps" / "killme" / "sweep.json").read_text())
    assert state["status"] == "finished"
    states = optuna_states("killme", optuna_url)
    assert states.count("COMPLETE") == 4
    assert "RUNNING" not in states and states.count("FAIL") >= 1  # the orphan is closed, not left RUNNING
    assert "asked before a crash and never run: FAIL" in out


# ----------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "override, field",
    [
        ({"space": {"layers": ["all", "nope"]}}, "space.layers"),
        ({"space": {"lambda": {"low": 0.0, "high": 1.0, "log": True}}}, "space.lambda"),
        ({"space": {"lambda": [-1.0]}}, "space.lambda"),
        ({"space": {"k": []}}, "space.k"),
        ({"space": {"layers": []}}, "space.layers"),
        ({"references": [], "search": {"num_trials": 0}}, "nothing to run"),
        ({"train": {"lr_scheduler": "nope"}}, "train.lr_scheduler"),
        ({"objective": {"mode": "pareto"}, "scheduler": {"type": "asha"}}, "scheduler.type"),
        ({"resources": {"cpus": 0}}, "resources.cpus"),
        ({"resources": {"workers": 2, "gpus": 1}}, "gpus_per_worker: 1 and gpus: 0"),
        ({"resources": {"workers": 2}, "evaluation": {"every": 1}}, "evaluation.every"),
        (
            {"resources": {"workers": 2}, "references": ["sft", {"method": "osf", "k": 4}]},
            "sharded training runs only",
        ),
        ({"resources": {"workers": 2}, "train": {"mixed_precision": "fp16"}}, "fp16"),
    ],
)
def test_bad_config_names_the_field(tmp_path, tiny_dir, override, field):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config

    raw = sweep_dict("bad", tiny_dir, tmp_path, **override)
    if "space" in override:
        raw["space"] = {**sweep_dict("x", tiny_dir, tmp_path)["space"], **override["space"]}
    with pytest.raises(SweepConfigError, match=field.replace(".", r"\.")):
        parse_sweep_config(raw)


@pytest.mark.parametrize(
    "storage, concurrency, field",
    [
        ({"optuna": "postgresql://postgres@127.0.0.1:1/test"}, 1, "storage.optuna"),
        ({"mlflow": "http://127.0.0.1:1"}, 1, "storage.mlflow"),
        ({}, 2, "storage.optuna"),  # SQLite with concurrent writers
        ({"optuna": "journal:{tmp}/j.log"}, 2, "storage.mlflow"),
    ],
)
def test_unusable_storage_fails_before_any_trial(tmp_path, tiny_dir, storage, concurrency, field):
    from rpsft.sweeps.config.errors import SweepConfigError

    storage = {k: v.format(tmp=tmp_path) for k, v in storage.items()}
    raw = sweep_dict("nostore", tiny_dir, tmp_path, storage=storage, concurrency=concurrency)
    with pytest.raises(SweepConfigError, match=field.replace(".", r"\.")):
        run(raw)
    assert not (tmp_path / "sweeps" / "nostore" / "sweep.json").exists()
    assert not (tmp_path / "sweeps" / "nostore" / "trials").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_more_gpus_than_the_cluster_fails_before_any_trial(tmp_path, tiny_dir):
    from rpsft.sweeps.config.errors import SweepConfigError

    raw = sweep_dict("gpus", tiny_dir, tmp_path, resources={"cpus": 1, "gpus": 1})
    with pytest.raises(SweepConfigError, match=r"resources\.gpus: each trial asks for 1 GPU"):
        run(raw)
    assert not (tmp_path / "sweeps" / "gpus" / "sweep.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    assert client.get_experiment_by_name("rpsft-sweeps") is None  # no parent run, no trial run


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path, tiny_dir):
    raw = sweep_dict("cli", tiny_dir, tmp_path, space={"layers": ["bogus"]})
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "rpsft"), "sweep", "run", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "space.layers" in proc.stderr and "unknown preset 'bogus'" in proc.stderr


def test_shipped_sweep_configs_validate():
    """Every shipped config validates: sweeps, regression configs (a sweep plus tolerances), study configs
    (a sweep plus the claims' slices) and RL configs."""
    from rpsft.sweeps.config.sweep import load_sweep_config
    from rpsft.sweeps.stages.regression import load_regression_config
    from rpsft.sweeps.stages.study import load_study_config

    configs = sorted((REPO / "sweeps" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        if "tolerances" in raw:
            assert load_regression_config(path).sweep_config().name
        elif "claims" in raw:
            study = load_study_config(path)
            sweep = study.sweep_config()
            # the claims' slices name configurations the study runs
            lams = {r.lam for r in sweep.references if r.method == "rpsft"}
            assert study.claims.k_slice.lam in lams
            assert any(r.k == study.claims.drift_slice.k for r in sweep.references)
            assert {"sft", "l2-init", "lora", "dft", "iw", "rpsft"} <= {r.method for r in sweep.references}
            assert any(r.k == "auto" for r in sweep.references)
        elif "rl" in raw:  # an RL config (rpsft rl --config)
            from rpsft.sweeps.stages.rl import load_rl_settings

            settings = load_rl_settings(path)
            assert settings.grad_accum() >= 1 and settings.max_steps >= 1
        else:
            assert load_sweep_config(path).name
