"""Everything a sweep report shows, read from the sweep's MLflow runs (nothing is recomputed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps import tracking
from sweeps.report import load_stored_sweep
from sweeps.selection import Selection
from sweeps.summary import trial_label

# per-step series drawn as training curves (MLflow metric name -> panel title)
CURVES = {
    "loss": "task loss",
    "rpsft/penalty": "RPSFT penalty",
    "rpsft/drift_mean": "protected drift (mean)",
    "eval/objective": "Phi at the rungs",
}
ROTATION_MEAN = "rotation/mean_deg"
ROTATION_LAYER_PREFIX = "rotation/layer_"


@dataclass
class TrialRecord:
    """One trial run: its knobs, final metrics, per-step histories and status."""

    trial_id: str
    run_id: str
    label: str
    status: str
    state: str
    reference: str
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and "g_id" in self.metrics and "f_ood" in self.metrics

    def phi(self, beta: float) -> float | None:
        if "g_id" not in self.metrics or "f_ood" not in self.metrics:
            return None
        return self.metrics["g_id"] - beta * self.metrics["f_ood"]

    @property
    def k_value(self) -> float | None:
        """The k a trial trained with, as a number (``k_resolved`` for ``auto`` specs)."""
        for key in ("k_resolved", "k"):
            try:
                return float(self.params[key])
            except (KeyError, ValueError):
                continue
        return None

    @property
    def lam(self) -> float | None:
        try:
            return float(self.params["lambda"])
        except (KeyError, ValueError):
            return None


@dataclass
class RLRecord:
    """One finished RL run of the sweep (``rpsft rl``): its init trial and its ``rl/init|chosen|final/*``."""

    run_id: str
    init_trial: str
    label: str
    metrics: dict[str, float]

    def scores(self, stage: str) -> dict[str, float]:
        prefix = f"rl/{stage}/"
        return {k.removeprefix(prefix): v for k, v in self.metrics.items() if k.startswith(prefix)}


@dataclass
class SweepData:
    name: str
    config: Any  # SweepConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_metrics: dict[str, float]  # the base model's per-benchmark numbers (trial metric names)
    trials: list[TrialRecord]
    selections: dict[float, Selection]  # one per beta of the objective
    rl: list[RLRecord] = field(default_factory=list)  # finished RL runs from this sweep's checkpoints

    @property
    def betas(self) -> list[float]:
        return list(self.selections)

    @property
    def beta(self) -> float:
        return self.config.objective.beta

    @property
    def operating_point(self) -> TrialRecord | None:
        if not self.selections:
            return None
        return self.by_run_id(self.selections[self.beta].best.run_id)

    def by_run_id(self, run_id: str | None) -> TrialRecord | None:
        return next((t for t in self.trials if t.run_id == run_id), None)

    def reference(self, method: str) -> TrialRecord | None:
        """The finished reference run of ``method`` (e.g. ``sft``), if the sweep has one."""
        return next((t for t in self.trials if t.finished and t.reference.split(" ")[0] == method), None)

    def benchmarks(self) -> list[str]:
        """Per-benchmark metric names (``nll/id/math500``, ``acc/ood/gpqa``...) present in the base or a trial."""
        names = set(self.base_metrics)
        for trial in self.trials:
            names.update(k for k in trial.metrics if _is_benchmark(k))
        return sorted(names, key=lambda n: (n.split("/")[0], n.split("/")[1] != "id", n))

    @property
    def has_rotation(self) -> bool:
        return any(ROTATION_MEAN in t.metrics for t in self.trials)


def _is_benchmark(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[0] in ("nll", "acc") and parts[1] in ("id", "ood")


def _histories(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in CURVES:
        if key in run.data.metrics:
            series = client.get_metric_history(run.info.run_id, key)
            points = sorted((m.step, m.value) for m in series if math.isfinite(m.value))
            out[key] = points
    return out


def load_sweep_data(name: str, root: str | Path = "runs/sweeps", histories: bool = True) -> SweepData:
    """Read a sweep back: its trial runs (metrics, params, histories), the base model's numbers from the
    parent run, and the operating point at each of the objective's betas."""
    stored = load_stored_sweep(name, root)
    context = stored.context
    client = tracking.client_for(context.tracking_uri)
    parent = client.get_run(context.parent_run_id)
    base = {
        key[len(tracking.BASE_PREFIX) :]: value
        for key, value in parent.data.metrics.items()
        if key.startswith(tracking.BASE_PREFIX)
    }
    runs = {run.info.run_id: run for run in stored.runs}
    trials = []
    for row in stored.rows:
        params = {
            k: v for k, v in row["params"].items() if v not in ("None", "")
        }  # references log their name
        trials.append(
            TrialRecord(
                trial_id=row["trial_id"] or row["run_id"],
                run_id=row["run_id"],
                label=trial_label(params),
                status=row["status"],
                state=row["state"],
                reference=row["reference"],
                params=params,
                metrics=row["metrics"],
                history=_histories(client, runs[row["run_id"]]) if histories else {},
            )
        )
    rl = [
        RLRecord(
            run.info.run_id,
            run.data.tags.get("rpsft.init_trial", ""),
            run.data.tags.get("mlflow.runName", run.info.run_id).removeprefix("rl from "),
            dict(run.data.metrics),
        )
        for run in tracking.child_runs(client, context.experiment_id, context.parent_run_id, role="rl")
        if run.info.status == "FINISHED"
    ]
    selections = {}
    if stored.points:
        selections = {beta: stored.selection(beta) for beta in stored.config.objective.betas}
    return SweepData(
        name=stored.config.name,
        config=stored.config,
        tracking_uri=context.tracking_uri,
        experiment_id=context.experiment_id,
        parent_run_id=context.parent_run_id,
        base_metrics=base,
        trials=trials,
        selections=selections,
        rl=rl,
    )
