"""Method families compared by their frontiers (:mod:`rpsft.sweeps.analysis.frontiers`): each family's configuration of largest
Phi(beta) on the selection items, reported on the report items; checked against an independent computation on
planted item scores, and for the winner's curse (many noisy configurations of equal true Phi)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tradeoff_by_hand
from rpsft.evaluation.item_split import ItemSplit
from rpsft.sweeps.analysis.frontiers import family, family_frontiers
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.analysis.uncertainty import analyze_items

BENCHES = {"id": ("a", "b"), "ood": ("c", "d")}
BETAS = [0.5, 1.0, 4.0]
SPLIT = ItemSplit(0.5, 2)


def _record(rng, difficulty, g, f, n, noise):
    return {
        f"{suite}_nll": {
            bench: [
                (float(v), 1.0)
                for v in difficulty[(suite, bench)] + (g if suite == "id" else -f) + rng.normal(0, noise, n)
            ]
            for bench in names
        }
        for suite, names in BENCHES.items()
    }


def _tradeoff(base, record, indices=None):
    return tradeoff_by_hand(base, record, BENCHES, indices)


def _sweep(rng, spec, n=40, noise=0.3):
    """Base and trial item scores and the trials' points from ``spec``: ``[(name, params, [(G, F) per seed])]``;
    every item has a shared difficulty (paired across configurations) plus independent noise."""
    difficulty = {(s, b): rng.normal(0, 1, n) for s, names in BENCHES.items() for b in names}
    base = _record(rng, difficulty, 0.0, 0.0, n, noise)
    trials, points, members = {}, [], {}
    for name, params, seeds in spec:
        members[name] = []
        for i, (g, f) in enumerate(seeds):
            run_id = f"{name}-s{i}"
            trials[run_id] = _record(rng, difficulty, g, f, n, noise)
            g_all, f_all = _tradeoff(base, trials[run_id])
            points.append(TrialPoint(run_id, g_all, f_all, {**params, "seed": i}, run_id=run_id))
            members[name].append(run_id)
    return base, trials, points, members


def _indices(base, split, part):
    which = 0 if part == "selection" else 1
    return {
        (s, b): split.indices(s, b, len(base[f"{s}_nll"][b]))[which]
        for s, names in BENCHES.items()
        for b in names
    }


def _hand(base, trials, run_ids, indices):
    pairs = [_tradeoff(base, trials[r], indices) for r in run_ids]
    return tuple(float(np.mean(x)) for x in zip(*pairs))


SPEC = [
    (
        "sft",
        {"method": "sft", "reference": "sft"},
        [(0.30, 0.30), (0.30, 0.30)],
    ),  # two seeds: one configuration
    ("l2-lo", {"method": "l2-init", "lambda": 1.0}, [(0.22, 0.12)]),
    ("l2-hi", {"method": "l2-init", "lambda": 100.0}, [(0.02, 0.00)]),
    ("lora", {"method": "lora", "reference": "lora"}, [(0.10, 0.05)]),
    ("rp-a", {"method": "rpsft", "k": 8, "lambda": 1.0}, [(0.35, 0.20)]),  # best at beta 0.5
    ("rp-b", {"method": "rpsft", "k": 32, "lambda": 1.0}, [(0.25, 0.05)]),  # best at beta 1
    ("rp-c", {"method": "rpsft", "k": 32, "lambda": 10.0, "step": 2}, [(0.12, 0.005)]),  # best at beta 4
    ("rp-dec", {"method": "rpsft", "k": 32, "lambda": 1.0, "penalty_mode": "decoupled"}, [(0.50, 0.05)]),
    ("dft", {"method": "dft"}, [(0.05, 0.30)]),
]
PLANTED = {  # family -> the configuration it chooses at each beta
    "rpsft": {0.5: "rp-a", 1.0: "rp-b", 4.0: "rp-c"},
    "rpsft (decoupled)": {b: "rp-dec" for b in BETAS},
    "l2-init": {0.5: "l2-lo", 1.0: "l2-lo", 4.0: "l2-hi"},
    "sft": {b: "sft" for b in BETAS},
    "lora": {b: "lora" for b in BETAS},
    "dft": {b: "dft" for b in BETAS},
}


def test_families():
    assert family({"method": "rpsft"}) == "rpsft"
    assert family({"method": "rpsft", "penalty_mode": "loss"}) == "rpsft"
    assert family({"method": "rpsft", "penalty_mode": "decoupled"}) == "rpsft (decoupled)"
    assert family({"method": "l2-init", "penalty_mode": "decoupled"}) == "l2-init (decoupled)"
    assert family({}) == "rpsft"  # a trial logged before methods: rpsft, as trial_label says
    assert family({"method": "rpsft", "optimizer": "adamw_torch_fused"}) == "rpsft"
    assert family({"method": "rpsft", "optimizer": "sgd"}) == "rpsft (sgd)"
    assert family({"method": "l2-init", "optimizer": "sgd", "penalty_mode": "decoupled"}) == "l2-init (decoupled, sgd)"


@pytest.mark.parametrize("split", [SPLIT, ItemSplit(0.0)], ids=["split", "no-split"])
def test_each_familys_frontier_point_and_its_report_numbers(split):
    base, trials, points, members = _sweep(np.random.default_rng(4), SPEC, noise=0.05)
    analysis = analyze_items(points, base, trials, "nll", [1.0], split=split, draws=300, seed=1)
    frontiers = family_frontiers(analysis, BETAS)
    assert set(frontiers.families) == set(PLANTED) and frontiers.betas == BETAS
    chosen_on = _indices(base, split, "selection") if split.active else None
    reported_on = _indices(base, split, "report") if split.active else None
    name_of = {name: family({**params}) for name, params, _ in SPEC}
    hand_sel = {name: _hand(base, trials, runs, chosen_on) for name, runs in members.items()}
    hand_rep = {name: _hand(base, trials, runs, reported_on) for name, runs in members.items()}
    for fam, planted in PLANTED.items():
        for beta in BETAS:
            # the family's configuration of largest Phi on the selection items, by hand
            mine = [n for n in members if name_of[n] == fam]
            expected = max(mine, key=lambda n: hand_sel[n][0] - beta * hand_sel[n][1])
            assert expected == planted[beta], (fam, beta)
            point = frontiers.point(fam, beta)
            assert point.point.run_id == members[expected][0], (fam, beta)
            assert point.point.n_seeds == len(members[expected])
            assert point.selection_phi == pytest.approx(
                hand_sel[expected][0] - beta * hand_sel[expected][1], abs=1e-12
            )
            g, f = hand_rep[expected]
            assert point.report.items == ("report" if split.active else "all")
            assert (point.report.g_id, point.report.f_ood) == pytest.approx((g, f), abs=1e-12)
            assert point.phi_interval.estimate == pytest.approx(g - beta * f, abs=1e-12)
            assert point.phi_interval.low <= point.phi_interval.estimate <= point.phi_interval.high
    # the anchor's paired differences, on the report items
    for fam in set(PLANTED) - {"rpsft"}:
        for beta in BETAS:
            diff = frontiers.differences[fam][beta]
            a, o = PLANTED["rpsft"][beta], PLANTED[fam][beta]
            want = (hand_rep[a][0] - beta * hand_rep[a][1]) - (hand_rep[o][0] - beta * hand_rep[o][1])
            assert diff.difference.estimate == pytest.approx(want, abs=1e-12)
            assert diff.items == ("report" if split.active else "all")
    assert "rpsft" not in frontiers.differences
    # rpsft's decoupled configuration would win the rpsft frontier if folded in; here it is its own family
    assert frontiers.differences["rpsft (decoupled)"][1.0].sign == -1
    assert frontiers.differences["sft"][4.0].sign == 1
    payload = frontiers.to_dict()
    assert payload["chosen_on"] == ("selection" if split.active else "all")
    assert payload["families"]["rpsft"]["4"]["params"]["step"] == 2
    assert payload["families"]["sft"]["1"]["n_seeds"] == 2
    assert payload["differences"]["lora"]["0.5"]["phi_difference"]["estimate"] == pytest.approx(
        frontiers.differences["lora"][0.5].difference.estimate
    )

    from rpsft.sweeps.analysis.summary import frontiers_text

    text = frontiers_text(frontiers)
    p = frontiers.point("rpsft", 1.0)
    assert f"beta=1 {p.phi_interval.text()} (chosen: k=32 lambda=1)" in text
    assert ("chosen by max Phi on the selection items" in text) == split.active
    assert ("chosen and reported on the same items" in text) == (not split.active)
    assert len(text.splitlines()) == 1 + len(PLANTED) + 1 + len(PLANTED) - 1


def test_a_family_of_many_noisy_configurations_is_not_favoured_on_the_report_items():
    """Every configuration has the same true G_id and F_ood: rpsft has 30 of them, sft one. rpsft's frontier on
    the items it was chosen on is biased upwards (the max of 30 noisy estimates); on the report items it is not."""
    true_g, true_f, beta = 0.10, 0.05, 1.0
    truth = true_g - beta * true_f
    spec = [("sft", {"method": "sft"}, [(true_g, true_f)])] + [
        (f"rp{j}", {"method": "rpsft", "k": j}, [(true_g, true_f)]) for j in range(30)
    ]
    chosen_on, reported_on, differences = [], [], []
    for rep in range(120):
        base, trials, points, _ = _sweep(np.random.default_rng(2000 + rep), spec, n=30, noise=0.5)
        analysis = analyze_items(points, base, trials, "nll", [beta], split=SPLIT, draws=1)
        frontier = family_frontiers(analysis, [beta])
        point = frontier.point("rpsft", beta)
        chosen_on.append(point.selection_phi)
        reported_on.append(point.report.phi)
        differences.append(frontier.differences["sft"][beta].difference.estimate)

    def mean_se(values):
        values = np.asarray(values)
        return values.mean(), values.std(ddof=1) / np.sqrt(len(values))

    mean, se = mean_se(chosen_on)
    assert mean > truth + 8 * se, (mean, se)
    mean, se = mean_se(reported_on)
    assert abs(mean - truth) < 3 * se, (mean, se)
    mean, se = mean_se(differences)  # rpsft's frontier against sft's: no difference in truth, none reported
    assert abs(mean) < 3 * se, (mean, se)
