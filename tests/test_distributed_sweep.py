"""A sweep whose trials each span 2 Ray Train workers (FSDP2 over gloo) inside Ray Tune, with the real services:
the MLflow runs nested as for one-process trials, the per-step records of rank 0, the scores, and a killed sweep
resumed without retraining its finished trials."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import pytest
import yaml
from conftest import PAPER_DATA
from sweep_helpers import resume_cli, rpsft, sweep_dict

pytestmark = [
    pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present"),
    pytest.mark.slow,
    pytest.mark.integration,
]


def distributed_sweep(tmp_path, tiny_dir, name: str) -> dict:
    raw = sweep_dict(
        name,
        tiny_dir,
        tmp_path,
        search={"num_trials": 1, "seed": 0},
        references=["l2-init"],
        resources={"cpus": 1, "workers": 2, "strategy": "fsdp2"},
    )
    raw["space"] = {"k": [4], "lambda": [1.0], "layers": ["all"]}
    raw["train"].update(max_steps=3, checkpoint_every=1)
    return raw


def trial_runs(client, root):
    exp = client.get_experiment_by_name("rpsft-sweeps")
    if exp is None:
        return [], []
    parents = client.search_runs([exp.experiment_id], "tags.`rpsft.role` = 'sweep'")
    trials = client.search_runs([exp.experiment_id], "tags.`rpsft.role` = 'trial'")
    return parents, trials


def test_a_killed_sweep_of_two_worker_trials_resumes_and_nests_its_runs(tmp_path, tiny_dir):
    from mlflow.tracking import MlflowClient

    raw = distributed_sweep(tmp_path, tiny_dir, "workers2")
    config_path = tmp_path / "workers2.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    db = tmp_path / "sweeps" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")

    def finished():
        if not db.exists():
            return []
        try:
            return [r for r in trial_runs(client, tmp_path)[1] if r.info.status == "FINISHED"]
        except Exception:
            return []

    log = open(tmp_path / "first.log", "w")
    first = rpsft("sweep", "run", str(config_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while not finished() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver, the Tune trial and its Ray Train workers
    first.wait(30)
    before = {r.data.tags["rpsft.trial_id"]: r for r in finished()}
    assert len(before) == 1

    resume_cli("workers2", tmp_path, timeout=1200)

    parents, runs = trial_runs(client, tmp_path)
    assert len(parents) == 1
    by_trial: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("rpsft.state") == "lost":  # started after Tune's last checkpoint, replaced on resume
            assert run.info.status == "KILLED"
            continue
        by_trial.setdefault(run.data.tags["rpsft.trial_id"], []).append(run)
    assert len(by_trial) == 2 and all(len(v) == 1 for v in by_trial.values())  # l2-init and one rpsft trial
    for trial_id, (run,) in by_trial.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id  # nested as before
        metrics = run.data.metrics
        assert all(math.isfinite(metrics[key]) for key in ("g_id", "f_ood", "objective", "train_loss"))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
        record = client.download_artifacts(run.info.run_id, "train_metrics.json", str(tmp_path / trial_id))
        train_metrics = yaml.safe_load(open(record))
        assert train_metrics["workers"] == 2 and train_metrics["strategy"] == "fsdp2"
        # the penalty ran on the shards; its drift, from the reduced blocks, was logged
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rpsft/penalty")] == [1, 2, 3]
        assert metrics["drift_mean"] > 0
    for trial_id, old in before.items():  # finished before the kill: the same run, not trained again
        new = by_trial[trial_id][0]
        assert new.info.run_id == old.info.run_id and new.info.end_time == old.info.end_time
