"""A study's configurations read from a stored sweep (seeds pooled, final checkpoints) and forgetting under
two views: ``nll`` (the rise in NLL of the base model's own answers; the sweeps' objective) and ``mc`` (the drop
in log-likelihood multiple-choice accuracy, ``evaluation.mc``), each with its paired bootstrap interval, and
where the two disagree (:data:`VIEW_RULE`). The claims (:mod:`rpsft.sweeps.analysis.claims`) read these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rpsft.core.config import TrainConfig
from rpsft.evaluation.intervals import Interval, IntervalError
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.analysis.summary import configuration_label
from rpsft.sweeps.analysis.trajectory import intermediate_step
from rpsft.sweeps.analysis.uncertainty import METRIC_ITEMS, SweepIntervals, TrialGroup, sweep_intervals
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.store.sweep_store import TrialRecord

ROTATION = "rotation/mean_deg"


@dataclass
class Configuration:
    """One configuration of the study (its seeds pooled), with the numbers the claims read."""

    point: TrialPoint
    intervals: dict[str, Interval]
    metrics: dict[str, float]  # mean over seeds: drift_mean, rotation/mean_deg, train_loss, ...
    f_ood_views: dict[str, Interval] = field(default_factory=dict)  # "nll" / "mc" -> F_ood (forgetting_views)
    default_optimizer: str = TrainConfig.model_fields["optimizer"].default  # the sweep's train.optimizer
    default_learning_rate: float = TrainConfig.model_fields["learning_rate"].default  # the sweep's train.learning_rate

    @property
    def method(self) -> str:
        return str(self.point.params.get("method", ""))

    @property
    def label(self) -> str:
        return configuration_label(self.point)

    def param(self, name: str) -> str | None:
        value = self.point.params.get(name)
        return None if value in (None, "", "None") else str(value)

    @property
    def lam(self) -> float | None:
        value = self.param("lambda")
        return None if value is None else float(value)

    @property
    def k_value(self) -> float | None:
        """k as trained: the resolved fraction for ``auto``, else the logged number."""
        for name in ("k_resolved", "k"):
            value = self.param(name)
            if value is None:
                continue
            try:
                return float(value)
            except ValueError:
                continue
        return None

    @property
    def auto(self) -> bool:
        return str(self.param("k") or "").startswith("auto")

    @property
    def optimizer(self) -> str:
        """The optimizer the configuration trained with (as logged; the sweep's for trials logged before)."""
        return self.param("optimizer") or self.default_optimizer

    @property
    def penalty_mode(self) -> str:
        return self.param("penalty_mode") or "loss"

    @property
    def paper_setting(self) -> bool:
        """Trained as the paper trains: AdamW with the penalty in the loss, at the sweep's learning rate (not a
        reference's own optimizer, learning rate or decoupled penalty). C3, C4 and C6 read only these."""
        lr = self.param("learning_rate")
        same_lr = lr is None or math.isclose(float(lr), self.default_learning_rate)
        return self.optimizer.startswith("adamw") and self.penalty_mode == "loss" and same_lr

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "trial_id": self.point.trial_id,
            "n_seeds": self.point.n_seeds,
            "params": self.point.params,
            "g_id": self.point.g_id,
            "f_ood": self.point.f_ood,
            "intervals": {name: i.to_dict() for name, i in self.intervals.items()},
            "f_ood_views": {view: i.to_dict() for view, i in self.f_ood_views.items()},
            "metrics": self.metrics,
        }


def _sign(interval: Interval | None) -> int:
    """+1 / -1 when the interval excludes 0 on that side, 0 when it holds 0 (or is missing)."""
    if interval is None or not math.isfinite(interval.low):
        return 0
    return 1 if interval.low > 0 else -1 if interval.high < 0 else 0


def _mean_metrics(trials: dict[str, TrialRecord], point: TrialPoint) -> dict[str, float]:
    keys = ("drift_mean", "drift_max", ROTATION, "train_loss", "train_seconds")
    out = {}
    for key in keys:
        members = [trials[r].metrics for r in (point.run_ids or (point.run_id,))]
        values = [metrics[key] for metrics in members if key in metrics]
        if values:
            out[key] = sum(values) / len(values)
    return out


def configurations(stored: Any) -> tuple[list[Configuration], Any]:
    """The study's configurations from a stored sweep (:class:`rpsft.sweeps.analysis.stored_sweep.StoredSweep`)."""
    analysis = stored.analysis
    if analysis.intervals is None:
        raise SweepConfigError(
            f"study: sweep {stored.config.name!r} has no per-item scores to build intervals from. "
            "Fix: objective.metric nll, kl or mc, and rerun the sweep"
        )
    trials = {trial.run_id: trial for trial in stored.trials}
    optimizer = stored.config.train.get("optimizer") or TrainConfig.model_fields["optimizer"].default
    learning_rate = stored.config.train.get("learning_rate") or TrainConfig.model_fields["learning_rate"].default
    out = []
    # every configuration on all items (no choice is reported). C1 and C3-C6 are claims about trained models, so
    # they read each trial's final checkpoint; C2 compares family frontiers over every scored checkpoint.
    for point in analysis.all_points:
        if intermediate_step(point) is not None:
            continue
        summary = analysis.intervals.of(point)
        if summary is None:
            continue
        out.append(
            Configuration(
                point,
                summary,
                _mean_metrics(trials, point),
                default_optimizer=optimizer,
                default_learning_rate=float(learning_rate),
            )
        )
    return out, analysis.intervals

