"""Operating-point selection on hand-built results, checked against brute force."""

import itertools
import math
import random

import pytest
from rpsft.sweeps.analysis.selection import TrialPoint, beta_path, max_phi, pareto_front, select


def P(tid, g, f):
    return TrialPoint(tid, g, f, {"k": tid})


HAND = [
    P("a", 0.30, 0.20),  # most gain, most forgetting
    P("b", 0.25, 0.10),
    P("c", 0.10, 0.02),
    P("d", 0.05, 0.00),  # no forgetting
    P("e", 0.20, 0.15),  # dominated by b
    P("f", 0.09, 0.05),  # dominated by c
]


def test_max_phi_on_hand_built_results():
    # beta=0: max gain; beta=1: phi = 0.10, 0.15, 0.08, 0.05, 0.05, 0.04 -> b; beta=10: -1.7,-0.75,-0.1,0.05 -> d
    assert max_phi(HAND, 0.0).trial_id == "a"
    assert max_phi(HAND, 1.0).trial_id == "b"
    assert max_phi(HAND, 10.0).trial_id == "d"


def test_pareto_front_is_exact():
    assert [p.trial_id for p in pareto_front(HAND)] == ["d", "c", "b", "a"]


def test_beta_path_breakpoints_by_hand():
    path = beta_path(HAND)
    assert [i.point.trial_id for i in path] == ["a", "b", "c", "d"]
    # a->b at (0.30-0.25)/(0.20-0.10)=0.5; b->c at (0.25-0.10)/(0.10-0.02)=1.875; c->d at 0.05/0.02=2.5
    assert [i.high for i in path[:-1]] == pytest.approx([0.5, 1.875, 2.5])
    assert path[0].low == 0.0 and math.isinf(path[-1].high)


def brute_front(points):
    return sorted(
        p.trial_id
        for p in points
        if not any(
            q.g_id >= p.g_id and q.f_ood <= p.f_ood and (q.g_id > p.g_id or q.f_ood < p.f_ood) for q in points
        )
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_sets_match_brute_force(seed):
    rng = random.Random(seed)
    points = [P(f"t{i}", rng.uniform(-0.1, 0.4), rng.uniform(-0.05, 0.3)) for i in range(25)]
    assert sorted(p.trial_id for p in pareto_front(points)) == brute_front(points)
    path = beta_path(points)
    # every beta inside an interval picks that interval's trial, as a dense scan finds
    for interval in path:
        hi = interval.high if math.isfinite(interval.high) else interval.low + 10
        for t in (0.25, 0.5, 0.75):
            beta = interval.low + t * (hi - interval.low)
            best = max(points, key=lambda p: p.g_id - beta * p.f_ood)
            assert interval.point.trial_id == best.trial_id
    # the path only visits Pareto-optimal trials, in order of decreasing forgetting
    front = {p.trial_id for p in pareto_front(points)}
    assert {i.point.trial_id for i in path} <= front
    assert all(a.point.f_ood > b.point.f_ood for a, b in itertools.pairwise(path))


def test_select_ranks_and_rejects_empty():
    sel = select(HAND, 1.0)
    assert sel.best.trial_id == "b"
    assert [p.trial_id for p in sel.ranking][:2] == ["b", "a"]
    assert sel.to_dict()["best"]["phi"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no finished trial"):
        select([P("x", float("nan"), 0.1)], 1.0)


def test_the_summary_says_why_a_point_without_id_gain_is_chosen():
    from rpsft.sweeps.analysis.summary import selection_text

    others_gain = select([TrialPoint("l2", -0.001, -0.004, {}), TrialPoint("sft", 0.04, 0.06, {})], 1.0)
    assert others_gain.best.trial_id == "l2"
    text = selection_text(others_gain)
    assert "the 1 configuration(s) that gain on ID forget more than they gain at this beta" in text
    none_gain = select([TrialPoint("a", -0.001, -0.004, {}), TrialPoint("b", -0.01, 0.02, {})], 1.0)
    assert "no trained trial gains on ID at this scale" in selection_text(none_gain)
    gains = select([TrialPoint("c", 0.03, 0.01, {})], 1.0)
    assert "does not raise the ID score" not in selection_text(gains)
