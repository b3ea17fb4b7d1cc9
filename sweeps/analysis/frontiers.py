"""Method families compared by their frontiers: at each beta, every family's best configuration.

A **family** is a method (``params["method"]``: sft, l2-init, lora, rpsft, rpsft-lora, dft, iw, ...); a penalized
method with ``penalty_mode: decoupled`` (rpsft, l2-init) is its own family, ``"rpsft (decoupled)"`` /
``"l2-init (decoupled)"``, and so is a configuration trained with another optimizer than AdamW (``"rpsft (sgd)"``):
each is another training procedure, so folding it into ``rpsft`` would let RPSFT's frontier pick whichever
procedure won.

A family's **frontier point** at ``beta`` is its configuration of largest ``Phi(beta)`` on the **selection** items
(:func:`rpsft.sweeps.analysis.selection.max_phi` over all its knobs: every k, lambda, layers, trajectory step, with seeds pooled
per configuration), and it is reported with its ``Phi(beta)`` and interval on the held-out **report** items
(:mod:`rpsft.evaluation.item_split`), so a family with many configurations is not favoured by the maximum of many noisy
estimates (the winner's curse). The difference between RPSFT's frontier point and each other family's is paired
on the report items. Without a split (``evaluation.split.report_fraction: 0``) both parts are all items: chosen
and reported on the same items.

Pure: :func:`family_frontiers` reads a :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis` and returns dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rpsft.evaluation.intervals import Interval
from rpsft.evaluation.item_split import ALL, REPORT, SELECTION
from rpsft.sweeps.analysis.selection import TrialPoint, max_phi

ANCHOR = "rpsft"  # the family every other family is compared with


def family(params: Mapping[str, Any]) -> str:
    """A configuration's family: its method, with the penalty mode when it is not the default ``loss`` and the
    optimizer when it is not AdamW (``rpsft (decoupled)``, ``rpsft (sgd)``): each is another training procedure."""
    method = str(params.get("method") or "rpsft")
    mode = params.get("penalty_mode")
    optimizer = str(params.get("optimizer") or "adamw_torch")
    variants = [str(mode)] if mode not in (None, "", "None", "loss") else []
    variants += [] if optimizer.startswith("adamw") else [optimizer]
    return f"{method} ({', '.join(variants)})" if variants else method


def beta_key(beta: float) -> str:
    """How a beta names its entry in the JSON (``0.5``, ``1``)."""
    return f"{beta:g}"


def _interval(interval: Interval | None) -> dict[str, float] | None:
    return None if interval is None else interval.to_dict()


@dataclass
class FrontierPoint:
    """One family's configuration of largest Phi(beta) on the selection items, with its report-item numbers."""

    family: str
    beta: float
    point: TrialPoint  # G_id / F_ood on the items it was chosen on (point.items)
    report: Any  # rpsft.sweeps.analysis.selection.PartNumbers: G_id, F_ood, Phi on the report items (or all items)
    phi_interval: Interval | None  # Phi(beta) on report.items, paired bootstrap

    @property
    def label(self) -> str:
        from rpsft.sweeps.analysis.summary import configuration_label

        return configuration_label(self.point)

    @property
    def selection_phi(self) -> float:
        return self.point.phi(self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "family": self.family,
            "label": self.label,
            "trial_id": self.point.trial_id,
            "run_ids": list(self.point.run_ids or (self.point.run_id,)),
            "n_seeds": self.point.n_seeds,
            "params": self.point.params,
            "selection": {
                "items": self.point.items,
                "g_id": self.point.g_id,
                "f_ood": self.point.f_ood,
                "phi": self.selection_phi,
            },  # fmt: skip
            "report": {**self.report.to_dict(), "phi_interval": _interval(self.phi_interval)},
        }


