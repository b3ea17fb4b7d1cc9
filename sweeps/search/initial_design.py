"""The first searched trials of a default (``search.algorithm: auto``) sweep: a space-filling design.

TPE and NSGA-II start from random draws, so a budget of 3 trials over 3 k choices may train one k three times
and never show Phi(k). The design spreads the first trials instead, Latin-hypercube style: every choice of a
listed knob appears once before any appears twice, a range is cut into equal strata (in log space for a log
range) with one draw in each, and the knobs are paired at random. The sampler takes over after the design
(its random start-up is the design).
"""

from __future__ import annotations

import math
import random
from typing import Any

# penalty_mode last, so that the other knobs' columns draw as they did before it existed
KNOBS = ("k", "lambda", "layers", "period", "penalty_mode")


def design_size(distributions: dict[str, Any], num_trials: int) -> int:
    """How many of ``num_trials`` the design takes: enough to show every listed choice of every knob, and at
    least the third of the budget that TPE would have drawn at random."""
    from optuna.distributions import CategoricalDistribution

    widest = max(
        (len(d.choices) for d in distributions.values() if isinstance(d, CategoricalDistribution)), default=1
    )
    return min(num_trials, max(2, num_trials // 3, widest))


def _column(distribution: Any, n: int, rng: random.Random) -> list[Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        order = list(distribution.choices)
        rng.shuffle(order)
        column = [order[i % len(order)] for i in range(n)]
    else:
        low, high, log = float(distribution.low), float(distribution.high), distribution.log
        lo, hi = (math.log(low), math.log(high)) if log else (low, high)
        column = []
        for i in range(n):
            x = lo + (i + rng.random()) / n * (hi - lo)
            column.append(math.exp(x) if log else x)
        if isinstance(distribution, IntDistribution):
            column = [min(int(high), max(int(low), round(v))) for v in column]
    rng.shuffle(column)
    return column


def initial_design(distributions: dict[str, Any], num_trials: int, seed: int) -> list[dict[str, Any]]:
    """``design_size`` points of the knobs' Optuna ``distributions`` (``rpsft.sweeps.search.space.search_distributions``)."""
    n = design_size(distributions, num_trials)
    if n <= 0:
        return []
    rng = random.Random(seed)
    columns = {knob: _column(distributions[knob], n, rng) for knob in KNOBS if knob in distributions}
    return [{knob: column[i] for knob, column in columns.items()} for i in range(n)]
