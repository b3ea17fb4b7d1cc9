"""Faults injected into real sweeps (local Ray, SQLite MLflow and Optuna): a trial that raises is recorded
FAILED with its reason and the sweep goes on; `failure.max_retries` reruns it in the same MLflow run; a
resumed sweep reruns only what failed; a loss that turns NaN stops training at that step. The faults come from
the sweep's own trial hook (``fault_hooks.Fault``). A trial lost mid-training with its node, and resumed from its
checkpoint, is in ``test_multi_node.py``."""

from __future__ import annotations

import pytest
from conftest import PAPER_DATA
from sweep_helpers import fault_hooks, run_quietly, sweep_dict

pytestmark = [
    pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present"),
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.usefixtures("fresh_ray"),
]


def _runs_by_reference(outcome):
    from rpsft.sweeps.store import tracking

    client = tracking.client_for(outcome.tracking_uri)
    runs = tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id)
    by_label: dict[str, list] = {}
    for run in runs:
        by_label.setdefault(run.data.tags.get(tracking.TAG_REFERENCE, ""), []).append(run)
    return client, by_label


def _optuna_states(name, sweep_dir):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return [t.state.name for t in study.trials]


def _sweep(name, tiny_dir, tmp_path, **overrides):
    return sweep_dict(
        name, tiny_dir, tmp_path, references=["sft", "lora"], search={"num_trials": 1, "seed": 0}, **overrides
    )


def test_a_failed_trial_is_recorded_the_sweep_goes_on_and_resume_reruns_only_it(
    tmp_path, tiny_dir, monkeypatch
):
    import json

    from rpsft.sweeps.runner import resume_sweep

    hooks = fault_hooks(monkeypatch, match="[ref] lora", times=1)
    outcome = run_quietly(_sweep("faulty", tiny_dir, tmp_path, hooks=hooks))
    client, by_label = _runs_by_reference(outcome)
    (lora,) = by_label["lora"]
    assert lora.info.status == "FAILED"
    assert "InjectedFault: injected fault 1 of 1" in lora.data.tags["rpsft.failure"]
    (sft,) = by_label["sft"]
    (searched,) = by_label[""]
    assert sft.info.status == searched.info.status == "FINISHED"  # the sweep went on past the failure
    assert outcome.selection is not None and outcome.selection.best.run_id != lora.info.run_id
    state = json.loads((outcome.sweep_dir / "sweep.json").read_text())
    assert state["status"] == "incomplete"

    before = {r.info.run_id: r.info.end_time for runs in by_label.values() for r in runs if r is not lora}
    import ray

    ray.shutdown()
    resumed = resume_sweep("faulty", root=tmp_path / "sweeps", echo=lambda *a, **k: None)
    _, after = _runs_by_reference(resumed)
    assert {label: len(runs) for label, runs in after.items()} == {
        "sft": 1,
        "lora": 1,
        "": 1,
    }  # no duplicates
    assert after["lora"][0].info.run_id == lora.info.run_id and after["lora"][0].info.status == "FINISHED"
    for runs in after.values():  # finished before: not trained again
        for run in runs:
            if run.info.run_id in before:
                assert run.info.end_time == before[run.info.run_id]
    assert json.loads((outcome.sweep_dir / "sweep.json").read_text())["status"] == "finished"
    assert _optuna_states("faulty", outcome.sweep_dir) == ["COMPLETE"]


def test_max_retries_reruns_a_failed_trial_in_the_same_run(tmp_path, tiny_dir, monkeypatch):
    from rpsft.sweeps.store import tracking

    hooks = fault_hooks(monkeypatch, match="[ref] lora", times=2)
    outcome = run_quietly(_sweep("retried", tiny_dir, tmp_path, failure={"max_retries": 2}, hooks=hooks))
    client, by_label = _runs_by_reference(outcome)
    (lora,) = by_label["lora"]  # two failed attempts and the third: one MLflow run
    assert lora.info.status == "FINISHED" and "g_id" in lora.data.metrics
    assert lora.data.tags["rpsft.state"] == "finished"
    assert (outcome.sweep_dir / "faults").is_dir()
    assert sorted(p.read_text() for p in (outcome.sweep_dir / "faults").iterdir()) == ["2"]
    lora_attempts = outcome.sweep_dir / "hooks" / lora.data.tags[tracking.TAG_TRIAL]
    assert lora_attempts.read_text() == "3"  # the hook saw each attempt: two faults, then the one that ran


