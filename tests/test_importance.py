"""Parameter importance of a sweep's knobs, on synthetic sweeps whose answer is known: where only lambda moves
Phi, lambda ranks first; where only k does, k does; the figures come from Optuna with the sweep's knobs."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from rpsft.dashboards import importance
from rpsft.dashboards.sweep_data import SweepData, TrialRecord


def _sweep(n: int, phi_of, seed: int = 0, references: int = 2) -> SweepData:
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        params = {
            "method": "rpsft",
            "k": str(rng.choice([8, 32, 128])),
            "lambda": f"{10 ** rng.uniform(-1, 3):.6g}",
            "layers": rng.choice(["all", "attn"]),
            "period": "1",
        }
        g_id, f_ood = phi_of(params, rng)
        trials.append(
            TrialRecord(
                f"t{i}",
                f"r{i}",
                f"trial {i}",
                "FINISHED",
                "finished",
                "",
                params,
                {"g_id": g_id, "f_ood": f_ood},
            )
        )
    for i in range(references):  # fixed points: never part of the importance
        trials.append(
            TrialRecord(
                f"ref{i}",
                f"rr{i}",
                "[ref] sft",
                "FINISHED",
                "finished",
                "sft",
                {"method": "sft"},
                {"g_id": 9.0, "f_ood": 0.0},
            )
        )
    config = SimpleNamespace(objective=SimpleNamespace(beta=1.0, betas=[1.0]))
    return SweepData("synthetic", config, "sqlite://", "0", "p", {}, trials, {})


def _only_lambda(params, rng):
    lam = math.log10(float(params["lambda"]))
    return 0.10 - 0.03 * lam + rng.gauss(0, 0.002), 0.08 - 0.02 * lam + rng.gauss(0, 0.002)


def _only_k(params, rng):
    k = math.log2(float(params["k"]))
    return 0.02 * k + rng.gauss(0, 0.002), 0.01 + rng.gauss(0, 0.002)


@pytest.mark.parametrize("evaluator", ["ped-anova", "fanova"])
def test_only_lambda_matters_so_lambda_ranks_first(evaluator):
    scores = importance.param_importances(_sweep(40, _only_lambda), evaluator=evaluator)
    assert set(scores) == {"phi", "g_id", "f_ood"}
    for target, by_knob in scores.items():
        assert set(by_knob) == {"k", "lambda", "layers"}  # period never varied: no importance
        assert max(by_knob, key=by_knob.get) == "lambda", (target, by_knob)
        assert math.isclose(sum(by_knob.values()), 1.0, rel_tol=1e-6)


def test_only_k_matters_so_k_ranks_first_for_what_k_moves():
    scores = importance.param_importances(_sweep(40, _only_k))
    assert max(scores["phi"], key=scores["phi"].get) == "k"
    assert max(scores["g_id"], key=scores["g_id"].get) == "k"
    assert scores["phi"]["k"] > 2 * max(scores["phi"]["lambda"], scores["phi"]["layers"])


def test_too_few_searched_trials_give_no_importance_and_references_never_count():
    assert importance.param_importances(_sweep(3, _only_lambda, references=10)) == {}
    data = _sweep(12, _only_lambda)
    assert all(not t.reference for t in importance.searched_trials(data))
    assert len(importance.searched_trials(data)) == 12


def test_figures_use_the_sweeps_knobs_and_split_contours_by_layer_subset():
    data = _sweep(24, _only_lambda)
    parallel = importance.parallel_figure(data)
    axes = list(parallel.layout.xaxis.ticktext)  # Optuna draws one axis per knob after the target
    assert axes == ["Phi (beta=1)", "k", "lambda", "layers"]
    assert len(parallel.data) >= 24  # a line per trial
    contours = importance.contour_figures(data)
    assert set(contours) == {"all", "attn"}
    assert "layers attn" in contours["attn"].layout.title.text
    scores = importance.param_importances(data)
    fig = importance.importance_figure(data, scores)
    assert [trace.name for trace in fig.data] == ["Phi (beta=1)", "G_id", "F_ood"]
    metrics = importance.importance_metrics(scores)
    assert metrics["importance/phi/lambda"] == scores["phi"]["lambda"]
    assert len(metrics) == 9


def test_the_report_shows_the_importances_its_figures_and_embeds_the_numbers(tmp_path):
    import json
    import re

    from rpsft.dashboards.report import build_report

    data = _sweep(24, _only_lambda)
    data.config = SimpleNamespace(
        objective=SimpleNamespace(beta=1.0, betas=[1.0], mode="phi", metric="nll"), model="m", data="d"
    )
    files = build_report(data, tmp_path, png=False, importance="fanova")
    text = files.html.read_text()
    assert re.findall(r'data-figure="(\w+)"', text) == [
        "importance",
        "parallel",
        "contour_all",
        "contour_attn",
    ]
    assert '<table id="importance">' in text and "fANOVA" in text
    embedded = json.loads(re.search(r'id="rpsft-report-data">(.*?)</script>', text, re.S).group(1))
    assert embedded["importance"] == files.importances
    assert max(files.importances["phi"], key=files.importances["phi"].get) == "lambda"