@dataclass
class FrontierDifference:
    """``Phi(anchor's frontier point) - Phi(other family's frontier point)`` at one beta, paired on ``items``."""

    family: str  # the other family
    beta: float
    anchor: FrontierPoint
    other: FrontierPoint
    difference: Interval | None
    items: str

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval excludes 0 on that side, 0 when it holds 0 or is missing."""
        d = self.difference
        if d is None or not (d.low == d.low and d.high == d.high):  # NaN: no interval
            return 0
        return 1 if d.low > 0 else -1 if d.high < 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "family": self.family,
            "anchor_trial_id": self.anchor.point.trial_id,
            "other_trial_id": self.other.point.trial_id,
            "items": self.items,
            "phi_difference": _interval(self.difference),
            "sign": self.sign,
        }


@dataclass
class Frontiers:
    """Every family's frontier point at each beta, and the anchor family's paired differences with the others."""

    betas: list[float]
    anchor: str
    points: dict[
        str, dict[float, FrontierPoint]
    ]  # family -> beta -> its frontier point (families in sweep order)
    differences: dict[str, dict[float, FrontierDifference]]  # other family -> beta -> anchor minus it
    split: dict[str, Any] = field(default_factory=dict)  # SweepAnalysis.split_dict()
    level: float | None = None

    @property
    def families(self) -> list[str]:
        return list(self.points)

    @property
    def split_active(self) -> bool:
        return bool(self.split.get("active"))

    def point(self, family_name: str, beta: float) -> FrontierPoint | None:
        return self.points.get(family_name, {}).get(beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "betas": list(self.betas),
            "anchor": self.anchor,
            "split": dict(self.split),
            "chosen_on": SELECTION if self.split_active else ALL,
            "reported_on": REPORT if self.split_active else ALL,
            "level": self.level,
            "families": {
                name: {beta_key(b): p.to_dict() for b, p in per_beta.items()}
                for name, per_beta in self.points.items()
            },
            "differences": {
                name: {beta_key(b): d.to_dict() for b, d in per_beta.items()}
                for name, per_beta in self.differences.items()
            },
        }


def family_frontiers(
    analysis: Any,
    betas: Sequence[float] | None = None,
    *,
    anchor: str = ANCHOR,
    include: Callable[[TrialPoint], bool] | None = None,
) -> Frontiers:
    """Each family's frontier point at each of ``betas`` (default: the analysis' objective betas) from a
    :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis`: chosen by max Phi(beta) on ``analysis.points`` (the selection items),
    reported on the report items, with ``anchor``'s paired differences against every other family. ``include``
    keeps only some configurations (e.g. final steps)."""
    betas = list(analysis.betas if betas is None else betas)
    by_family: dict[str, list[TrialPoint]] = {}
    for point in analysis.points:
        if include is None or include(point):
            by_family.setdefault(family(point.params), []).append(point)
    report_intervals = analysis.report_intervals
    points: dict[str, dict[float, FrontierPoint]] = {}
    for name, members in by_family.items():
        per_beta = {}
        for beta in betas:
            try:
                best = max_phi(members, beta)
            except ValueError:  # no finite G_id / F_ood in this family
                continue
            phi_interval = report_intervals.phi(best, beta) if report_intervals is not None else None
            per_beta[beta] = FrontierPoint(
                name, beta, best, analysis.numbers(best, beta, REPORT), phi_interval
            )
        if per_beta:
            points[name] = per_beta
    differences: dict[str, dict[float, FrontierDifference]] = {}
    items = report_intervals.items if report_intervals is not None else ALL
    for name, per_beta in points.items():
        if name == anchor:
            continue
        for beta, other in per_beta.items():
            mine = points.get(anchor, {}).get(beta)
            if mine is None:
                continue
            diff = report_intervals.difference(mine.point, other.point, beta) if report_intervals else None
            differences.setdefault(name, {})[beta] = FrontierDifference(name, beta, mine, other, diff, items)
    level = report_intervals.draws.level if report_intervals is not None else None
    return Frontiers(betas, anchor, points, differences, analysis.split_dict(), level)
