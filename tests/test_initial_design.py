"""The default sampler's space-filling start: a small budget sees every k choice, and ranges are stratified."""

from __future__ import annotations

import math

import pytest
from rpsft.sweeps.search.initial_design import design_size
from rpsft.sweeps.search.initial_design import initial_design as design_of_distributions
from rpsft.sweeps.search.space import search_distributions
from sweep_helpers import sweep_dict


def initial_design(dims, num_trials, seed):
    return design_of_distributions(search_distributions(dims), num_trials, seed)


def test_every_listed_choice_appears_before_any_repeats():
    dims = {"k": [8, 32, 128], "lambda": [1.0, 10.0], "layers": ["all", "attn", "mlp", "qk"], "period": [1]}
    for seed in range(20):
        points = initial_design(dims, num_trials=4, seed=seed)
        assert len(points) == 4
        assert {p["k"] for p in points} == {8, 32, 128}
        assert sorted(p["layers"] for p in points) == ["all", "attn", "mlp", "qk"]
        assert sorted(p["lambda"] for p in points) == [1.0, 1.0, 10.0, 10.0]
        assert {p["period"] for p in points} == {1}


def test_a_range_gets_one_draw_in_each_equal_stratum():
    for log in (True, False):
        dims = {"k": [16], "lambda": {"low": 0.01, "high": 100.0, "log": log}}
        points = initial_design(dims, num_trials=12, seed=3)
        n = design_size(search_distributions(dims), 12)
        assert n == 4 and len(points) == n  # a third of the budget; the sampler takes the rest
        scale = math.log if log else (lambda v: v)
        lo, hi = scale(0.01), scale(100.0)
        strata = sorted(int((scale(p["lambda"]) - lo) / (hi - lo) * n) for p in points)
        assert strata == list(range(n))


def test_integer_ranks_stay_integers_and_in_bounds():
    points = initial_design({"k": {"low": 8, "high": 256, "log": True}}, 9, seed=0)
    assert all(isinstance(p["k"], int) and 8 <= p["k"] <= 256 for p in points)
    assert len({p["k"] for p in points}) == len(points)


def test_same_seed_same_design_other_seed_other_pairing():
    dims = {"k": [8, 32, 128], "lambda": {"low": 0.1, "high": 10.0, "log": True}}
    assert initial_design(dims, 3, seed=1) == initial_design(dims, 3, seed=1)
    assert initial_design(dims, 3, seed=1) != initial_design(dims, 3, seed=2)


@pytest.mark.parametrize("mode", ["phi", "pareto"])
def test_the_default_sampler_uses_all_three_k_choices_in_three_trials(tmp_path, mode):
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.search.space import build_searcher

    raw = sweep_dict(
        "design", tmp_path / "model", tmp_path, references=[], search={"num_trials": 3, "seed": 0}
    )
    raw["space"] = {"k": [8, 32, 128], "lambda": {"low": 0.1, "high": 10.0, "log": True}, "layers": ["all"]}
    raw["objective"] = {**raw["objective"], "mode": mode}
    config = parse_sweep_config(raw)
    assert config.search.algorithm == "auto"
    searcher = build_searcher(config, storage=None)
    suggested = [searcher.suggest(f"trial_{i}") for i in range(4)]
    assert {s["k"] for s in suggested[:3]} == {8, 32, 128}
    assert suggested[3]["k"] in (8, 32, 128)  # then the sampler proposes on its own
    assert all(0.1 <= s["lambda"] <= 10.0 for s in suggested)
