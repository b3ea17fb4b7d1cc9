"""MLflow bookkeeping of a sweep: a parent run per sweep, a child run per trial, and the chosen point's tag.

Child runs are nested explicitly (the ``mlflow.parentRunId`` tag) and found again by the trial id tag, so a
trial restarted after a crash writes into its own run instead of creating a duplicate, and a trial whose run
already finished is not trained again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

TAG_SWEEP = "rpsft.sweep"
TAG_ROLE = "rpsft.role"
TAG_TRIAL = "rpsft.trial_id"
TAG_REFERENCE = "rpsft.reference"
TAG_STATE = "rpsft.state"
TAG_OPERATING_POINT = "rpsft.operating_point"
TAG_FAILURE = "rpsft.failure"
TAG_FAILURE_STEP = "rpsft.failure_step"
TAG_NODES = "rpsft.nodes"  # the Ray node ids a trial ran on, one per attempt, comma-separated in order
TAG_WORKER_NODES = "rpsft.worker_nodes"  # a trial over Ray Train workers: each rank's node id, in rank order
PARENT_TAG = "mlflow.parentRunId"
BASE_PREFIX = "base/"  # the parent run's metrics of the base model
MAX_BATCH = 500


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


# MLflow's UI shows an experiment of this kind as model training (runs, metrics, charts), not as GenAI traces
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow UI: ?viewStateShareKey=<key> opens the stored view
TRIALS_VIEW_PARAMS = ("method", "k", "lambda", "layers")


def trials_view_key(sweep: str) -> str:
    """The share key of a sweep's trials view (:func:`share_trials_view`, :func:`trials_view_url`)."""
    return f"rpsft-{sweep}"


def share_trials_view(client: MlflowClient, experiment_id: str, sweep: str, beta: float) -> str:
    """Store, as an experiment tag, the MLflow UI view of a sweep's trials that opens on the trade-off: only this
    sweep's trial runs, sorted by Phi (best first), with the columns G_id, F_ood, Phi and its 95% interval at
    ``beta``, and the knobs. Returns the share key that :func:`trials_view_url` opens."""
    key = trials_view_key(sweep)
    interval = metric_name(f"phi@{beta:g}")
    metrics = ["phi", f"{interval}_lo", f"{interval}_hi", "g_id", "f_ood"]
    state = {
        "searchFilter": f"tags.`{TAG_SWEEP}` = '{_quote(sweep)}' AND tags.`{TAG_ROLE}` = 'trial'",
        "orderByKey": "metrics.`phi`",
        "orderByAsc": False,
        "selectedColumns": [f"metrics.`{m}`" for m in metrics]
        + [f"params.`{p}`" for p in TRIALS_VIEW_PARAMS],
    }
    client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(state))
    return key


TRIALS_TABLE = "trials_table.json"


def log_trials_table(client: MlflowClient, run_id: str, trials: list[Any], beta: float) -> None:
    """Every finished trial of the sweep as one table artifact of the parent run (``trials_table.json``, which the
    MLflow UI renders as a table): its label, knobs, G_id, F_ood, Phi and Phi's 95% interval, best Phi first."""
    interval = metric_name(f"phi@{beta:g}")
    rows = sorted((t for t in trials if t.finished), key=lambda t: -t.metrics.get("phi", -math.inf))
    columns: dict[str, list[Any]] = {"trial": [t.label for t in rows]}
    for knob in TRIALS_VIEW_PARAMS:
        columns[knob] = [t.params.get(knob, "") for t in rows]
    for name, key in (("G_id", "g_id"), ("F_ood", "f_ood"), ("Phi", "phi")):
        columns[name] = [t.metrics.get(key) for t in rows]
    columns["Phi low"] = [t.metrics.get(f"{interval}_lo") for t in rows]
    columns["Phi high"] = [t.metrics.get(f"{interval}_hi") for t in rows]
    columns["run id"] = [t.run_id for t in rows]
    client.log_table(run_id, columns, TRIALS_TABLE)


def trials_view_url(ui: str, experiment_id: str, sweep: str) -> str:
    """The MLflow UI address (``ui``: the server's base URL) of the view :func:`share_trials_view` stored, in
    MLflow's model-training layout (``workflowType``) rather than its GenAI one."""
    return (
        f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?viewStateShareKey={trials_view_key(sweep)}&workflowType=machine_learning"
    )


