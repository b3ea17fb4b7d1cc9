"""Paired bootstrap confidence intervals for the trade-off ``G_id``, ``F_ood`` and ``Phi = G_id - beta F_ood``.

A model's scores are kept **per item**: for each suite (``id``, ``ood``) and benchmark, one ``(value, weight)``
pair per item. A benchmark's score is the weighted mean ``sum(value) / sum(weight)`` over its items: for the
loss metrics ``value`` is minus the summed token NLL of the item and ``weight`` its token count (the
token-weighted mean of :mod:`rpsft.evaluation.loss_metrics`); for accuracies ``weight`` is 1. Suites average their
benchmarks (macro average), and

    G_id  = mean_b in id  [score_tuned(b) - score_base(b)]
    F_ood = mean_b in ood [score_base(b) - score_tuned(b)]

A bootstrap draw resamples the items of every benchmark with replacement (stratified by benchmark) and uses
the **same** item indices for the base model, for every seed of a configuration and for every configuration
compared, so item difficulty cancels in the differences (paired). When a configuration ran with several seeds,
each draw also resamples its seeds with replacement and averages them, so seed variance enters the interval.
Intervals are percentile intervals of the draws; the point estimate is the statistic on the original items
(the mean over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from rpsft.evaluation.metrics import phi

# suite -> benchmark -> [(value, weight), ...] one pair per item
ItemScores = Mapping[str, Mapping[str, Sequence[Sequence[float]]]]

DEFAULT_DRAWS = 2000
DEFAULT_LEVEL = 0.95


class IntervalError(ValueError):
    """Item scores that cannot be paired (different benchmarks or item counts)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile interval ``[low, high]`` at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def text(self, fmt: str = "{:+.4f}") -> str:
        return f"{fmt.format(self.estimate)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


@dataclass
class TradeOffDraws:
    """Bootstrap draws of ``G_id`` and ``F_ood`` for several configurations, all on the same resampled items."""

    point_g: dict[str, float]
    point_f: dict[str, float]
    draws_g: dict[str, np.ndarray]
    draws_f: dict[str, np.ndarray]
    level: float = DEFAULT_LEVEL
    n_items: dict[str, int] = field(default_factory=dict)  # benchmark -> items

    def _interval(self, estimate: float, draws: np.ndarray) -> Interval:
        finite = draws[np.isfinite(draws)]
        if not finite.size or not math.isfinite(estimate):
            return Interval(estimate, float("nan"), float("nan"), self.level)
        alpha = (1.0 - self.level) / 2.0
        low, high = np.quantile(finite, [alpha, 1.0 - alpha])
        return Interval(float(estimate), float(low), float(high), self.level)

    def g_id(self, name: str) -> Interval:
        return self._interval(self.point_g[name], self.draws_g[name])

    def f_ood(self, name: str) -> Interval:
        return self._interval(self.point_f[name], self.draws_f[name])

    def phi(self, name: str, beta: float) -> Interval:
        return self._interval(
            phi(self.point_g[name], self.point_f[name], beta),
            phi(self.draws_g[name], self.draws_f[name], beta),
        )

    def phi_difference(self, a: str, b: str, beta: float) -> Interval:
        """``Phi_a - Phi_b`` at ``beta``, paired on the same items."""
        point = phi(self.point_g[a], self.point_f[a], beta) - phi(self.point_g[b], self.point_f[b], beta)
        draws = phi(self.draws_g[a], self.draws_f[a], beta) - phi(self.draws_g[b], self.draws_f[b], beta)
        return self._interval(point, draws)

    def g_difference(self, a: str, b: str) -> Interval:
        return self._interval(self.point_g[a] - self.point_g[b], self.draws_g[a] - self.draws_g[b])

    def f_difference(self, a: str, b: str) -> Interval:
        return self._interval(self.point_f[a] - self.point_f[b], self.draws_f[a] - self.draws_f[b])

    def summary(self, name: str, betas: Sequence[float]) -> dict[str, Interval]:
        """``g_id``, ``f_ood`` and ``phi@<beta>`` intervals of one configuration."""
        out = {"g_id": self.g_id(name), "f_ood": self.f_ood(name)}
        for beta in betas:
            out[f"phi@{beta:g}"] = self.phi(name, beta)
        return out


