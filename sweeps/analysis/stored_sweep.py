"""A stored sweep read back for analysis: its config and context (``sweep.json``), its trial records (MLflow),
and its finished trials grouped by configuration with their intervals, all through its
:class:`rpsft.sweeps.store.sweep_store.SweepStore`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpsft.sweeps.analysis.selection import Selection, TrialPoint, select
from rpsft.sweeps.analysis.trajectory import sweep_points
from rpsft.sweeps.analysis.uncertainty import SweepAnalysis, analyze_sweep
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import DEFAULT_ROOT, SweepContext, SweepStore, TrialRecord


@dataclass
class StoredSweep:
    """A sweep as stored: its config and context (from ``sweep.json``), its trial records (from MLflow), and its
    finished trials grouped by configuration (seeds pooled) with their intervals."""

    store: SweepStore
    config: SweepConfig
    context: SweepContext
    trials: list[TrialRecord]
    analysis: SweepAnalysis

    @classmethod
    def read(cls, store: SweepStore) -> StoredSweep:
        """The sweep's config and context from ``sweep.json``, its trials from MLflow (read once), its analysis
        (every scored checkpoint with ``evaluation.trajectory``)."""
        context = store.context()
        config = store.config(context)
        trials = store.trials(context)
        client = tracking.client_for(context.tracking_uri)
        points = sweep_points(config, trials, client)
        analysis = analyze_sweep(config, client, context.parent_run_id, points)
        return cls(store, config, context, trials, analysis)

    @property
    def client(self) -> Any:
        return tracking.client_for(self.context.tracking_uri)

    @property
    def points(self) -> list[TrialPoint]:
        """One point per configuration with G_id and F_ood (the mean over its seeds), on the selection items
        when the items are split (``evaluation.split``; see :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis`)."""
        return self.analysis.points

    def selection(self, beta: float | None = None) -> Selection:
        if not self.points:
            raise ValueError(
                f"select: sweep {self.config.name!r} has no finished trial with G_id and F_ood yet"
            )
        return select(self.points, self.config.objective.beta if beta is None else beta).attach(self.analysis)

    def base_metrics(self) -> dict[str, float]:
        """The base model's per-benchmark numbers (trial metric names), from the parent run's ``base/`` metrics."""
        parent = self.client.get_run(self.context.parent_run_id)
        prefix = tracking.BASE_PREFIX
        return {k.removeprefix(prefix): v for k, v in parent.data.metrics.items() if k.startswith(prefix)}

    def rl_runs(self) -> list[TrialRecord]:
        """The sweep's finished RL runs (``rpsft rl``), as records."""
        return [run for run in self.store.trials(self.context, role="rl") if run.status == "FINISHED"]


def load_stored_sweep(name: str, root: str | Path = DEFAULT_ROOT) -> StoredSweep:
    """:meth:`StoredSweep.read` of the sweep ``name`` under ``root``."""
    return StoredSweep.read(SweepStore(Path(root), name))
