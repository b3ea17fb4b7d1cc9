"""Paired bootstrap intervals of G_id / F_ood / Phi against analytic and hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
from rpsft.evaluation.intervals import IntervalError, bootstrap_tradeoff, interval_metrics


def _items(values, weights=None):
    weights = [1.0] * len(values) if weights is None else weights
    return [(float(v), float(w)) for v, w in zip(values, weights)]


def _model(id_values=None, ood_values=None):
    out = {}
    if id_values is not None:
        out["id"] = {"bench": _items(id_values)}
    if ood_values is not None:
        out["ood"] = {"bench": _items(ood_values)}
    return out


def test_mean_of_iid_normals_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n, mu, sigma = 400, 0.3, 1.0
    x = rng.normal(mu, sigma, n)
    base = _model(np.zeros(n), np.zeros(n))
    # G_id = mean(tuned - base) on id; F_ood = mean(base - tuned) on ood
    tuned = _model(x, -x)
    draws = bootstrap_tradeoff(base, {"t": [tuned]}, draws=20000, seed=3)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(n)
    for interval in (draws.g_id("t"), draws.f_ood("t")):
        assert interval.estimate == pytest.approx(x.mean(), abs=1e-12)
        assert interval.low == pytest.approx(x.mean() - half, abs=0.08 * half)
        assert interval.high == pytest.approx(x.mean() + half, abs=0.08 * half)
    # ID and OOD items are different items, resampled independently: Phi = G - beta F has the estimate
    # (1 - beta) mean(x) and the half-width sqrt(1 + beta^2) * half of a difference of independent means
    phi = draws.phi("t", 0.5)
    assert phi.estimate == pytest.approx(0.5 * x.mean())
    assert phi.high - phi.low == pytest.approx(math.sqrt(1.25) * 2 * half, rel=0.08)


def test_hand_computed_three_items_by_enumeration():
    x = [1.0, 2.0, 6.0]
    # every equally likely resample of 3 items from 3: the exact bootstrap distribution of the mean
    exact = sorted(sum(c) / 3 for c in itertools.product(x, repeat=3))
    assert len(exact) == 27
    exact_mean = sum(exact) / 27
    exact_var = sum((m - exact_mean) ** 2 for m in exact) / 27
    assert exact_mean == pytest.approx(3.0)
    assert exact_var == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3 / 3)  # 14/9
    draws = bootstrap_tradeoff(_model([0, 0, 0]), {"t": [_model(x)]}, draws=200000, seed=0, level=0.9)
    g = draws.draws_g["t"]
    assert g.mean() == pytest.approx(exact_mean, abs=0.01)
    assert g.var() == pytest.approx(exact_var, rel=0.02)
    # the percentile bounds fall between the atoms around the exact 5% and 95% quantiles
    interval = draws.g_id("t")
    lo_atoms = [exact[int(0.05 * 26)], exact[int(math.ceil(0.05 * 26))]]
    hi_atoms = [exact[int(0.95 * 26)], exact[int(math.ceil(0.95 * 26))]]
    assert min(lo_atoms) - 1e-9 <= interval.low <= max(lo_atoms) + 1e-9
    assert min(hi_atoms) - 1e-9 <= interval.high <= max(hi_atoms) + 1e-9
    assert interval.estimate == pytest.approx(3.0)


def test_token_weighted_benchmarks_and_macro_average():
    base = {
        "id": {"a": _items([-2.0, -6.0], [1, 3]), "b": _items([-1.0], [1])},
        "ood": {"c": _items([-4.0, -4.0], [2, 2])},
    }
    tuned = {
        "id": {"a": _items([-1.0, -3.0], [1, 3]), "b": _items([-0.5], [1])},
        "ood": {"c": _items([-6.0, -6.0], [2, 2])},
    }
    draws = bootstrap_tradeoff(base, {"t": [tuned]}, draws=200)
    # a: base -8/4 = -2, tuned -4/4 = -1 -> +1; b: -1 -> -0.5 -> +0.5; G = mean(1, 0.5)
    assert draws.g_id("t").estimate == pytest.approx(0.75)
    # c: base -2 per token, tuned -3 per token: F = base - tuned = 1
    assert draws.f_ood("t").estimate == pytest.approx(1.0)
    assert draws.n_items == {"a": 2, "b": 1, "c": 2}


def test_pairing_cancels_item_difficulty():
    rng = np.random.default_rng(0)
    hard = rng.normal(0, 5, 200)  # item difficulty varies a lot
    draws = bootstrap_tradeoff(_model(hard, hard), {"shifted": [_model(hard + 0.1, hard)]}, draws=500)
    g = draws.g_id("shifted")
    assert g.low == pytest.approx(0.1) and g.high == pytest.approx(0.1)  # paired: zero width
    # two configurations, paired against each other: a - b has a degenerate interval too
    both = bootstrap_tradeoff(
        _model(hard, hard), {"a": [_model(hard + 0.3, hard)], "b": [_model(hard + 0.1, hard)]}, draws=500
    )
    diff = both.phi_difference("a", "b", beta=1.0)
    assert diff.estimate == pytest.approx(0.2) and diff.low == pytest.approx(0.2) and diff.excludes_zero()
    assert both.phi_difference("a", "a", 1.0).high == 0.0


def test_seeds_are_pooled_and_their_variance_enters():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, 300)
    noise = rng.normal(0, 0.05, 300)
    one = _model(base + 0.1 + noise)
    same = bootstrap_tradeoff(_model(base), {"t": [one, one]}, draws=4000, seed=5)
    single = bootstrap_tradeoff(_model(base), {"t": [one]}, draws=4000, seed=5)
    assert same.g_id("t").estimate == pytest.approx(single.g_id("t").estimate)
    seeds = [_model(base + 0.1 + noise + d) for d in (-0.2, 0.0, 0.2)]
    pooled = bootstrap_tradeoff(_model(base), {"t": seeds}, draws=4000, seed=5)
    assert pooled.g_id("t").estimate == pytest.approx(single.g_id("t").estimate)
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(pooled.g_id("t")) > 3 * width(single.g_id("t"))


def test_mismatched_items_and_bad_settings_fail():
    with pytest.raises(IntervalError, match="3 items of id/bench, the base has 2"):
        bootstrap_tradeoff(_model([0, 0]), {"t": [_model([0, 0, 0])]})
    with pytest.raises(IntervalError, match="draws"):
        bootstrap_tradeoff(_model([0]), {"t": [_model([0])]}, draws=0)
    with pytest.raises(IntervalError, match="no item scores"):
        bootstrap_tradeoff(_model([0]), {"t": []})


def test_interval_metrics_names():
    draws = bootstrap_tradeoff(_model([0, 1], [0, 1]), {"t": [_model([1, 2], [0, 1])]}, draws=100)
    flat = interval_metrics(draws.summary("t", [1.0, 0.5]))
    assert set(flat) == {
        "g_id_lo", "g_id_hi", "f_ood_lo", "f_ood_hi", "phi@1_lo", "phi@1_hi", "phi@0.5_lo", "phi@0.5_hi"
    }
    assert flat["g_id_lo"] <= 1.0 <= flat["g_id_hi"]