def _arrays(scores: ItemScores, suite: str, bench: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray(scores[suite][bench], dtype=np.float64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _layout(base: ItemScores, configs: Mapping[str, Sequence[ItemScores]]) -> dict[str, dict[str, int]]:
    """suite -> benchmark -> item count, checked to agree between the base and every seed of every config."""
    layout: dict[str, dict[str, int]] = {}
    for suite in ("id", "ood"):
        for bench, pairs in (base.get(suite) or {}).items():
            if len(pairs):
                layout.setdefault(suite, {})[bench] = len(pairs)
    for name, seeds in configs.items():
        if not seeds:
            raise IntervalError(f"intervals: configuration {name!r} has no item scores")
        for i, scores in enumerate(seeds):
            for suite, benches in layout.items():
                for bench, n in benches.items():
                    got = len((scores.get(suite) or {}).get(bench) or [])
                    if got != n:
                        raise IntervalError(
                            f"intervals: {name!r} seed #{i} has {got} items of {suite}/{bench}, the base has {n}. "
                            "Fix: score every model on the same items"
                        )
    return layout


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray | None) -> np.ndarray | float:
    if idx is None:
        total = weights.sum()
        return values.sum() / total if total > 0 else float("nan")
    w = weights[idx].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return values[idx].sum(axis=-1) / w


def bootstrap_tradeoff(
    base: ItemScores,
    configs: Mapping[str, Sequence[ItemScores]],
    *,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> TradeOffDraws:
    """Paired, stratified bootstrap of ``G_id`` / ``F_ood`` for each configuration (a list of seeds each).

    ``base`` and every seed's scores are ``{suite: {benchmark: [(value, weight), ...]}}`` on the same items in
    the same order. Returns the draws; :class:`TradeOffDraws` turns them into intervals of ``G_id``, ``F_ood``,
    ``Phi(beta)`` and of differences between configurations.
    """
    if draws < 1:
        raise IntervalError(f"intervals: draws must be >= 1, got {draws}")
    if not 0 < level < 1:
        raise IntervalError(f"intervals: level must be in (0, 1), got {level}")
    layout = _layout(base, configs)
    rng = np.random.default_rng(seed)
    names = list(configs)
    # the same item indices for everything, per benchmark
    indices = {
        (suite, bench): rng.integers(0, n, size=(draws, n))
        for suite, benches in layout.items()
        for bench, n in benches.items()
    }
    seed_picks = {
        name: rng.integers(0, len(configs[name]), size=(draws, len(configs[name]))) for name in names
    }
    point: dict[str, dict[str, float]] = {name: {} for name in names}
    drawn: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for suite in ("id", "ood"):
        benches = layout.get(suite, {})
        sign = 1.0 if suite == "id" else -1.0  # G = tuned - base on id; F = base - tuned on ood
        for name in names:
            if not benches:
                point[name][suite] = float("nan")
                drawn[name][suite] = np.full(draws, np.nan)
                continue
            p_sum, d_sum = 0.0, np.zeros(draws)
            for bench in benches:
                idx = indices[(suite, bench)]
                bv, bw = _arrays(base, suite, bench)
                base_point, base_draws = _weighted_means(bv, bw, None), _weighted_means(bv, bw, idx)
                per_seed_point, per_seed_draws = [], []
                for scores in configs[name]:
                    tv, tw = _arrays(scores, suite, bench)
                    per_seed_point.append(_weighted_means(tv, tw, None))
                    per_seed_draws.append(_weighted_means(tv, tw, idx))
                seed_matrix = np.stack(per_seed_draws)  # seeds x draws
                picks = seed_picks[name]  # draws x seeds (resampled seeds)
                tuned_draws = seed_matrix[picks, np.arange(draws)[:, None]].mean(axis=1)
                p_sum += sign * (float(np.mean(per_seed_point)) - base_point)
                d_sum += sign * (tuned_draws - base_draws)
            point[name][suite] = p_sum / len(benches)
            drawn[name][suite] = d_sum / len(benches)
    n_items = {bench: n for benches in layout.values() for bench, n in benches.items()}
    return TradeOffDraws(
        point_g={name: point[name]["id"] for name in names},
        point_f={name: point[name]["ood"] for name in names},
        draws_g={name: drawn[name]["id"] for name in names},
        draws_f={name: drawn[name]["ood"] for name in names},
        level=level,
        n_items=n_items,
    )


def interval_metrics(intervals: Mapping[str, Interval]) -> dict[str, float]:
    """Flat metrics of a summary: ``<name>_lo`` and ``<name>_hi`` per interval (``phi@1_lo``, ...)."""
    out: dict[str, float] = {}
    for name, interval in intervals.items():
        out[f"{name}_lo"] = interval.low
        out[f"{name}_hi"] = interval.high
    return out
