"""Operating-point selection from stored trial results: max Phi, the Pareto front, and the beta path.

A sweep's points carry ``G_id`` / ``F_ood`` on the **selection** part of the items (``TrialPoint.items``; see
:mod:`rpsft.evaluation.item_split` and :mod:`rpsft.sweeps.analysis.uncertainty`); the chosen point is reported on the held-out
report part (:meth:`Selection.operating_point`, :meth:`Selection.comparisons`).

Every trial is a point ``(G_id, F_ood)``; ``Phi(beta) = G_id - beta * F_ood`` is a line in beta, so the
max-Phi trial as beta grows from 0 is the upper envelope of those lines: :func:`beta_path` walks it exactly
(each breakpoint is where two lines cross), so the choice for *any* beta comes from the stored results alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rpsft.evaluation.intervals import Interval
from rpsft.evaluation.metrics import phi


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial: its id, parameters and trade-off numbers."""

    trial_id: str
    g_id: float
    f_ood: float
    params: dict[str, Any] = field(default_factory=dict, compare=False)
    run_id: str | None = field(default=None, compare=False)
    n_seeds: int = field(default=1, compare=False)  # > 1: the mean of that many seeds of one configuration
    run_ids: tuple[str, ...] = field(default=(), compare=False)  # every seed's run
    # which items g_id / f_ood are on: "all", or "selection" (the part of the items the choice is made on,
    # see rpsft.evaluation.item_split)
    items: str = field(default="all", compare=False)

    def phi(self, beta: float) -> float:
        return phi(self.g_id, self.f_ood, beta)


