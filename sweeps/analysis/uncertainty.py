"""A sweep's trials with their uncertainty: seeds grouped by knobs, paired bootstrap intervals, comparisons.

Every trial stores its per-item scores (``item_scores.json``, one artifact per trial run) and the sweep stores
the base model's (``base_item_scores.json`` on the sweep's parent run and in the sweep directory). Trials that
differ only in their seed form one **configuration**: its point is the mean over seeds, and its intervals pool
the seeds (:func:`rpsft.evaluation.intervals.bootstrap_tradeoff` resamples items and seeds). All configurations are
resampled on the same items, so the difference between two of them has a paired interval: the operating point
is *distinguishable* from another configuration when the interval of ``Phi_a - Phi_b`` excludes 0.

The items are split (``evaluation.split``, :mod:`rpsft.evaluation.item_split`): the points that
:func:`rpsft.sweeps.analysis.selection.select` ranks carry ``G_id`` / ``F_ood`` on the **selection** items, and the chosen
point's numbers, intervals and comparisons are reported on the held-out **report** items, so the report is not
biased upwards by the choice (the winner's curse). Configurations without item scores keep their numbers on all
items (labelled ``all``); ``report_fraction: 0`` chooses and reports on all items, as before the split.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rpsft.evaluation.intervals import Interval, IntervalError, TradeOffDraws, bootstrap_tradeoff
from rpsft.evaluation.item_split import ALL, REPORT, SELECTION, ItemSplit
from rpsft.evaluation.metrics import phi
from rpsft.sweeps.analysis.selection import PartNumbers, TrialPoint
from rpsft.sweeps.analysis.trajectory import intermediate_step, point_item_scores
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import BASE_ITEM_SCORES, ITEM_SCORES, KNOBS, SweepStore

# which stored item scores each objective metric uses: (ID scores, OOD scores)
METRIC_ITEMS = {
    "nll": ("id_nll", "ood_nll"),
    "kl": ("id_nll", "ood_kl"),
    "mc": ("id_nll", "ood_mc"),
    "accuracy": ("id_acc", "ood_acc"),
}
_SEED_SUFFIX = re.compile(r" seed=-?\d+$")
_KNOB_DEFAULTS = {"penalty_mode": "loss", "optimizer": "adamw_torch"}  # as TrainConfig's defaults


def item_key(point: TrialPoint) -> str:
    """The key of a point's stored item scores: its run id, or ``<trial id>@<step>`` for an intermediate point
    of a trial's trajectory (:mod:`rpsft.sweeps.analysis.trajectory`; the points of one run are then told apart, and a trial's
    final point keeps its run id). Intervals and item scores are keyed by it; ``run_id`` stays the MLflow link."""
    return point.trial_id if intermediate_step(point) is not None else (point.run_id or "")


def knob_key(params: Mapping[str, Any]) -> str:
    """What makes two trials the same configuration: their knobs and reference name, not their seed. A knob at
    its default (``penalty_mode: loss``, ``optimizer: adamw_torch``) counts as unset, so a trial logged before
    that knob existed groups with the later seeds of its configuration."""
    reference = _SEED_SUFFIX.sub("", str(params.get("reference") or ""))
    knobs = {
        key: str(params[key])
        for key in KNOBS
        if params.get(key) not in (None, "", "None") and str(params[key]) != _KNOB_DEFAULTS.get(key)
    }
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
        raise IntervalError(f"intervals: objective.metric {metric!r} has no per-item scores (nll, kl, mc, accuracy do)")
    id_key, ood_key = METRIC_ITEMS[metric]
    return {"id": scores.get(id_key) or {}, "ood": scores.get(ood_key) or {}}


@dataclass
class SweepIntervals:
    """Intervals of every configuration and paired comparisons, from one set of bootstrap draws."""

    draws: TradeOffDraws
    betas: list[float]
    # item_key of any member (its run id, or <trial>@<step> for a trajectory point) -> configuration key
    keys: dict[str, str]
    items: str = ALL  # which items: "all", "selection" or "report" (rpsft.evaluation.item_split)

    def key_of(self, point: TrialPoint) -> str | None:
        return self.keys.get(item_key(point))

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

    def estimates(self, point: TrialPoint) -> tuple[float, float] | None:
        """``(G_id, F_ood)`` of a configuration on these items (the mean over its seeds)."""
        key = self.key_of(point)
        return None if key is None else (self.draws.point_g[key], self.draws.point_f[key])

    def to_dict(self, points: Sequence[TrialPoint]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": self.items,
            "level": self.draws.level,
            "n_items": self.draws.n_items,
            "configurations": [],
        }
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
    split: ItemSplit | None = None,
    part: str = ALL,
) -> SweepIntervals | None:
    """Bootstrap every configuration whose trials all stored item scores; ``None`` when nothing can be
    bootstrapped (no base item scores, or an objective without per-item scores). ``part`` ``selection`` or
    ``report`` bootstraps only that part of every benchmark's items under ``split``; ``all`` every item.
    ``trial_items`` are keyed by :func:`item_key` (the run id, or ``<trial>@<step>`` for a trajectory point)."""
    if base_items is None or metric not in METRIC_ITEMS:
        return None
    base = objective_items(base_items, metric)
    configs: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, str] = {}
    for group in groups:
        members = [trial_items.get(item_key(p)) for p in group.members]
        if not members or any(m is None for m in members):
            continue
        configs[group.key] = [objective_items(m, metric) for m in members]
        keys.update({item_key(p): group.key for p in group.members if item_key(p)})
    if not configs:
        return None
    if part != ALL:
        if split is None or not split.active:
            raise IntervalError(f"intervals: the {part!r} items need an active item split")
        base = split.part(base, part)
        configs = {key: [split.part(scores, part) for scores in seeds] for key, seeds in configs.items()}
    result = bootstrap_tradeoff(base, configs, draws=draws, seed=seed, level=level)
    return SweepIntervals(result, list(betas), keys, part)


# ------------------------------------------------------------------------------------------ stored scores


def stored_item_scores(
    client: Any, points: Sequence[TrialPoint], cache: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """``{item key: item scores}`` (:func:`item_key`: the run id, or ``<trial>@<step>``) of the points that stored
    them: a run's ``item_scores.json``, or an intermediate trajectory point's ``trajectory/step-<step>.json``
    (pass such points one per member, as :func:`trajectory points <rpsft.sweeps.analysis.trajectory.trajectory_points>` gives
    them); ``cache`` (filled here) saves downloads across calls (a finished run's item scores never change)."""
    out: dict[str, dict[str, Any]] = {}
    for point in points:
        if intermediate_step(point) is not None:
            key = item_key(point)
            if key in out:
                continue
            scores = cache.get(key) if cache is not None else None
            if scores is None:
                scores = point_item_scores(client, point)
            if scores is not None:
                out[key] = scores
                if cache is not None:
                    cache[key] = scores
            continue
        for run_id in point.run_ids or (point.run_id,):
            if run_id and run_id not in out:
                scores = cache.get(run_id) if cache is not None else None
                if scores is None:
                    scores = tracking.download_json(client, run_id, ITEM_SCORES)
                if scores is not None:
                    out[run_id] = scores
                    if cache is not None:
                        cache[run_id] = scores
    return out


# ------------------------------------------------------------------------------------------ a whole sweep


@dataclass
class Comparison:
    """The operating point against another configuration: ``Phi_best - Phi_other`` with its paired interval, on
    ``items`` (the report items when the items are split)."""

    role: str  # "runner-up", "[ref] sft", ...
    other: TrialPoint
    difference: Interval | None
    items: str = ALL

    @property
    def distinguishable(self) -> bool | None:
        return None if self.difference is None else self.difference.excludes_zero()

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "trial_id": self.other.trial_id,
            "params": self.other.params,
            "items": self.items,
            "phi_difference": None if self.difference is None else self.difference.to_dict(),
            "distinguishable": self.distinguishable,
        }