def create_parent_run(client: MlflowClient, experiment_id: str, sweep: str, params: dict[str, Any]) -> str:
    run = client.create_run(
        experiment_id, run_name=sweep, tags={TAG_SWEEP: sweep, TAG_ROLE: "sweep", "mlflow.runName": sweep}
    )
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def child_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str, role: str = "trial"
) -> list[Any]:
    """The child runs of one sweep (any status) with ``role``: ``trial`` (also runs that carry no role) or
    ``rl`` (the RL stage's runs)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(r for r in page if r.data.tags.get(TAG_ROLE, "trial") == role)
        token = page.token
        if not token:
            return runs


def find_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    page = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}' and tags.`{TAG_TRIAL}` = '{_quote(trial_id)}'"
        ),
        max_results=10,
    )
    return page[0] if page else None


def start_child_run(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> tuple[Any, bool]:
    """``(run, resumed)``: the trial's existing run (status set back to RUNNING unless FINISHED) or a new one."""
    existing = find_child_run(client, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        if existing.info.status != "FINISHED":
            client.update_run(existing.info.run_id, status="RUNNING")
            client.set_tag(existing.info.run_id, TAG_STATE, "restarted")
        return existing, True
    all_tags = {PARENT_TAG: parent_run_id, TAG_TRIAL: trial_id, "mlflow.runName": run_name, **(tags or {})}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags), False


def record_node(client: MlflowClient, run: Any, node_id: str) -> list[str]:
    """Append this attempt's Ray node id to the run's :data:`TAG_NODES`; returns the node ids so far."""
    earlier = run.data.tags.get(TAG_NODES, "")
    nodes = [*filter(None, earlier.split(",")), node_id]
    client.set_tag(run.info.run_id, TAG_NODES, ",".join(nodes))
    return nodes


def _param_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params once (a restarted trial's identical params are skipped; MLflow forbids changing them)."""
    existing = client.get_run(run_id).data.params
    items = [
        Param(k, _param_value(v)[:6000]) for k, v in params.items() if v is not None and k not in existing
    ]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0, synchronous: bool = True
) -> list[Any]:
    """Log the finite numeric values of ``metrics`` at ``step`` (names sanitized for MLflow). With
    ``synchronous=False`` MLflow queues the writes in the background (retrying them through an outage of the
    tracking server) and this returns their ``RunOperations``: ``wait()`` on them before the run ends."""
    import time

    now = int(time.time() * 1000)
    items = [
        Metric(metric_name(k), float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    pending = []
    for i in range(0, len(items), MAX_BATCH):
        operation = client.log_batch(run_id, metrics=items[i : i + MAX_BATCH], synchronous=synchronous)
        if operation is not None:
            pending.append(operation)
    return pending


def metric_name(name: str) -> str:
    """MLflow allows letters, digits and ``_ - . / space``; ``@`` (as in ``phi@0.5``) becomes ``_at_``."""
    return name.replace("@", "_at_").replace(":", "_")


def log_json_artifact(
    client: MlflowClient, run_id: str, name: str, payload: Any, *, compact: bool = False
) -> None:
    """``payload`` as the JSON artifact ``name`` of a run (``name`` may sit in a folder: ``trajectory/x.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        text = (
            json.dumps(payload, separators=(",", ":"))
            if compact
            else json.dumps(payload, indent=2, default=str)
        )
        path.write_text(text)
        folder = str(Path(name).parent)
        client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)


PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow reads it at each download
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_before: str | None = None


@contextlib.contextmanager
def quiet_downloads():
    """MLflow's "Downloading artifacts" progress bars off while rpsft downloads its own small artifacts; the
    variable that switches them is as it was afterwards (also when downloads overlap in threads)."""
    global _quiet_depth, _quiet_before
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_before = os.environ.get(PROGRESS_BAR_VARIABLE)
            os.environ[PROGRESS_BAR_VARIABLE] = "false"
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                if _quiet_before is None:
                    os.environ.pop(PROGRESS_BAR_VARIABLE, None)
                else:
                    os.environ[PROGRESS_BAR_VARIABLE] = _quiet_before


def download_json(client: Any, run_id: str, name: str) -> dict[str, Any] | None:
    """A JSON artifact of a run, or ``None`` if the run has none of that name (no progress bar: it is small)."""
    with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
        return json.loads(Path(path).read_text())


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def record_failure(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Why a trial failed, on its run: ``rpsft.failure`` (exception type and message) and, for a non-finite
    loss, ``rpsft.failure_step``."""
    tags = {TAG_FAILURE: f"{type(exc).__name__}: {exc}"[:5000]}
    if getattr(exc, "step", None) is not None:
        tags[TAG_FAILURE_STEP] = str(exc.step)
    set_tags(client, run_id, tags)


def finish_run(client: MlflowClient, run_id: str, status: str = "FINISHED", state: str | None = None) -> None:
    if state:
        client.set_tag(run_id, TAG_STATE, state)
    client.set_terminated(run_id, status=status)


def tag_operating_point(client: MlflowClient, trials: list[Any], chosen_run_id: str, beta: float) -> None:
    """Mark ``chosen_run_id`` as the operating point (and clear the tag on the other trials,
    :class:`rpsft.sweeps.store.sweep_store.TrialRecord` objects)."""
    for trial in trials:
        if trial.tags.get(TAG_OPERATING_POINT) == "true" and trial.run_id != chosen_run_id:
            client.set_tag(trial.run_id, TAG_OPERATING_POINT, "false")
    set_tags(client, chosen_run_id, {TAG_OPERATING_POINT: "true", "rpsft.operating_point_beta": f"{beta:g}"})
