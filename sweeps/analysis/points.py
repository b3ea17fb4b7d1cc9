"""A sweep's trial records as the points selection ranks: each finished trial's final ``(G_id, F_ood)``.

:func:`rpsft.sweeps.analysis.trajectory.sweep_points` adds the intermediate points of every trial's trajectory
when ``evaluation.trajectory`` is on.
"""

from __future__ import annotations

from collections.abc import Sequence

from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.store.sweep_store import TrialRecord


def trial_point(record: TrialRecord) -> TrialPoint:
    """A finished trial (:attr:`TrialRecord.finished`) as a selection point."""
    if not record.finished:
        raise ValueError(f"trial {record.trial_id}: no finished G_id and F_ood to select on")
    return TrialPoint(record.trial_id, record.g_id, record.f_ood, params=dict(record.params), run_id=record.run_id)


def trial_points(records: Sequence[TrialRecord]) -> list[TrialPoint]:
    """The finished trials that carry ``g_id`` and ``f_ood``, as selection points."""
    return [trial_point(record) for record in records if record.finished]
