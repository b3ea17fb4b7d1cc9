"""A sweep's trials with their uncertainty: seeds grouped by knobs, paired bootstrap intervals, comparisons.

Every trial stores its per-item scores (``item_scores.json``, one artifact per trial run) and the sweep stores
the base model's (``base_item_scores.json`` on the sweep's parent run and in the sweep directory). Trials that
differ only in their seed form one **configuration**: its point is the mean over seeds, and its intervals pool
the seeds (:func:`evaluation.intervals.bootstrap_tradeoff` resamples items and seeds). All configurations are
resampled on the same items, so the difference between two of them has a paired interval: the operating point
is *distinguishable* from another configuration when the interval of ``Phi_a - Phi_b`` excludes 0.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evaluation.intervals import Interval, IntervalError, TradeOffDraws, bootstrap_tradeoff
from sweeps.selection import TrialPoint
from sweeps.store import BASE_ITEM_SCORES, KNOBS, SweepStore
from sweeps.store import INTERVALS as INTERVALS  # noqa: F401  (named here for readers of intervals.json)

ITEM_SCORES = "item_scores.json"
# which stored item scores each objective metric uses: (ID scores, OOD scores)
METRIC_ITEMS = {"nll": ("id_nll", "ood_nll"), "kl": ("id_nll", "ood_kl"), "mc": ("id_nll", "ood_mc")}
_SEED_SUFFIX = re.compile(r" seed=-?\d+$")


def knob_key(params: Mapping[str, Any]) -> str:
    """What makes two trials the same configuration: their knobs and reference name, not their seed."""
    reference = _SEED_SUFFIX.sub("", str(params.get("reference") or ""))
    knobs = {key: str(params[key]) for key in KNOBS if params.get(key) not in (None, "", "None")}
    return json.dumps({"reference": reference, **knobs}, sort_keys=True)


@dataclass
class TrialGroup:
    """The trials (one per seed) of one configuration, and their mean as one selection point."""

    key: str
    members: list[TrialPoint]

    @property
    def point(self) -> TrialPoint:
        first = self.members[0]
        n = len(self.members)
        return replace(
            first,
            g_id=sum(p.g_id for p in self.members) / n,
            f_ood=sum(p.f_ood for p in self.members) / n,
            n_seeds=n,
            run_ids=tuple(p.run_id for p in self.members if p.run_id),
        )


def group_points(points: Sequence[TrialPoint]) -> list[TrialGroup]:
    """Trials grouped by :func:`knob_key`, in the order of each group's first trial."""
    groups: dict[str, TrialGroup] = {}
    for point in points:
        key = knob_key(point.params)
        groups.setdefault(key, TrialGroup(key, [])).members.append(point)
    return list(groups.values())


