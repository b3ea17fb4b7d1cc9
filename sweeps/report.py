"""Reading a finished (or running) sweep back from its state file and MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps import tracking
from sweeps.config import SweepConfig, parse_sweep_config
from sweeps.runner import STATE_FILE, collect, read_state
from sweeps.selection import Selection, TrialPoint, select
from sweeps.trial import SweepContext
from sweeps.uncertainty import SweepAnalysis, analyze_sweep


@dataclass
class StoredSweep:
    """A sweep as stored: its config and context (from ``sweep.json``) and its trial runs (from MLflow)."""

    config: SweepConfig
    context: SweepContext
    runs: list[Any]  # MLflow trial runs
    rows: list[dict[str, Any]]  # one plain dict per trial run (see runner.collect)
    analysis: SweepAnalysis  # the finished trials grouped by configuration (seeds pooled), with intervals

    @property
    def points(self) -> list[TrialPoint]:
        """One point per configuration with G_id and F_ood (the mean over its seeds)."""
        return self.analysis.points

    def selection(self, beta: float | None = None) -> Selection:
        if not self.points:
            raise ValueError(
                f"select: sweep {self.config.name!r} has no finished trial with G_id and F_ood yet"
            )
        return select(self.points, self.config.objective.beta if beta is None else beta).attach(self.analysis)


def load_stored_sweep(name: str, root: str | Path = "runs/sweeps") -> StoredSweep:
    state = read_state(name, root)
    context = SweepContext(**state["context"])
    config = parse_sweep_config(context.config, f"{name}/{STATE_FILE}")
    runs, rows = collect(config, context)
    client = tracking.client_for(context.tracking_uri)
    analysis = analyze_sweep(config, client, context.parent_run_id, tracking.trial_points(runs))
    return StoredSweep(config, context, runs, rows, analysis)


def load_selection(
    name: str, *, root: str | Path = "runs/sweeps", beta: float | None = None, retag: bool = False
) -> tuple[Selection, list[dict[str, Any]], SweepContext]:
    """Selection at ``beta`` (default: the sweep's first beta) from the stored trial results."""
    stored = load_stored_sweep(name, root)
    selection = stored.selection(beta)
    if retag:
        tracking.tag_operating_point(
            tracking.client_for(stored.context.tracking_uri),
            stored.runs,
            selection.best.run_id,
            selection.beta,
        )
    return selection, stored.rows, stored.context
