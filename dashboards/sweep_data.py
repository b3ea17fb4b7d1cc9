"""Everything a sweep report shows, read from the sweep's MLflow runs (nothing is recomputed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rpsft.sweeps.analysis.selection import Selection
from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
from rpsft.sweeps.store.sweep_store import DEFAULT_ROOT, TrialRecord

# per-step series drawn as training curves (MLflow metric name -> (panel title, y-axis label)); the penalty is
# drawn in one panel per method, as the penalties of different methods differ in scale
CURVES = {
    "loss": ("task loss (faint: per step)", "cross-entropy (nats/token)"),
    "rpsft/penalty": ("penalty", "lambda x penalty"),
    "rpsft/drift_mean": ("protected drift (mean)", "||Uk^T (W - W0) Vk||_F"),
    "eval/objective": ("Phi at the evaluations", "Phi"),
    "eval/g_id": ("G_id at the evaluations", "G_id"),
    "eval/f_ood": ("F_ood at the evaluations", "F_ood"),
    "eval/drift_mean": ("protected drift at the evaluations", "||Uk^T (W - W0) Vk||_F"),
}
ROTATION_MEAN = "rotation/mean_deg"
ROTATION_LAYER_PREFIX = "rotation/layer_"


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


# the intermediate evaluations' series and the final metric that continues each at the trial's last step
FINAL_OF_EVAL = {
    "eval/objective": "objective",
    "eval/g_id": "g_id",
    "eval/f_ood": "f_ood",
    "eval/drift_mean": "drift_mean",
}


def _histories(client: Any, trial: TrialRecord) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in CURVES:
        if key in trial.metrics:
            series = client.get_metric_history(trial.run_id, key)
            out[key] = sorted((m.step, m.value) for m in series if math.isfinite(m.value))
    last_step = trial.metrics.get("global_steps") or max(
        (step for step, _ in out.get("loss", [])), default=None
    )
    for key, final in FINAL_OF_EVAL.items():  # the final scoring is the last point of each evaluation curve
        if out.get(key) and last_step is not None and math.isfinite(trial.metrics.get(final, math.nan)):
            out[key] = [*(p for p in out[key] if p[0] < last_step), (last_step, trial.metrics[final])]
    return out


def load_sweep_data(name: str, root: str | Path = DEFAULT_ROOT, histories: bool = True) -> SweepData:
    """Read a sweep back: its trial records (with their per-step histories), the base model's numbers from the
    parent run, and the operating point at each of the objective's betas."""
    stored = load_stored_sweep(name, root)
    context = stored.context
    client = stored.client
    trials = stored.trials
    if histories:
        trials = [replace(trial, history=_histories(client, trial)) for trial in trials]
    rl = [
        RLRecord(
            run.run_id,
            run.tags.get("rpsft.init_trial", ""),
            run.tags.get("mlflow.runName", run.run_id).removeprefix("rl from "),
            run.metrics,
        )
        for run in stored.rl_runs()
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
        base_metrics=stored.base_metrics(),
        trials=trials,
        selections=selections,
        rl=rl,
    )
