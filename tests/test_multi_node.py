"""Sweeps on a real Ray cluster of several nodes on this machine: a head without CPUs and two worker nodes of one
CPU each (separate raylets with their own object stores, as ``ray.cluster_utils.Cluster`` starts them), so a
trial that needs a CPU can only run on a worker node, and two at once run on two nodes.

- two trials at once start on the two nodes (each trial's nodes on its MLflow run); the node of one is killed
  mid-trial, and that trial resumes from its last checkpoint on a live node, while the finished one is
  untouched, with one MLflow run per trial and an operating point at the end;
- a trial over 2 Ray Train workers on two nodes (gloo across raylets) trains as the same 2 workers in one
  process group on one machine, and its MLflow run is nested and logged as a one-process trial's;
- the driver killed and restarted from another directory resumes the sweep on the same cluster;
- the preflight refuses a node that does not see ``output_dir`` (a node started in its own mount namespace with
  an empty tmpfs over the sweeps' directory).

Select them with ``pytest -k "multi_node or node_loss or across_nodes"``."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import PAPER_DATA
from sweep_helpers import (
    drop_pg_schema,
    fault_hooks,
    pg_available,
    pg_schema,
    rpsft,
    run_quietly,
    sweep_dict,
)

pytestmark = [
    pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present"),
    pytest.mark.slow,
    pytest.mark.integration,
]

WORKER_NODES = 2


@pytest.fixture(scope="module")
def cluster():
    """A head node with no CPUs and :data:`WORKER_NODES` nodes of 1 CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(WORKER_NODES):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


@pytest.fixture
def driver(cluster):
    """The test process connects to the cluster as the sweep's driver (``storage.ray_address``), then leaves."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield cluster.address
    if ray.is_initialized():
        ray.shutdown()


def worker_node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def trial_runs(outcome):
    from rpsft.sweeps.store import tracking

    client = tracking.client_for(outcome.tracking_uri)
    return client, tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id)


def nodes_of(run) -> list[str]:
    from rpsft.sweeps.store.tracking import TAG_NODES

    return run.data.tags[TAG_NODES].split(",")


def multi_node_sweep(name, tiny_dir, root, address, **overrides):
    raw = sweep_dict(name, tiny_dir, root, search={"num_trials": 0, "seed": 0}, **overrides)
    raw["storage"] = {**raw.get("storage", {}), "ray_address": address}
    raw["reuse_workers"] = False  # each trial is placed on its own
    return raw


def finished_trial_runs(tracking_uri: str) -> list:
    """The sweep experiment's FINISHED trial runs; none while the store is still being created."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name("rpsft-sweeps")
        if experiment is None:
            return []
        query = "tags.`rpsft.role` = 'trial' and attributes.status = 'FINISHED'"
        return client.search_runs([experiment.experiment_id], query)
    except Exception:  # noqa: BLE001  # the database is being created
        return []


def finished(tracking_uri: str, reference: str) -> bool:
    return any(run.data.tags.get("rpsft.reference") == reference for run in finished_trial_runs(tracking_uri))


def test_multi_node_trials_spread_and_a_node_loss_resumes_the_trial_from_its_checkpoint(
    tmp_path, tiny_dir, cluster, driver, monkeypatch
):
    """Two trials at once start on the two nodes. The node running LoRA is killed after its step 3 (checkpoint at
    step 2), once SFT has finished on the other node; LoRA resumes there from step 2."""
    if not pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (two trials at once need it)")
    schemas = [pg_schema(), pg_schema()]
    hooks = fault_hooks(monkeypatch, "HoldMidTrial", match="[ref] lora", at_step=3)
    raw = multi_node_sweep(
        "nodeloss",
        tiny_dir,
        tmp_path,
        driver,
        references=["sft", "lora"],
        concurrency=2,
        failure={"max_retries": 1},
        hooks=hooks,
    )
    raw["storage"].update(optuna=schemas[0][1], mlflow=schemas[1][1])
    raw["train"] = {**raw["train"], "max_steps": 4, "checkpoint_every": 2}
    outcome: list = []
    errors: list = []

    def sweep() -> None:
        try:
            outcome.append(run_quietly(raw))
        except BaseException as exc:  # noqa: BLE001  # re-raised in the test's thread
            errors.append(exc)

    nodes_before = worker_node_ids(cluster)
    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    markers = tmp_path / "sweeps" / "nodeloss" / "held"
    added = False
    try:
        deadline = time.monotonic() + 300
        while not (markers.is_dir() and any(markers.iterdir()) and finished(schemas[1][1], "sft")):
            assert thread.is_alive() and time.monotonic() < deadline, errors or "LoRA never reached step 3"
            time.sleep(0.5)
        (marker,) = markers.iterdir()
        lost = marker.read_text()
        (node,) = [node for node in cluster.worker_nodes if node.node_id == lost]
        killed_at = time.time()
        cluster.remove_node(node, allow_graceful=False)  # the raylet, its object store and its workers
        cluster.add_node(num_cpus=1)  # a fresh node, for the tests after this one
        added = True
        thread.join(timeout=300)
        assert not thread.is_alive(), "the sweep did not end after the node loss"
        assert not errors, errors
        client, runs = trial_runs(outcome[0])
        by_reference = {run.data.tags["rpsft.reference"]: run for run in runs}
        assert sorted(by_reference) == ["lora", "sft"] and len(runs) == 2  # one run per trial
        lora, sft = by_reference["lora"], by_reference["sft"]
        (sft_node,) = nodes_of(sft)  # one attempt: finished before the loss, untouched by it
        assert sft.info.status == "FINISHED" and sft.info.end_time / 1000 < killed_at
        assert sft.data.metrics["resumed_from_step"] == 0
        assert {sft_node, lost} == nodes_before  # spread: the two trials started on the two nodes
        first, second = nodes_of(lora)
        assert first == lost and second in worker_node_ids(cluster) - {lost}  # the retry ran on a live node
        assert lora.info.status == "FINISHED"
        assert lora.data.metrics["resumed_from_step"] == 2  # its last checkpoint, not step 0
        steps = [m.step for m in client.get_metric_history(lora.info.run_id, "loss")]
        assert sorted(set(steps)) == [1, 2, 3, 4]  # 3-4 trained again from the step-2 checkpoint
        assert outcome[0].selection is not None
    finally:
        if not added:
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        thread.join(timeout=60)
        for schema, _ in schemas:
            drop_pg_schema(schema)