def objective_items(scores: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """The ``{"id": ..., "ood": ...}`` item scores an objective metric uses, from a stored item-scores record."""
    if metric not in METRIC_ITEMS:
        raise IntervalError(f"intervals: objective.metric {metric!r} has no per-item scores (nll, kl or mc do)")
    id_key, ood_key = METRIC_ITEMS[metric]
    return {"id": scores.get(id_key) or {}, "ood": scores.get(ood_key) or {}}


@dataclass
class SweepIntervals:
    """Intervals of every configuration and paired comparisons, from one set of bootstrap draws."""

    draws: TradeOffDraws
    betas: list[float]
    keys: dict[str, str]  # run id (of any member) -> configuration key

    def key_of(self, point: TrialPoint) -> str | None:
        return self.keys.get(point.run_id or "")

    def of(self, point: TrialPoint) -> dict[str, Interval] | None:
        key = self.key_of(point)
        return None if key is None else self.draws.summary(key, self.betas)

    def phi(self, point: TrialPoint, beta: float) -> Interval | None:
        key = self.key_of(point)
        return None if key is None else self.draws.phi(key, beta)

    def difference(self, a: TrialPoint, b: TrialPoint, beta: float) -> Interval | None:
        """``Phi_a - Phi_b`` at ``beta``, paired on the same items (``None`` if one has no item scores)."""
        ka, kb = self.key_of(a), self.key_of(b)
        if ka is None or kb is None:
            return None
        return self.draws.phi_difference(ka, kb, beta)

    def to_dict(self, points: Sequence[TrialPoint]) -> dict[str, Any]:
        out: dict[str, Any] = {"level": self.draws.level, "n_items": self.draws.n_items, "configurations": []}
        for point in points:
            summary = self.of(point)
            if summary is None:
                continue
            out["configurations"].append(
                {
                    "trial_id": point.trial_id,
                    "run_ids": list(point.run_ids or (point.run_id,)),
                    "n_seeds": point.n_seeds,
                    "params": point.params,
                    **{name: interval.to_dict() for name, interval in summary.items()},
                }
            )
        return out


def sweep_intervals(
    groups: Sequence[TrialGroup],
    base_items: Mapping[str, Any] | None,
    trial_items: Mapping[str, Mapping[str, Any]],
    metric: str,
    betas: Sequence[float],
    *,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepIntervals | None:
    """Bootstrap every configuration whose trials all stored item scores; ``None`` when nothing can be
    bootstrapped (no base item scores, or an objective without per-item scores)."""
    if base_items is None or metric not in METRIC_ITEMS:
        return None
    base = objective_items(base_items, metric)
    configs: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, str] = {}
    for group in groups:
        members = [trial_items.get(p.run_id or "") for p in group.members]
        if not members or any(m is None for m in members):
            continue
        configs[group.key] = [objective_items(m, metric) for m in members]
        keys.update({p.run_id: group.key for p in group.members if p.run_id})
    if not configs:
        return None
    result = bootstrap_tradeoff(base, configs, draws=draws, seed=seed, level=level)
    return SweepIntervals(result, list(betas), keys)


# ------------------------------------------------------------------------------------------ stored scores


def download_json(client: Any, run_id: str, name: str) -> dict[str, Any] | None:
    """A JSON artifact of a run, or ``None`` if the run has none of that name."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
        return json.loads(Path(path).read_text())


def stored_item_scores(client: Any, points: Sequence[TrialPoint]) -> dict[str, dict[str, Any]]:
    out = {}
    for point in points:
        for run_id in point.run_ids or (point.run_id,):
            if run_id and run_id not in out:
                scores = download_json(client, run_id, ITEM_SCORES)
                if scores is not None:
                    out[run_id] = scores
    return out


# ------------------------------------------------------------------------------------------ a whole sweep


@dataclass
class Comparison:
    """The operating point against another configuration: ``Phi_best - Phi_other`` with its paired interval."""

    role: str  # "runner-up", "[ref] sft", ...
    other: TrialPoint
    difference: Interval | None

    @property
    def distinguishable(self) -> bool | None:
        return None if self.difference is None else self.difference.excludes_zero()

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "trial_id": self.other.trial_id,
            "params": self.other.params,
            "phi_difference": None if self.difference is None else self.difference.to_dict(),
            "distinguishable": self.distinguishable,
        }


@dataclass
class SweepAnalysis:
    """A sweep's configurations (seeds grouped), their intervals, and how to compare them."""

    groups: list[TrialGroup]
    points: list[TrialPoint]  # one per configuration (the mean over its seeds)
    intervals: SweepIntervals | None

    def comparisons(self, best: TrialPoint, ranking: Sequence[TrialPoint], beta: float) -> list[Comparison]:
        """The operating point against the runner-up and against every ``sft`` reference configuration."""
        out = []
        others = [p for p in ranking if p.run_id != best.run_id]
        if others:
            out.append(Comparison("runner-up", others[0], self._diff(best, others[0], beta)))
        for point in self.points:
            if point.params.get("method") == "sft" and point.run_id != best.run_id:
                out.append(Comparison("sft", point, self._diff(best, point, beta)))
        return out

    def _diff(self, a: TrialPoint, b: TrialPoint, beta: float) -> Interval | None:
        return None if self.intervals is None else self.intervals.difference(a, b, beta)


def analyze_sweep(
    config: Any, client: Any, parent_run_id: str, points: Sequence[TrialPoint]
) -> SweepAnalysis:
    """Group a sweep's finished trials by configuration and bootstrap their intervals from the stored item
    scores (the base model's from ``<sweep>/base_item_scores.json`` or the parent run's artifact)."""
    groups = group_points(points)
    grouped = [g.point for g in groups]
    path = SweepStore.of(config).base_item_scores
    base = (
        json.loads(path.read_text())
        if path.is_file()
        else download_json(client, parent_run_id, BASE_ITEM_SCORES)
    )
    ev = config.evaluation.intervals
    intervals = None
    if base is not None and config.objective.metric in METRIC_ITEMS:
        intervals = sweep_intervals(
            groups,
            base,
            stored_item_scores(client, points),
            config.objective.metric,
            config.objective.betas,
            draws=ev.draws,
            level=ev.level,
            seed=ev.seed,
        )
    return SweepAnalysis(groups, grouped, intervals)
