"""Reading a finished (or running) sweep back from its state file and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweeps import tracking
from sweeps.config import parse_sweep_config
from sweeps.runner import STATE_FILE, collect, read_state
from sweeps.selection import Selection, select
from sweeps.trial import SweepContext


def load_selection(
    name: str, *, root: str | Path = "runs/sweeps", beta: float | None = None, retag: bool = False
) -> tuple[Selection, list[dict[str, Any]], SweepContext]:
    """Selection at ``beta`` (default: the sweep's first beta) from the stored trial results."""
    state = read_state(name, root)
    context = SweepContext(**state["context"])
    config = parse_sweep_config(context.config, f"{name}/{STATE_FILE}")
    runs, rows = collect(config, context)
    points = tracking.trial_points(runs)
    if not points:
        raise ValueError(f"select: sweep {name!r} has no finished trial with G_id and F_ood yet")
    selection = select(points, config.objective.beta if beta is None else beta)
    if retag:
        tracking.tag_operating_point(
            tracking.client_for(context.tracking_uri), runs, selection.best.run_id, selection.beta
        )
    return selection, rows, context