@dataclass
class SweepAnalysis:
    """A sweep's configurations (seeds grouped), their intervals, and how to compare them.

    ``points`` are what :func:`rpsft.sweeps.analysis.selection.select` ranks: ``G_id`` / ``F_ood`` on the selection items
    (``point.items == "selection"``) where the configuration has item scores and the items are split, else on
    all items. ``intervals`` are every configuration's intervals on all items (descriptive);
    ``selection_intervals`` / ``report_intervals`` the same on each part (all three the same object when the
    items are not split)."""

    groups: list[TrialGroup]
    points: list[TrialPoint]  # one per configuration (the mean over its seeds), on the selection items
    intervals: SweepIntervals | None  # all items
    selection_intervals: SweepIntervals | None = None
    report_intervals: SweepIntervals | None = None
    split: ItemSplit | None = None  # None or inactive: chosen and reported on all items
    all_points: list[TrialPoint] = field(default_factory=list)  # the same configurations on all items
    betas: list[float] = field(default_factory=list)  # the objective's betas (intervals carry Phi at each)

    def __post_init__(self) -> None:
        if not self.split_active:
            self.selection_intervals = self.selection_intervals or self.intervals
            self.report_intervals = self.report_intervals or self.intervals
        if not self.all_points:
            self.all_points = [g.point for g in self.groups]

    @property
    def split_active(self) -> bool:
        return self.split is not None and self.split.active

    def split_dict(self) -> dict[str, Any]:
        split = self.split if self.split is not None else ItemSplit(0.0)
        return {**split.to_dict(), "active": self.split_active, "text": split.describe()}

    def all_items_point(self, point: TrialPoint) -> TrialPoint:
        """The configuration of ``point`` with its ``G_id`` / ``F_ood`` on all items (the trials' own metrics)."""
        return next((p for p in self.all_points if item_key(p) == item_key(point)), point)

    def numbers(self, point: TrialPoint, beta: float, part: str) -> PartNumbers:
        """``point``'s numbers on the ``selection`` or ``report`` items; on all items (labelled so) when the
        items are not split or the configuration has no item scores."""
        intervals = self.selection_intervals if part == SELECTION else self.report_intervals
        estimates = intervals.estimates(point) if intervals is not None else None
        if estimates is None:  # no item scores: the trials' own numbers on all items
            whole = self.all_items_point(point)
            return PartNumbers(ALL, whole.g_id, whole.f_ood, whole.phi(beta))
        # not split: exactly the numbers the choice was made on (the trials' own metrics, as before the split)
        g, f = estimates if self.split_active else (point.g_id, point.f_ood)
        return PartNumbers(
            intervals.items, g, f, phi(g, f, beta), intervals.of(point), dict(intervals.draws.n_items)
        )

    def operating_point(self, best: TrialPoint, beta: float) -> dict[str, PartNumbers]:
        """The chosen point on the items it was chosen on (``selection``) and on the held-out ones (``report``)."""
        return {SELECTION: self.numbers(best, beta, SELECTION), REPORT: self.numbers(best, beta, REPORT)}

    def comparisons(self, best: TrialPoint, ranking: Sequence[TrialPoint], beta: float) -> list[Comparison]:
        """The operating point against the runner-up and against every ``sft`` reference configuration, on the
        report items."""
        out = []
        items = self.report_intervals.items if self.report_intervals is not None else ALL
        others = [p for p in ranking if item_key(p) != item_key(best)]
        if others:
            out.append(Comparison("runner-up", others[0], self._diff(best, others[0], beta), items))
        for point in self.points:
            if (
                point.params.get("method") == "sft"
                and item_key(point) != item_key(best)
                and intermediate_step(point) is None  # a trajectory's sft steps: its final point only
            ):
                out.append(Comparison("sft", point, self._diff(best, point, beta), items))
        return out

    def _diff(self, a: TrialPoint, b: TrialPoint, beta: float) -> Interval | None:
        return None if self.report_intervals is None else self.report_intervals.difference(a, b, beta)


