"""Avg@k, unbiased Pass@k, macro averages and the trade-off numbers G_id, F_ood, Phi.

* ``avg@k`` of an item: the fraction of its ``n`` samples that are correct, ``c / n``; a benchmark's Avg@k
  is the mean over items (the paper's "mean accuracy over the k samples").
* ``pass@k`` of an item (Chen et al. 2021, unbiased): ``1 - C(n - c, k) / C(n, k)`` for ``k <= n``; with
  ``k = n`` it is 1 when any sample is correct. A benchmark's Pass@k is the mean over items.
* ``G_id = ID(tuned) - ID(base)``, ``F_ood = OOD(base) - OOD(tuned)``, ``Phi = G_id - beta * F_ood``, where
  ID / OOD are macro averages (unweighted means over the suite's benchmarks) of a per-benchmark score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel


def avg_at_k(correct: Sequence[bool | int | float]) -> float:
    """Mean correctness of one item's samples."""
    if len(correct) == 0:
        raise ValueError("avg@k of an item with no samples")
    return float(sum(float(c) for c in correct)) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def flatten_mean(items: Iterable[Sequence[bool | float]]) -> float:
    """Mean over the concatenation of per-item lists (micro average, as lm-eval's IFEval inst-level acc)."""
    flat = [float(x) for sub in items for x in sub]
    return sum(flat) / len(flat) if flat else 0.0


def phi(g_id, f_ood, beta):
    """``Phi = G_id - beta * F_ood``: the trade-off of a gain on ID against forgetting on OOD. Works on floats
    and, elementwise, on numpy arrays (bootstrap draws)."""
    return g_id - beta * f_ood


def macro_average(scores: Mapping[str, float]) -> float | None:
    """Unweighted mean over benchmarks (``None`` for an empty suite)."""
    return mean(scores.values()) if scores else None


class TradeOff(BaseModel):
    """G_id, F_ood and Phi(beta) from base and tuned scores (per benchmark and macro-averaged)."""

    metric: str
    id_base: float | None
    id_tuned: float | None
    ood_base: float | None
    ood_tuned: float | None
    g_id: float | None
    f_ood: float | None
    phi: dict[str, float]  # str(beta) -> Phi
    per_benchmark: dict[str, dict[str, float]]  # name -> {suite?, base, tuned, delta}


def tradeoff(
    base: Mapping[str, Mapping[str, float]],
    tuned: Mapping[str, Mapping[str, float]],
    betas: Sequence[float] = (1.0,),
    metric: str = "avg@k",
) -> TradeOff:
    """G_id, F_ood, Phi from ``{"id": {bench: score}, "ood": {bench: score}}`` for base and tuned.

    Only benchmarks scored for both models enter the macro averages; a suite with none gives ``None`` and
    contributes 0 to Phi (Phi = G_id alone when no OOD benchmark was run, and vice versa).
    """
    per: dict[str, dict[str, float]] = {}
    avgs: dict[str, tuple[float | None, float | None]] = {}
    for suite in ("id", "ood"):
        b_scores, t_scores = dict(base.get(suite, {})), dict(tuned.get(suite, {}))
        common = [name for name in b_scores if name in t_scores]
        for name in common:
            per[name] = {
                "base": b_scores[name],
                "tuned": t_scores[name],
                "delta": t_scores[name] - b_scores[name],
            }
        avgs[suite] = (
            macro_average({n: b_scores[n] for n in common}),
            macro_average({n: t_scores[n] for n in common}),
        )
    (id_b, id_t), (ood_b, ood_t) = avgs["id"], avgs["ood"]
    g_id = None if id_b is None else id_t - id_b
    f_ood = None if ood_b is None else ood_b - ood_t
    phi_by_beta = {str(float(beta)): phi(g_id or 0.0, f_ood or 0.0, float(beta)) for beta in betas}
    return TradeOff(
        metric=metric,
        id_base=id_b,
        id_tuned=id_t,
        ood_base=ood_b,
        ood_tuned=ood_t,
        g_id=g_id,
        f_ood=f_ood,
        phi=phi_by_beta,
        per_benchmark=per,
    )