def test_a_nan_loss_fails_the_trial_at_that_step_and_never_becomes_the_operating_point(tmp_path, tiny_dir):
    raw = _sweep("diverges", tiny_dir, tmp_path)
    raw["references"] = ["sft", "lora"]
    raw["train"] = {
        **raw["train"],
        "learning_rate": 1.0e30,
        "max_steps": 6,
    }  # AdamW: weights ~1e30 after a step
    outcome = run_quietly(raw)
    _, by_label = _runs_by_reference(outcome)
    failed = [r for runs in by_label.values() for r in runs if r.info.status == "FAILED"]
    assert failed, "a learning rate of 1e30 makes the loss non-finite"
    for run in failed:
        assert "NonFiniteLossError" in run.data.tags["rpsft.failure"]
        step = int(run.data.tags["rpsft.failure_step"])
        assert 1 <= step <= 6
        assert f"at optimizer step {step}" in run.data.tags["rpsft.failure"]
        assert "phi" not in run.data.metrics
    if outcome.selection is not None:
        assert outcome.selection.best.run_id not in {r.info.run_id for r in failed}


def test_a_second_driver_on_the_same_sweep_is_refused(tmp_path, tiny_dir):
    """A real second process holds the sweep's lock; this driver is refused before any work, and a kill -9 of
    the holder frees the lock (the operating system drops it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import run_sweep
    from rpsft.sweeps.store.sweep_store import LOCK_FILE

    config = parse_sweep_config(_sweep("locked", tiny_dir, tmp_path))
    sweep_dir = config.sweep_dir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from rpsft.sweeps.driver_guard import driver_lock\n"
            "from rpsft.sweeps.store.sweep_store import SweepStore\n"
            "with driver_lock(SweepStore(Path(sys.argv[1]).parent, 'locked')):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(sweep_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            SweepConfigError, match=r"name: sweep 'locked' is being run by another driver \(pid"
        ):
            run_sweep(config, echo=lambda *a, **k: None, progress=False)
        assert not (sweep_dir / "sweep.json").exists()  # refused before any work
        from rpsft.sweeps.runner import resume_sweep

        (sweep_dir / "sweep.json").write_text("{}")
        with pytest.raises(SweepConfigError, match="being run by another driver"):
            resume_sweep("locked", root=tmp_path / "sweeps", echo=lambda *a, **k: None)
        (sweep_dir / "sweep.json").unlink()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    time.sleep(0.2)
    from rpsft.sweeps.driver_guard import driver_lock
    from rpsft.sweeps.store.sweep_store import SweepStore

    with driver_lock(SweepStore.of(config)):  # the killed holder left no stale lock
        assert "pid" in (sweep_dir / LOCK_FILE).read_text()


def test_runs_tune_forgot_are_closed_as_lost_whether_running_or_finished(tmp_path):
    """After a driver kill, Tune restores only the trials its last experiment checkpoint holds. A trial run it
    forgot is lost: still RUNNING, or FINISHED before the kill but never recorded. Runs Tune knows stay as
    they are, and without Tune's list only RUNNING runs are closed."""
    from mlflow.tracking import MlflowClient
    from rpsft.sweeps.runner import close_lost_trial_runs
    from rpsft.sweeps.store.sweep_store import TrialRecord
    from sweep_helpers import log_trial_run

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment).info.run_id
    status = {"known": "FINISHED", "forgotten": "FINISHED", "running": "RUNNING", "failed": "FAILED"}
    ids = {
        t: log_trial_run(client, experiment, parent, t, {}, {"g_id": 0.1}, status=s)
        for t, s in status.items()
    }

    def records() -> dict[str, TrialRecord]:
        return {t: TrialRecord.from_run(client.get_run(run_id)) for t, run_id in ids.items()}

    assert close_lost_trial_runs(client, list(records().values()), None) == 1  # only the RUNNING one
    assert records()["forgotten"].status == "FINISHED"
    assert close_lost_trial_runs(client, list(records().values()), {"known", "failed"}) == 1
    after = records()
    assert (after["forgotten"].status, after["forgotten"].state) == ("KILLED", "lost")
    assert "lost: started before" in after["forgotten"].failure
    assert (after["running"].status, after["running"].state) == ("KILLED", "lost")
    assert (after["known"].status, after["failed"].status) == ("FINISHED", "FAILED")