def _usable(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    return [p for p in points if math.isfinite(p.g_id) and math.isfinite(p.f_ood)]


def max_phi(points: Sequence[TrialPoint], beta: float) -> TrialPoint:
    """The trial with the largest Phi(beta); ties go to the smaller forgetting, then the trial id."""
    usable = _usable(points)
    if not usable:
        raise ValueError("selection: no finished trial with finite G_id and F_ood")
    return max(usable, key=lambda p: (p.phi(beta), -p.f_ood, _reverse(p.trial_id)))


def _reverse(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


def dominates(a: TrialPoint, b: TrialPoint) -> bool:
    """``a`` is at least as good on both axes (gain up, forgetting down) and better on one."""
    return a.g_id >= b.g_id and a.f_ood <= b.f_ood and (a.g_id > b.g_id or a.f_ood < b.f_ood)


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """Trials no other trial dominates, sorted by forgetting (then gain, descending)."""
    usable = _usable(points)
    front = [p for p in usable if not any(dominates(q, p) for q in usable)]
    return sorted(front, key=lambda p: (p.f_ood, -p.g_id, p.trial_id))


@dataclass(frozen=True)
class BetaInterval:
    """``point`` maximizes Phi for every beta in ``[low, high)`` (``high`` may be ``inf``)."""

    low: float
    high: float
    point: TrialPoint


def beta_path(points: Sequence[TrialPoint], beta_min: float = 0.0) -> list[BetaInterval]:
    """The exact sequence of max-Phi trials for beta from ``beta_min`` to infinity.

    At a breakpoint beta*, the current winner (g1, f1) and a less-forgetting trial (g2 < g1, f2 < f1) tie:
    beta* = (g1 - g2) / (f1 - f2); the next winner is the one with the smallest such beta* (then the
    smallest forgetting). Larger beta can only move the choice toward less forgetting.
    """
    current = max_phi(points, beta_min)
    usable = _usable(points)
    low = beta_min
    path: list[BetaInterval] = []
    while True:
        crossings = []
        for p in usable:
            if p.f_ood < current.f_ood:
                beta = (current.g_id - p.g_id) / (current.f_ood - p.f_ood)
                if beta >= low:
                    crossings.append((beta, p.f_ood, p.trial_id, p))
        if not crossings:
            path.append(BetaInterval(low, math.inf, current))
            return path
        beta, *_, nxt = min(crossings, key=lambda c: (c[0], c[1], c[2]))
        if beta > low:
            path.append(BetaInterval(low, beta, current))
        current, low = nxt, beta


@dataclass
class PartNumbers:
    """A configuration's ``G_id``, ``F_ood`` and ``Phi`` on one part of the items (``selection``, ``report``,
    or ``all`` when the items are not split or the configuration has no item scores), with its intervals."""

    items: str
    g_id: float
    f_ood: float
    phi: float
    intervals: dict[str, Interval] | None = None
    n_items: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"items": self.items, "g_id": self.g_id, "f_ood": self.f_ood, "phi": self.phi}
        if self.n_items:
            out["n_items"] = dict(self.n_items)
        if self.intervals is not None:
            out["intervals"] = {name: interval.to_dict() for name, interval in self.intervals.items()}
        return out


@dataclass
class Selection:
    beta: float
    best: TrialPoint
    front: list[TrialPoint]
    path: list[BetaInterval]
    ranking: list[TrialPoint]
    analysis: Any = None  # rpsft.sweeps.analysis.uncertainty.SweepAnalysis: intervals and comparisons, when known

    def attach(self, analysis: Any) -> Selection:
        self.analysis = analysis
        return self

    def comparisons(self) -> list[Any]:
        """The operating point against the runner-up and the sft reference (``rpsft.sweeps.analysis.uncertainty.Comparison``),
        on the report items when the items are split."""
        if self.analysis is None:
            return []
        return self.analysis.comparisons(self.best, self.ranking, self.beta)

    def intervals(self, point: TrialPoint) -> dict[str, Any] | None:
        """A configuration's intervals on the items its numbers are reported on (the report items when the
        items are split, else all items)."""
        if self.analysis is None or self.analysis.report_intervals is None:
            return None
        return self.analysis.report_intervals.of(point)

    def operating_point(self) -> dict[str, Any]:
        """``{"selection": ..., "report": ...}`` (:class:`PartNumbers`): the chosen point on the
        items it was chosen on and on the held-out items; without an analysis both are its own numbers."""
        if self.analysis is not None:
            return self.analysis.operating_point(self.best, self.beta)
        own = PartNumbers(self.best.items, self.best.g_id, self.best.f_ood, self.best.phi(self.beta))
        return {"selection": own, "report": own}

    def split(self) -> dict[str, Any]:
        """The item split the choice and the report used (``report_fraction``, ``seed``, ``active``, ``text``)."""
        if self.analysis is not None:
            return self.analysis.split_dict()
        return {
            "report_fraction": 0.0,
            "seed": 0,
            "active": False,
            "text": "no split: chosen and reported on the same items",
        }

    def to_dict(self) -> dict[str, Any]:
        def point(p: TrialPoint) -> dict[str, Any]:
            return {
                "trial_id": p.trial_id,
                "run_id": p.run_id,
                "g_id": p.g_id,
                "f_ood": p.f_ood,
                "phi": p.phi(self.beta),
                "n_seeds": p.n_seeds,
                "run_ids": list(p.run_ids or (p.run_id,)),
                "items": p.items,
                "params": p.params,
            }

        out = {
            "beta": self.beta,
            "best": point(self.best),
            "pareto_front": [point(p) for p in self.front],
            "beta_path": [
                {"beta_low": i.low, "beta_high": None if math.isinf(i.high) else i.high, **point(i.point)}
                for i in self.path
            ],
            "ranking": [point(p) for p in self.ranking],
            "split": self.split(),
            "operating_point": {part: n.to_dict() for part, n in self.operating_point().items()},
        }
        best = self.intervals(self.best)
        if best is not None:
            out["best_intervals"] = {name: interval.to_dict() for name, interval in best.items()}
            out["best_intervals_items"] = self.analysis.report_intervals.items
            out["comparisons"] = [c.to_dict() for c in self.comparisons()]
        return out


def select(points: Sequence[TrialPoint], beta: float) -> Selection:
    """Max-Phi trial at ``beta``, the Pareto front, the beta path, and all trials ranked by Phi(beta)."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    best = max_phi(points, beta)
    ranking = sorted(_usable(points), key=lambda p: (-p.phi(beta), p.f_ood, p.trial_id))
    return Selection(beta, best, pareto_front(points), beta_path(points), ranking)