def test_a_two_worker_trial_trains_across_nodes_as_on_one_machine(tmp_path, tiny_dir, cluster, driver):
    from mlflow.artifacts import download_artifacts
    from rpsft.core.config import TrainConfig
    from rpsft.core.sharded_train import train_local_workers
    from rpsft.sweeps.store.tracking import TAG_WORKER_NODES

    raw = multi_node_sweep(
        "across",
        tiny_dir,
        tmp_path,
        driver,
        references=["l2-init"],
        resources={"cpus": 1, "workers": 2, "strategy": "fsdp2"},
    )
    raw["train"] = {**raw["train"], "max_steps": 3}
    outcome = run_quietly(raw)
    client, (run,) = trial_runs(outcome)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id  # nested as a one-process trial is
    ranks = run.data.tags[TAG_WORKER_NODES].split(",")
    assert len(ranks) == 2 and set(ranks) == worker_node_ids(cluster)  # rank 0 and rank 1 on two nodes
    # rank 0's per-step records, the penalty computed on the shards included, and the trial's scores
    for metric in ("loss", "rpsft/penalty"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3], metric
    assert all(math.isfinite(run.data.metrics[key]) for key in ("g_id", "f_ood", "objective", "train_loss"))
    assert run.data.metrics["drift_mean"] > 0

    # the same config on 2 local processes of one machine (one process group, no Ray)
    def artifact(name: str) -> dict:
        path = download_artifacts(
            run_id=run.info.run_id, artifact_path=name, tracking_uri=outcome.tracking_uri
        )
        return json.loads(Path(path).read_text())

    config = TrainConfig.model_validate(artifact("trial_config.json"))
    local = train_local_workers(
        config.model_copy(update={"output_dir": str(tmp_path / "one-machine"), "save_model": False})
    ).metrics
    across = artifact("train_metrics.json")
    assert across["workers"] == local["workers"] == 2 and across["strategy"] == "fsdp2"
    losses = [(r["step"], r["loss"]) for r in across["log_history"] if "loss" in r]
    local_losses = [(r["step"], r["loss"]) for r in local["log_history"] if "loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in local_losses] == [1, 2, 3]
    for (_, got), (_, want) in zip(losses, local_losses, strict=True):
        assert got == pytest.approx(want, rel=1e-10)
    assert set(across["drift"]) == set(local["drift"]) and local["drift"]
    for name, drift in local["drift"].items():
        assert across["drift"][name] == pytest.approx(drift, rel=1e-9) and drift > 0


def test_multi_node_driver_restarted_elsewhere_resumes_the_sweep(
    tmp_path, tiny_dir, cluster, driver, monkeypatch
):
    """The driver is killed while LoRA is held mid-training (SFT finished and saved in Tune's experiment), then
    `rpsft sweep resume` from another directory finishes the sweep on the same cluster and storage."""

    hooks = fault_hooks(monkeypatch, "HoldMidTrial", match="[ref] lora", at_step=1)
    raw = multi_node_sweep("restart", tiny_dir, tmp_path, driver, references=["sft", "lora"], hooks=hooks)
    runs_dir = tmp_path / "sweeps"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    (first_dir / "restart.yaml").write_text(yaml.safe_dump(raw))
    db = runs_dir / "mlflow.db"

    def finished_runs() -> list:
        return finished_trial_runs(f"sqlite:///{db}") if db.exists() else []

    def tune_saved_after(seconds: float) -> bool:
        states = (runs_dir / "restart" / "tune").glob("experiment_state-*.json")
        return any(path.stat().st_mtime > seconds for path in states)

    first = rpsft(
        "sweep",
        "run",
        "restart.yaml",
        "--address",
        driver,
        cwd=first_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    held = runs_dir / "restart" / "held"
    deadline = time.monotonic() + 300
    while not (held.is_dir() and any(held.iterdir())):  # SFT has finished, LoRA is held after its step 1
        assert first.poll() is None and time.monotonic() < deadline, "LoRA was never held"
        time.sleep(0.5)
    done_before = {run.info.run_id: run for run in finished_runs()}
    assert [run.data.tags["rpsft.reference"] for run in done_before.values()] == ["sft"]
    ended = max(run.info.end_time for run in done_before.values()) / 1000 + 1
    while not tune_saved_after(ended):  # Tune's experiment records SFT as finished
        assert time.monotonic() < deadline, "Tune never saved its experiment after SFT finished"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)

    second = rpsft(
        "sweep",
        "resume",
        "restart",
        "--runs-dir",
        str(runs_dir),
        "--address",
        driver,
        cwd=second_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out[-4000:]
    assert "operating point" in out
    after = {run.info.run_id: run for run in finished_runs()}
    references = sorted(run.data.tags["rpsft.reference"] for run in after.values())
    assert references == ["lora", "sft"]  # each trial finished once, in one run
    for run_id, before in done_before.items():  # SFT, finished before the kill, was not rerun
        assert nodes_of(after[run_id]) == nodes_of(before)
        assert after[run_id].info.end_time == before.info.end_time
    (lora,) = [run for run in after.values() if run.data.tags["rpsft.reference"] == "lora"]
    assert len(nodes_of(lora)) == 2  # its attempt under the killed driver, and the resumed one


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount") or not shutil.which("hostname"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "-u", "sh", "-c", "hostname probe && mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def _alive_nodes(address: str, want: int, deadline: float, node: subprocess.Popen | None = None) -> None:
    """Wait until the cluster has ``want`` alive nodes (``node``: the process that must stay up meanwhile)."""
    import ray

    if ray.is_initialized():  # a refused sweep leaves its driver connected
        ray.shutdown()
    ray.init(address=address)
    try:
        while len([n for n in ray.nodes() if n["Alive"]]) != want:
            assert node is None or node.poll() is None, "the extra node exited"
            assert time.monotonic() < deadline, f"the cluster never had {want} alive nodes"
            time.sleep(0.5)
    finally:
        ray.shutdown()


def test_multi_node_preflight_refuses_what_a_node_does_not_see(tmp_path, tiny_dir, cluster, driver):
    """A fourth node runs in its own mount and host-name namespaces: an empty tmpfs over the sweeps' directory,
    and another host name. The preflight refuses that output_dir; then, with an output_dir it sees, it refuses
    the SQLite stores (nodes on two hosts)."""
    from rpsft.sweeps.config.errors import SweepConfigError

    if not _can_unshare():
        pytest.skip(
            "needs `unshare -m -u`, mount and hostname (root) to give one node its own filesystem view"
        )
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    ray_bin = Path(sys.executable).parent / "ray"
    start = (
        f"hostname rpsft-other-host && mount -t tmpfs tmpfs {sweeps} && exec {ray_bin} start "
        f"--address {cluster.address} --num-cpus 0 --block --disable-usage-stats "
        f"--dashboard-agent-listen-port {_free_port()} --metrics-export-port {_free_port()} "
        f"--runtime-env-agent-port {_free_port()}"
    )
    log = (tmp_path / "other-node.log").open("w")
    node = subprocess.Popen(
        ["unshare", "-m", "-u", "sh", "-c", start],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _alive_nodes(driver, 1 + WORKER_NODES + 1, time.monotonic() + 120, node)
        with pytest.raises(SweepConfigError) as caught:
            run_quietly(multi_node_sweep("nodelocal", tiny_dir, tmp_path, driver, references=["sft"]))
        message = str(caught.value)
        assert message.startswith(f"output_dir: {sweeps} is not the same directory on node")
        assert "(rpsft-other-host, id " in message and "of this 4-node Ray cluster" in message
        assert "Fix: output_dir on a shared filesystem every node mounts at the same path" in message
        assert not any(sweeps.iterdir())  # refused before any trial, and the probe is gone

        elsewhere = tmp_path / "elsewhere"
        with pytest.raises(SweepConfigError) as caught:
            run_quietly(multi_node_sweep("sqlite", tiny_dir, elsewhere, driver, references=["sft"]))
        message = str(caught.value)
        assert message.startswith(
            f"storage.optuna: sqlite:///{elsewhere / 'sweeps' / 'sqlite' / 'optuna.db'}"
        )
        assert "nodes are on 2 hosts" in message and "Fix: a postgresql:// URL" in message
        assert not (elsewhere / "sweeps").exists()  # nothing left by the refused sweep
    finally:
        os.killpg(node.pid, signal.SIGTERM)  # `ray start --block` stops its node and tells the cluster
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        log.close()
        _alive_nodes(driver, 1 + WORKER_NODES, time.monotonic() + 90)
