"""Reading a finished (or running) sweep back from its state file and MLflow (see :mod:`rpsft.sweeps.store.sweep_store`)."""

from __future__ import annotations

from pathlib import Path

from rpsft.sweeps.analysis.selection import Selection
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import (
    DEFAULT_ROOT,
    StoredSweep,
    SweepContext,
    TrialRecord,
    load_stored_sweep,
)

__all__ = ["StoredSweep", "load_selection", "load_stored_sweep"]


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