def selection_points(
    groups: Sequence[TrialGroup], selection_intervals: SweepIntervals | None
) -> list[TrialPoint]:
    """One point per configuration for :func:`rpsft.sweeps.analysis.selection.select`: on the selection items where
    ``selection_intervals`` (a ``selection`` part) knows the configuration, else its mean on all items."""
    out = []
    for group in groups:
        point = group.point
        estimates = selection_intervals.estimates(point) if selection_intervals is not None else None
        if estimates is not None and selection_intervals.items == SELECTION:
            point = replace(point, g_id=estimates[0], f_ood=estimates[1], items=SELECTION)
        out.append(point)
    return out


def read_base_item_scores(config: Any, client: Any, parent_run_id: str) -> dict[str, Any] | None:
    """The base model's item scores: the sweep directory's (:meth:`rpsft.sweeps.store.sweep_store.SweepStore.
    read_base_item_scores`), else the parent run's artifact."""
    stored = SweepStore.of(config).read_base_item_scores()
    return stored if stored is not None else tracking.download_json(client, parent_run_id, BASE_ITEM_SCORES)


def analyze_items(
    points: Sequence[TrialPoint],
    base_items: Mapping[str, Any] | None,
    trial_items: Mapping[str, Mapping[str, Any]],
    metric: str,
    betas: Sequence[float],
    *,
    split: ItemSplit | None = None,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepAnalysis:
    """Group finished trials by configuration and bootstrap them from their item scores (``trial_items``: run
    id -> stored item scores): on all items, and on the selection and report parts of ``split``; the analysis'
    points carry the selection part's ``G_id`` / ``F_ood`` (see :class:`SweepAnalysis`)."""
    groups = group_points(points)
    split = split if split is not None else ItemSplit(0.0)
    intervals = selection = report = None
    if base_items is not None and metric in METRIC_ITEMS:

        def bootstrap(part: str) -> SweepIntervals | None:
            return sweep_intervals(
                groups, base_items, trial_items, metric, betas,
                draws=draws, level=level, seed=seed, split=split, part=part,
            )  # fmt: skip

        intervals = bootstrap(ALL)
        if split.active and intervals is not None:
            selection, report = bootstrap(SELECTION), bootstrap(REPORT)
    chosen_on = selection_points(groups, selection) if split.active else [g.point for g in groups]
    return SweepAnalysis(groups, chosen_on, intervals, selection, report, split, betas=list(betas))


def analyze_sweep(
    config: Any,
    client: Any,
    parent_run_id: str,
    points: Sequence[TrialPoint],
    *,
    draws: int | None = None,
    item_cache: dict[str, dict[str, Any]] | None = None,
) -> SweepAnalysis:
    """:func:`analyze_items` of a sweep's finished trials (``points``: :func:`rpsft.sweeps.analysis.trajectory.sweep_points`, every
    scored checkpoint with ``evaluation.trajectory: true``), from the stored item scores (the base model's from
    ``<sweep>/base_item_scores.json`` or the parent run's artifact) and the sweep's ``evaluation.split`` and
    ``rpsft.evaluation.intervals``. ``draws`` overrides the config's (1 when only the points matter);
    ``item_cache`` keeps downloaded item scores across calls."""
    metric = config.objective.metric
    base = read_base_item_scores(config, client, parent_run_id)
    scored = base is not None and metric in METRIC_ITEMS
    trial_items = stored_item_scores(client, points, item_cache) if scored else {}
    ev = config.evaluation.intervals
    return analyze_items(
        points,
        base,
        trial_items,
        metric,
        config.objective.betas,
        split=config.evaluation.split.item_split(),
        draws=ev.draws if draws is None else draws,
        level=ev.level,
        seed=ev.seed,
    )