# ------------------------------------------------------------------------------------------ forgetting views

VIEWS = ("nll", "mc")  # nll: the rise in NLL of the base model's own answers; mc: the drop in MC accuracy
VIEW_RULE = (
    "the views disagree on a configuration when its F_ood intervals under nll and mc both exclude 0 with "
    "opposite signs, and on a pair of configurations when the paired intervals of F_ood(a) - F_ood(b) under "
    "nll and under mc both exclude 0 with opposite signs (the ranking flips)"
)


def view_intervals(
    groups: list[TrialGroup],
    base_items: dict[str, Any] | None,
    trial_items: dict[str, dict[str, Any]],
    view: str,
    betas: list[float],
    *,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepIntervals | None:
    """Paired bootstrap intervals (all items) under one view of forgetting, of the configurations whose trials
    all stored that view's OOD item scores; ``None`` when the base model or no configuration has them."""
    ood_key = METRIC_ITEMS[view][1]
    if not base_items or not base_items.get(ood_key):
        return None
    # a trial without the view's scores leaves its configuration out (sweep_intervals skips it)
    scored = {key: scores for key, scores in trial_items.items() if scores.get(ood_key)}
    return sweep_intervals(groups, base_items, scored, view, betas, draws=draws, level=level, seed=seed)


def stored_view_intervals(stored: Any) -> dict[str, SweepIntervals | None]:
    """Each view's intervals for a stored sweep: the objective metric's are the analysis' own; the other view
    is bootstrapped the same way from the stored item scores (``None`` when the sweep has none for it)."""
    from rpsft.sweeps.analysis.uncertainty import read_base_item_scores, stored_item_scores

    config, analysis = stored.config, stored.analysis
    out: dict[str, SweepIntervals | None] = {}
    base = trial_items = None
    for view in VIEWS:
        if view == config.objective.metric:
            out[view] = analysis.intervals
            continue
        if base is None:
            base = read_base_item_scores(config, stored.client, stored.context.parent_run_id) or {}
            members = [p for group in analysis.groups for p in group.members]
            trial_items = stored_item_scores(stored.client, members) if base else {}
        ev = config.evaluation.intervals
        try:
            out[view] = view_intervals(
                analysis.groups, base, trial_items, view, config.objective.betas,
                draws=ev.draws, level=ev.level, seed=ev.seed,
            )  # fmt: skip
        except IntervalError:  # item scores that cannot be paired: the view is reported as missing
            out[view] = None
    return out


def attach_views(configs: list[Configuration], views: dict[str, SweepIntervals | None]) -> None:
    """Each configuration's F_ood interval under every view that scored it (``Configuration.f_ood_views``)."""
    for c in configs:
        for view, intervals in views.items():
            key = intervals.key_of(c.point) if intervals is not None else None
            if key is not None:
                c.f_ood_views[view] = intervals.draws.f_ood(key)


def forgetting_views(configs: list[Configuration], views: dict[str, SweepIntervals | None]) -> dict[str, Any]:
    """F_ood of every configuration under nll and mc (after :func:`attach_views`) and where the views disagree
    (:data:`VIEW_RULE`)."""
    available = {view: views.get(view) is not None for view in VIEWS}
    out: dict[str, Any] = {
        "views": list(VIEWS),
        "available": available,
        "rule": VIEW_RULE,
        "configurations": [
            {"label": c.label, "f_ood": {v: _dict(c.f_ood_views.get(v)) for v in VIEWS}} for c in configs
        ],
        "sign_disagreements": [],
        "ranking_flips": [],
    }
    missing = [view for view in VIEWS if not available[view]]
    if missing:
        out["summary"] = (
            f"the sweep has no {' or '.join(missing)} item scores"
            + (" (evaluation.mc is not set)" if "mc" in missing else "")
            + ": F_ood is reported under one view only; the views are not compared"
        )
        return out
    both = [c for c in configs if all(v in c.f_ood_views for v in VIEWS)]
    for c in both:
        nll, mc = c.f_ood_views["nll"], c.f_ood_views["mc"]
        if _sign(nll) * _sign(mc) == -1:
            out["sign_disagreements"].append({"label": c.label, "nll": nll.to_dict(), "mc": mc.to_dict()})
    keys = {v: views[v] for v in VIEWS}
    for i, a in enumerate(both):
        for b in both[i + 1 :]:
            diffs = {
                v: keys[v].draws.f_difference(keys[v].key_of(a.point), keys[v].key_of(b.point)) for v in VIEWS
            }
            if _sign(diffs["nll"]) * _sign(diffs["mc"]) == -1:
                out["ranking_flips"].append(
                    {"a": a.label, "b": b.label, **{v: d.to_dict() for v, d in diffs.items()}}
                )
    signs = ", ".join(
        f"{d['label']} (nll {_text(d['nll'])}, mc {_text(d['mc'])})" for d in out["sign_disagreements"]
    )
    flips = ", ".join(
        f"{d['a']} vs {d['b']} (F_ood difference: nll {_text(d['nll'])}, mc {_text(d['mc'])})"
        for d in out["ranking_flips"]
    )
    out["summary"] = (
        f"{len(both)} configurations scored under both views; opposite signs: {signs or 'none'}; "
        f"ranking flips: {flips or 'none'}"
    )
    return out


def _dict(interval: Interval | None) -> dict[str, float] | None:
    return None if interval is None else interval.to_dict()


def _text(interval: dict[str, float]) -> str:
    return f"{interval['estimate']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"
