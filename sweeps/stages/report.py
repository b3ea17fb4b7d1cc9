"""The selection of a finished (or running) sweep, read back from its state file and MLflow (see
:mod:`rpsft.sweeps.analysis.stored_sweep`)."""

from __future__ import annotations

from pathlib import Path

from rpsft.sweeps.analysis.selection import Selection
from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import DEFAULT_ROOT, SweepContext, TrialRecord


def load_selection(
    name: str, *, root: str | Path = DEFAULT_ROOT, beta: float | None = None, retag: bool = False
) -> tuple[Selection, list[TrialRecord], SweepContext]:
    """Selection at ``beta`` (default: the sweep's first beta) from the stored trial results, with the trial
    records it was made from and the sweep's context."""
    stored = load_stored_sweep(name, root)
    selection = stored.selection(beta)
    if retag:
        tracking.tag_operating_point(stored.client, stored.trials, selection.best.run_id, selection.beta)
    return selection, stored.trials, stored.context
