"""The study's claim verdicts on synthetic configurations whose truth is planted (no model, no training)."""

import re

import numpy as np
import pytest
from rpsft.evaluation.item_split import ItemSplit
from rpsft.sweeps.analysis.claims import Claims, evaluate_claims
from rpsft.sweeps.analysis.configurations import Configuration
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.analysis.uncertainty import (
    SweepIntervals,
    TrialGroup,
    analyze_items,
    knob_key,
    sweep_intervals,
)

N_ITEMS = 300
BASE_ID = np.random.default_rng(0).normal(-1.0, 0.3, N_ITEMS)  # per-item scores (higher is better)
BASE_OOD = np.random.default_rng(1).normal(-1.0, 0.3, N_ITEMS)


def _items(id_shift, ood_shift, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "id_nll": {"math": [(float(v), 1.0) for v in BASE_ID + id_shift + rng.normal(0, noise, N_ITEMS)]},
        "ood_nll": {"gpqa": [(float(v), 1.0) for v in BASE_OOD - ood_shift + rng.normal(0, noise, N_ITEMS)]},
    }


def _study(spec):
    """spec: list of (params, G shift, F shift, extra metrics); returns configurations and their intervals."""
    base = {
        "id_nll": {"math": [(float(v), 1.0) for v in BASE_ID]},
        "ood_nll": {"gpqa": [(float(v), 1.0) for v in BASE_OOD]},
    }
    groups, items, metrics = [], {}, {}
    for i, (params, g, f, extra) in enumerate(spec):
        run = f"run{i}"
        items[run] = _items(g, f, seed=i)
        point = TrialPoint(f"t{i}", g, f, params=params, run_id=run)
        groups.append(TrialGroup(knob_key(params), [point]))
        metrics[run] = extra
    intervals = sweep_intervals(groups, base, items, "nll", [1.0, 0.5, 2.0], draws=1000)
    configs = []
    for group in groups:
        point = group.point
        summary = intervals.of(point)
        # the point estimate the intervals use (the planted shift plus the realised noise)
        point = TrialPoint(
            point.trial_id, summary["g_id"].estimate, summary["f_ood"].estimate, point.params, point.run_id
        )
        configs.append(Configuration(point, summary, metrics[point.run_id]))
    return configs, intervals


SPLIT = ItemSplit(0.5, 0)


def _study_analysis(spec, split=SPLIT):
    """:func:`_study` and the sweep's analysis of the same configurations (as ``StoredSweep.analysis``: chosen on
    the selection items of ``split``, reported on its report items; no split: all items)."""
    configs, intervals = _study(spec)
    base = {
        "id_nll": {"math": [(float(v), 1.0) for v in BASE_ID]},
        "ood_nll": {"gpqa": [(float(v), 1.0) for v in BASE_OOD]},
    }
    items = {f"run{i}": _items(g, f, seed=i) for i, (_, g, f, _) in enumerate(spec)}
    points = [c.point for c in configs]
    analysis = analyze_items(points, base, items, "nll", [1.0, 0.5, 2.0], split=split, draws=1000)
    return configs, intervals, analysis


def _c2_by_hand(spec, split, betas):
    """Independently of the code under test: each configuration's G_id / F_ood on the selection and the report
    items (means of the planted item scores), each family's choice per beta (max Phi on the selection items) and
    the chosen configurations' Phi on the report items. Returns ``(choice {family: {beta: index}}, report Phi
    {index: {beta: Phi}})``."""

    def part(which):
        if not split.active:
            return np.arange(N_ITEMS), np.arange(N_ITEMS)
        return split.indices("id", "math", N_ITEMS)[which], split.indices("ood", "gpqa", N_ITEMS)[which]

    numbers = {}
    for i, (_, g, f, _) in enumerate(spec):
        items = _items(g, f, seed=i)
        tid = np.array([v for v, _ in items["id_nll"]["math"]])
        tood = np.array([v for v, _ in items["ood_nll"]["gpqa"]])
        numbers[i] = {
            which: (tid[ii].mean() - BASE_ID[ii].mean(), BASE_OOD[oi].mean() - tood[oi].mean())
            for which, (ii, oi) in (("selection", part(0)), ("report", part(1)))
        }
    choice = {}
    for i, (params, *_rest) in enumerate(spec):
        fam = choice.setdefault(params["method"], {})
        for beta in betas:
            g, f = numbers[i]["selection"]
            best = fam.get(beta)
            if (
                best is None
                or g - beta * f > numbers[best]["selection"][0] - beta * numbers[best]["selection"][1]
            ):
                fam[beta] = i
    report = {i: {b: n["report"][0] - b * n["report"][1] for b in betas} for i, n in numbers.items()}
    return choice, report


CLAIMS = Claims(
    betas=[0.5, 1.0, 2.0], k_slice={"lambda": 10, "layers": "all"}, drift_slice={"k": 64, "layers": "all"}
)


def _ref(method, **kw):
    return {"method": method, "reference": method, **kw}


def _rpsft(k, lam=10, **kw):
    return {
        "method": "rpsft",
        "k": k,
        "lambda": lam,
        "layers": "all",
        "reference": f"rpsft k={k} lambda={lam}",
        **kw,
    }


def _verdicts(spec, split=SPLIT, claims=None):
    configs, intervals, analysis = _study_analysis(spec, split)
    return {
        c.id: c for c in evaluate_claims(configs, intervals, claims or CLAIMS, beta0=1.0, analysis=analysis)
    }


def paper_like():
    """The paper's picture: SFT gains and forgets; RPSFT at mid k keeps most of the gain and forgets less."""
    return [
        (_ref("sft"), 0.30, 0.20, {"rotation/mean_deg": 2.0}),
        (_ref("l2-init", **{"lambda": 10}), 0.05, 0.01, {"rotation/mean_deg": 0.2}),
        (_ref("lora"), 0.10, 0.08, {}),
        (_rpsft(8), 0.29, 0.15, {"rotation/mean_deg": 1.5, "drift_mean": 0.4}),
        (_rpsft(64), 0.31, 0.05, {"rotation/mean_deg": 1.0, "drift_mean": 0.1}),
        (_rpsft(64, lam=1), 0.29, 0.12, {"drift_mean": 1.0}),
        (_rpsft(64, lam=100), 0.10, 0.01, {"drift_mean": 0.01}),
        (_rpsft(256), 0.12, 0.02, {"rotation/mean_deg": 0.5, "drift_mean": 0.05}),
        ({**_rpsft("auto"), "k_resolved": 0.1}, 0.31, 0.05, {}),
    ]


def test_planted_paper_effect_is_reproduced():
    verdicts = _verdicts(paper_like())
    assert {cid: v.verdict for cid, v in verdicts.items()} == {
        "C1": "reproduced",
        "C2": "reproduced",
        "C3": "reproduced",
        "C4": "reproduced",
        "C5": "reproduced",
        "C6": "reproduced",
    }
    _check_c2(verdicts["C2"], paper_like(), SPLIT)
    assert verdicts["C5"].numbers["slope_fit"] == pytest.approx(-1.0, abs=0.01)


def test_planted_failures_are_not_reproduced():
    spec = [
        (_ref("sft"), -0.30, 0.20, {"rotation/mean_deg": 2.0}),  # SFT loses ID: C1 fails
        (_ref("l2-init", **{"lambda": 10}), 0.45, 0.00, {}),  # full rank is best: no interior optimum (C4)
        (_rpsft(8), 0.29, 0.15, {"drift_mean": 0.4, "rotation/mean_deg": 3.0}),
        (_rpsft(64), 0.02, 0.01, {"drift_mean": 0.1, "rotation/mean_deg": 2.5}),
        (_rpsft(64, lam=1), 0.02, 0.01, {"drift_mean": 0.1}),  # drift does not move with lambda: C5 fails
        (_rpsft(64, lam=100), 0.02, 0.01, {"drift_mean": 0.1}),
        (_rpsft(256), 0.40, 0.00, {"drift_mean": 0.05}),
        (
            {**_rpsft("auto"), "k_resolved": 0.01},
            -0.20,
            0.30,
            {},
        ),  # the energy rule's k is far worse: C6 fails
    ]
    verdicts = _verdicts(spec)
    assert verdicts["C1"].verdict == "not reproduced"
    assert verdicts["C4"].verdict == "not reproduced"
    assert verdicts["C5"].verdict == "not reproduced"
    assert verdicts["C6"].verdict == "not reproduced"
    # C2: RPSFT's frontier (k=256) beats SFT's, but L2-init's beats it with an interval below 0
    assert verdicts["C2"].verdict == "not reproduced"
    assert verdicts["C2"].numbers["differences"]["l2-init"]["1"]["high"] < 0
    _check_c2(verdicts["C2"], spec, SPLIT)


def test_indistinguishable_differences_are_inconclusive():
    spec = [
        (_ref("sft"), 0.001, 0.001, {}),  # nothing moves beyond the noise
        (_rpsft(8), 0.0, 0.0, {}),
        (_rpsft(64), 0.001, 0.0, {}),
        (_rpsft(256), 0.0, 0.001, {}),
    ]
    verdicts = _verdicts(spec)
    assert verdicts["C1"].verdict == "inconclusive"
    assert verdicts["C2"].verdict == "inconclusive"
    assert verdicts["C4"].verdict in ("inconclusive", "not reproduced")
    assert verdicts["C3"].verdict == "inconclusive"  # no rotation measured
    assert "rotation" in verdicts["C3"].evidence


def _check_c2(result, spec, split, betas=tuple(CLAIMS.betas)):
    """C2's numbers against :func:`_c2_by_hand`: every family's choice per beta, its Phi on the report items, and
    RPSFT's frontier minus each other family's."""
    choice, report = _c2_by_hand(spec, split, betas)
    labels = [c.label for c in _study(spec)[0]]
    numbers = result.numbers
    assert set(numbers["frontiers"]) == set(choice)
    for fam, per_beta in choice.items():
        for beta, i in per_beta.items():
            point = numbers["frontiers"][fam][f"{beta:g}"]
            assert point["label"] == labels[i], (fam, beta)
            assert point["report"]["items"] == ("report" if split.active else "all")
            assert point["report"]["phi_interval"]["estimate"] == pytest.approx(report[i][beta], abs=1e-12)
            if fam in ("sft", "l2-init", "lora"):
                want = report[choice["rpsft"][beta]][beta] - report[i][beta]
                assert numbers["differences"][fam][f"{beta:g}"]["estimate"] == pytest.approx(want, abs=1e-12)
    assert set(numbers["differences"]) == set(choice) & {"sft", "l2-init", "lora"}
    assert numbers["chosen"] == {f"{b:g}": labels[choice["rpsft"][b]] for b in betas}


@pytest.mark.parametrize("split", [SPLIT, ItemSplit(0.0)], ids=["split", "no-split"])
def test_c2_compares_family_frontiers_on_the_report_items(split):
    spec = paper_like()
    c2 = _verdicts(spec, split)["C2"]
    _check_c2(c2, spec, split)
    assert c2.verdict == "reproduced"
    if split.active:
        assert c2.evidence.startswith(
            "frontiers chosen on the selection items, reported on the held-out report items"
        )
        assert c2.numbers["split"]["active"] and c2.numbers["paper_protocol"]["items"] == "report"
    else:
        assert "chosen and reported on the same items" in c2.evidence
        assert not c2.numbers["split"]["active"] and c2.numbers["paper_protocol"]["items"] == "all"


def _claims(protocol):
    return Claims(
        betas=CLAIMS.betas,
        k_slice={"lambda": 10, "layers": "all"},
        drift_slice={"k": 64, "layers": "all"},
        paper_protocol=protocol,
    )


def test_c2_reports_the_paper_protocol_alongside():
    attn = {**_rpsft(64), "layers": "attn", "reference": "rpsft k=64 lambda=10 layers=attn"}
    spec = [*paper_like(), (attn, 0.05, 0.04, {})]  # k=64 lambda=10 at another layer subset (not the default)
    labels = [c.label for c in _study(spec)[0]]
    _, report = _c2_by_hand(spec, SPLIT, CLAIMS.betas)
    c2 = _verdicts(spec, claims=_claims({"rpsft": {"k": 64, "lambda": 10}, "lora": "lora"}))["C2"]
    paper = c2.numbers["paper_protocol"]
    # rpsft: the knobs named, layers left at the method default (all); sft, l2-init: their bare references
    assert paper["configurations"] == {
        "rpsft": labels[4],
        "sft": labels[0],
        "l2-init": labels[1],
        "lora": labels[2],
    }
    for name, j in (("sft", 0), ("l2-init", 1), ("lora", 2)):
        for beta in CLAIMS.betas:
            want = report[4][beta] - report[j][beta]
            assert paper["differences"][name][f"{beta:g}"]["estimate"] == pytest.approx(want, abs=1e-12)
    assert paper["verdict"] == "reproduced" and paper["items"] == "report"
    assert f"paper protocol (final step, report items; {labels[4]}) at beta=1: vs sft " in c2.evidence
    assert c2.verdict == "reproduced"  # the frontiers decide

    # without claims.paper_protocol: the references at the method defaults; rpsft has several, none bare
    default = _verdicts(spec)["C2"].numbers["paper_protocol"]
    assert default["configurations"]["rpsft"] is None and default["configurations"]["sft"] == labels[0]
    assert "set claims.paper_protocol" in default["how"]["rpsft"]
    assert default["differences"] == {} and default["verdict"] == "inconclusive"
    # knobs that match several configurations, even at the defaults: none is guessed
    ambiguous = _verdicts(spec, claims=_claims({"rpsft": {"k": 64}}))["C2"].numbers["paper_protocol"]
    assert (
        ambiguous["configurations"]["rpsft"] is None
        and "matches 3 configurations" in ambiguous["how"]["rpsft"]
    )


def test_the_paper_protocol_uses_a_trajectorys_final_step():
    from rpsft.sweeps.analysis.claims import protocol_point

    params = {"method": "rpsft", "k": "32", "lambda": "1.0", "layers": "all"}
    points = [
        TrialPoint("a@2", 0.5, 0.0, params={**params, "step": 2}, run_id="r"),
        TrialPoint("a", 0.1, 0.0, params={**params, "step": 6}, run_id="r"),
        TrialPoint("b", 0.1, 0.0, params={**params, "lambda": "10", "step": 6}, run_id="s"),
    ]
    point, how = protocol_point(points, "rpsft", {"k": 32, "lambda": 1})
    assert point.trial_id == "a" and "paper_protocol" in how
    assert protocol_point(points, "rpsft", "rpsft k=32 lambda=1 layers=all")[0].trial_id == "a"
    assert protocol_point(points, "rpsft", {"k": 32, "lambda": 100})[0] is None


def test_reproduction_page_renders_c2s_frontiers(tmp_path):
    import json
    from pathlib import Path

    from rpsft.dashboards.reproduction import write_reproduction_page
    from rpsft.sweeps.stages.study import StudyResult, write_result

    configs, intervals, analysis = _study_analysis(paper_like())
    claims = evaluate_claims(configs, intervals, CLAIMS, beta0=1.0, analysis=analysis)
    result = StudyResult("s", "s", "tiny-model", "champ:train", 1.0, claims, configs, {}, {"steps": 8})
    write_result(result, tmp_path / "docs" / "results" / "tiny")
    page = write_reproduction_page(tmp_path / "docs").read_text()
    c2 = next(c for c in claims if c.id == "C2").numbers
    assert (
        "**C2 family frontiers** (chosen on the selection items, reported on the held-out report items)"
        in page
    )
    assert "| family | beta=0.5 | beta=1 | beta=2 |" in page
    rpsft = c2["frontiers"]["rpsft"]["1"]
    phi = rpsft["report"]["phi_interval"]
    assert f"{phi['estimate']:+.4f} [{phi['low']:+.4f}, {phi['high']:+.4f}] ({rpsft['label']})" in page
    diff = c2["differences"]["sft"]["2"]
    row = next(line for line in page.splitlines() if line.startswith("| rpsft - sft |"))
    assert row.endswith(f"| {diff['estimate']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] |")
    # a claims file from before the frontiers (the committed results, in their old C2 format) renders without it
    committed = Path(__file__).resolve().parents[1] / "docs" / "results"
    old = tmp_path / "old"
    for path in sorted(committed.glob("*/claims.json")):
        stored = json.loads(path.read_text())
        for claim in stored["claims"]:
            if claim["id"] == "C2":
                claim["numbers"].pop("frontiers", None)
        (old / "results" / path.parent.name).mkdir(parents=True)
        (old / "results" / path.parent.name / "claims.json").write_text(json.dumps(stored))
    page = write_reproduction_page(old).read_text()
    assert "C2 family frontiers" not in page and "- **C2 (" in page


def test_seeds_group_into_one_configuration():
    a = TrialPoint(
        "t1", 0.2, 0.1, params={"method": "sft", "reference": "sft seed=1", "seed": "1"}, run_id="r1"
    )
    b = TrialPoint(
        "t2", 0.4, 0.3, params={"method": "sft", "reference": "sft seed=2", "seed": "2"}, run_id="r2"
    )
    c = TrialPoint("t3", 0.4, 0.3, params={"method": "rpsft", "k": "8", "lambda": "1"}, run_id="r3")
    keys = {knob_key(p.params) for p in (a, b)}
    assert len(keys) == 1 and knob_key(c.params) not in keys
    from rpsft.sweeps.analysis.uncertainty import group_points

    groups = group_points([a, b, c])
    assert len(groups) == 2
    mean = groups[0].point
    assert mean.n_seeds == 2 and mean.g_id == pytest.approx(0.3) and mean.run_ids == ("r1", "r2")
    assert isinstance(SweepIntervals, type)


def test_reproduction_page_and_figures_from_the_claims_file(tmp_path):
    import json

    from rpsft.dashboards.reproduction import study_figures, write_reproduction_page
    from rpsft.sweeps.stages.study import StudyResult, write_result

    configs, intervals = _study(paper_like())
    claims = evaluate_claims(configs, intervals, CLAIMS, beta0=1.0)
    result = StudyResult("s", "s", "tiny-model", "champ:train", 1.0, claims, configs, {}, {"steps": 8})
    path = write_result(result, tmp_path / "docs" / "results" / "tiny")
    stored = json.loads(path.read_text())
    assert [c["verdict"] for c in stored["claims"]] == [c.verdict for c in claims]
    page = write_reproduction_page(tmp_path / "docs").read_text()
    for claim in claims:
        assert f"**{claim.id} ({claim.verdict}).**" in page
    # one numbered table row per configuration, by falling Phi, with its Phi interval as stored
    rows = [line.split(" | ") for line in page.splitlines() if re.match(r"\| \d+ \| \[ref\]", line)]
    assert len(rows) == len(configs)
    assert [row[0] for row in rows] == [f"| {i}" for i in range(1, len(configs) + 1)]
    by_phi = sorted(configs, key=lambda c: -c.intervals["phi@1"].estimate)
    assert [row[1] for row in rows] == [c.label for c in by_phi]
    phi = by_phi[0].intervals["phi@1"]
    assert f"{phi.estimate:+.4f} [{phi.low:+.4f}, {phi.high:+.4f}]" == rows[0][5]
    assert "Caveat" not in page
    stored_caveat = {**stored, "caveats": ["measured before the scoring fix"]}
    path.write_text(json.dumps(stored_caveat))
    assert (
        "> **Caveat.** measured before the scoring fix"
        in write_reproduction_page(tmp_path / "docs").read_text()
    )
    figures = study_figures(stored)
    assert set(figures) == {"tradeoff", "phi_k", "drift_lambda", "rotation"}
    # a study that measured no rotation draws no rotation figure (an empty one would be a blank plot)
    unrotated = [
        {**c, "metrics": {k: v for k, v in c["metrics"].items() if not k.startswith("rotation/")}}
        for c in stored["configurations"]
    ]
    assert set(study_figures({**stored, "configurations": unrotated})) == {
        "tradeoff",
        "phi_k",
        "drift_lambda",
    }
    # the trade-off figure numbers each point as its table row: every configuration on the left, those with
    # G_id > 0 on the right (a planted loser, last by Phi, only on the left)
    import copy

    loser = copy.deepcopy(stored["configurations"][0])
    loser.update(label="[ref] dft", params={"method": "dft"}, g_id=-0.5, f_ood=0.3)
    loser["intervals"]["phi@1"]["estimate"] = -1.0
    number_of = {row[1]: int(row[0].removeprefix("| ")) for row in rows} | {"[ref] dft": len(rows) + 1}
    tradeoff = study_figures({**stored, "configurations": [loser, *stored["configurations"]]})["tradeoff"]
    every = [*((c.label, c.point.f_ood, c.point.g_id) for c in configs), ("[ref] dft", 0.3, -0.5)]
    for axis, shown in (("x", every), ("x2", every[:-1])):
        points = {
            (text, x, y)
            for trace in tradeoff.data
            if trace.xaxis == axis and trace.name != "base"
            for text, x, y in zip(trace.text, trace.x, trace.y, strict=True)
        }
        assert points == {(str(number_of[label]), f, g) for label, f, g in shown}
    # the Phi(k) figure: the k slice in k order with full rank (L2-init) at a share of 1; SFT (k = 0) as a line
    # with its interval as a band, as k = 0 has no place on the log axis; k: auto beside the grid
    phi_k = figures["phi_k"]
    line = phi_k.data[0]

    def estimate(c):
        return c.intervals["phi@1"].estimate

    lam = CLAIMS.k_slice.lam
    grid = sorted(
        (c for c in configs if c.method == "rpsft" and not c.auto and c.lam == lam), key=lambda c: c.k_value
    )
    l2 = next(c for c in configs if c.method == "l2-init" and c.lam == lam)
    assert list(line.y) == pytest.approx([estimate(c) for c in [*grid, l2]])  # k=8, k=64, k=256, full rank
    assert line.x[-1] == 1.0 and phi_k.layout.xaxis.type == "log"
    sft = next(c for c in configs if c.method == "sft").intervals["phi@1"]
    (sft_line,) = [shape for shape in phi_k.layout.shapes if shape.type == "line"]
    (band,) = [shape for shape in phi_k.layout.shapes if shape.type == "rect"]
    assert sft_line.y0 == pytest.approx(sft.estimate) and (band.y0, band.y1) == pytest.approx(
        (sft.low, sft.high)
    )
    auto = next(t for t in phi_k.data if t.name.startswith("k: auto"))
    assert list(auto.y) == pytest.approx([estimate(c) for c in configs if c.auto and c.lam == lam])


def test_a_docs_folder_without_results_is_bad_input(tmp_path):
    from rpsft.core.errors import ConfigError
    from rpsft.dashboards.reproduction import write_reproduction_page

    with pytest.raises(ConfigError, match=r"docs: no study results .* Fix: --docs"):
        write_reproduction_page(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ C5 per regime


def _drift_config(params, drift, train_loss, default_optimizer="adamw_torch"):
    point = TrialPoint(f"t-{len(str(params))}-{drift}", 0.1, 0.05, params=params, run_id=f"r-{drift}")
    return Configuration(
        point, {}, {"drift_mean": drift, "train_loss": train_loss}, default_optimizer=default_optimizer
    )


def _loglog(lams, drifts):
    """Independent slopes: the least-squares fit of log drift on log lambda, and the last two points' slope."""
    x, y = np.log(lams), np.log(drifts)
    return float(np.polyfit(x, y, 1)[0]), float((y[-1] - y[-2]) / (x[-1] - x[-2]))


def _regime_configs(loss_drifts, decoupled_drifts):
    loss = [  # Adam, penalty in the loss: no optimizer / penalty_mode logged (older trials), or logged explicitly
        _drift_config(_rpsft(64, lam=1), loss_drifts[0], 1.10),
        _drift_config(_rpsft(64, lam=10), loss_drifts[1], 1.20),
        _drift_config(
            _rpsft(64, lam=100, optimizer="adamw_torch", penalty_mode="loss"), loss_drifts[2], 1.30
        ),
    ]
    decoupled = [
        _drift_config(_rpsft(64, lam=lam, penalty_mode="decoupled"), d, 1.0 + i / 10)
        for i, (lam, d) in enumerate(zip((1, 10, 100), decoupled_drifts))
    ]
    sgd = [
        _drift_config(_rpsft(64, lam=10, optimizer="sgd", learning_rate=0.05), 2.0, 2.5),
        _drift_config(_rpsft(64, lam=1000, optimizer="sgd", learning_rate=0.05), 0.5, 2.6),
    ]
    others = [  # not on the slice: another k, another layer subset, k: auto, a method without the penalty
        _drift_config(_rpsft(8, lam=100), 0.3, 1.0),
        _drift_config({**_rpsft(64, lam=100), "layers": "attn"}, 0.3, 1.0),
        _drift_config({**_rpsft("auto", lam=100), "k_resolved": 64}, 0.3, 1.0),
        _drift_config(_ref("l2-init", **{"lambda": 100}), 0.3, 1.0),
    ]
    return loss, decoupled, sgd, others


def test_c5_fits_each_regime_and_the_verdict_is_adam_loss():
    from rpsft.sweeps.analysis.claims import claim_c5

    loss, decoupled, sgd, others = _regime_configs([1.0, 0.1, 0.012], [0.5, 0.3, 0.25])
    result = claim_c5(others + sgd + decoupled + loss, CLAIMS)
    regimes = result.numbers["regimes"]
    assert list(regimes) == ["loss", "decoupled", "sgd"]
    for name, members in (("loss", loss), ("decoupled", decoupled), ("sgd", sgd)):
        assert regimes[name]["labels"] == [c.label for c in members]  # exactly these, in lambda order
        lams = [float(c.point.params["lambda"]) for c in members]
        drifts = [c.metrics["drift_mean"] for c in members]
        fit, tail = _loglog(lams, drifts)
        assert regimes[name]["lambda"] == lams
        assert regimes[name]["slope_fit"] == pytest.approx(fit, rel=1e-9)
        assert regimes[name]["slope_tail"] == pytest.approx(tail, rel=1e-9)
        assert regimes[name]["train_loss"] == [c.metrics["train_loss"] for c in members]
    # loss: tail log(0.012/0.1)/log(10) = -0.92; decoupled: -0.08; sgd: log(0.25)/log(100) = -0.30
    assert {n: r["verdict"] for n, r in regimes.items()} == {
        "loss": "reproduced",
        "decoupled": "not reproduced",
        "sgd": "not reproduced",
    }
    assert result.verdict == "reproduced"  # the paper's setting decides, the others are reported
    assert result.numbers["slope_fit"] == regimes["loss"]["slope_fit"]
    assert (
        "under decoupled (Adam, decoupled penalty): drift 0.5 at lambda=1 (train loss 1)," in result.evidence
    )
    assert (
        f"{regimes['sgd']['slope_tail']:+.2f} between the two largest lambdas (not reproduced)"
        in result.evidence
    )

    # the same data with the regimes' drifts swapped: the verdict follows the Adam / loss regime again
    loss, decoupled, sgd, others = _regime_configs([0.5, 0.3, 0.25], [1.0, 0.1, 0.012])
    swapped = claim_c5(loss + decoupled + sgd + others, CLAIMS)
    assert swapped.numbers["regimes"]["decoupled"]["verdict"] == "reproduced"
    assert swapped.verdict == "not reproduced"

    # without the paper's regime there is no verdict, whatever the others show
    alone = claim_c5(decoupled, CLAIMS)
    assert alone.verdict == "inconclusive" and "under decoupled" in alone.evidence


def test_c5_reads_the_sweeps_optimizer_for_trials_that_did_not_log_one():
    from rpsft.sweeps.analysis.claims import drift_slices

    configs = [
        _drift_config(_rpsft(64, lam=lam), d, 1.0, default_optimizer="sgd") for lam, d in ((1, 1), (10, 0.1))
    ]
    assert list(drift_slices(configs, CLAIMS)) == ["sgd"]


def test_drift_figure_draws_one_line_per_regime():
    from rpsft.dashboards.reproduction import drift_figure
    from rpsft.sweeps.analysis.claims import claim_c5

    loss, decoupled, sgd, _ = _regime_configs([1.0, 0.1, 0.012], [0.5, 0.3, 0.25])
    claim = claim_c5(loss + decoupled + sgd, CLAIMS).to_dict()
    names = [trace.name for trace in drift_figure({"model": "m"}, claim).data]
    assert len(names) == 4 and names[-1] == "1/lambda"
    assert [n.split(":")[0] for n in names[:3]] == [
        "Adam, penalty in the loss (the paper's setting)",
        "Adam, decoupled penalty",
        "SGD, penalty in the loss",
    ]


# ------------------------------------------------------------------------------------------ forgetting views

BASE_MC = np.random.default_rng(2).integers(0, 2, N_ITEMS).astype(float)  # 0/1 multiple-choice item scores


def _flip(scores, frm, fraction, seed):
    """``scores`` with ``fraction`` of the items scored ``frm`` flipped to ``1 - frm``."""
    out = scores.copy()
    idx = np.flatnonzero(scores == frm)
    rng = np.random.default_rng(seed)
    out[rng.choice(idx, int(fraction * len(idx)), replace=False)] = 1 - frm
    return out


def _view_items(id_shift, nll_shift, mc, seed):
    items = _items(id_shift, nll_shift, seed=seed)
    if mc is not None:
        items["ood_mc"] = {"arc_c": [(float(v), 1.0) for v in mc]}
    return items


def _views_study(with_mc=True):
    from rpsft.sweeps.analysis.configurations import attach_views, view_intervals
    from rpsft.sweeps.analysis.uncertainty import group_points

    base = {
        "id_nll": {"math": [(float(v), 1.0) for v in BASE_ID]},
        "ood_nll": {"gpqa": [(float(v), 1.0) for v in BASE_OOD]},
    }
    if with_mc:
        base["ood_mc"] = {"arc_c": [(float(v), 1.0) for v in BASE_MC]}
    mc = {
        "A": _flip(BASE_MC, 0, 0.4, 1),  # forgets under nll, gains accuracy under mc: the views disagree
        "B": _flip(BASE_MC, 1, 0.4, 2),  # forgets under both
        "C": BASE_MC.copy(),  # forgets a little under nll, not at all under mc
        "D": None,  # no mc scores: under nll only
        "E": BASE_MC.copy(),  # forgets more than C under nll, the same under mc: no flip with C
    }
    spec = {
        "A": (_rpsft(64), 0.2, 0.20),
        "B": (_ref("sft"), 0.3, 0.10),
        "C": (_ref("lora"), 0.1, 0.05),
        "D": (_ref("dft"), 0.1, 0.05),
        "E": (_ref("iw"), 0.1, 0.15),
    }
    points, items = [], {}
    for i, (name, (params, g, f)) in enumerate(spec.items()):
        points.append(TrialPoint(name, g, f, params=params, run_id=f"run-{name}"))
        items[f"run-{name}"] = _view_items(g, f, mc[name] if with_mc else None, seed=i)
    groups = group_points(points)
    views = {v: view_intervals(groups, base, items, v, [1.0], draws=1000) for v in ("nll", "mc")}
    configs = [Configuration(g.point, views["nll"].of(g.point), {}) for g in groups]
    attach_views(configs, views)
    return {c.point.trial_id: c for c in configs}, views, mc


def test_forgetting_views_list_the_configurations_where_they_disagree():
    from rpsft.sweeps.analysis.claims import claim_c1
    from rpsft.sweeps.analysis.configurations import forgetting_views

    configs, views, mc = _views_study()
    a, b, c, d = (configs[n] for n in "ABCD")
    # independent numbers: F_ood under mc is the base model's accuracy minus the tuned model's
    for name in "ABC":
        expected = BASE_MC.mean() - mc[name].mean()
        assert configs[name].f_ood_views["mc"].estimate == pytest.approx(expected, abs=1e-12)
    assert "mc" not in d.f_ood_views and "nll" in d.f_ood_views
    assert a.f_ood_views["nll"].low > 0 and a.f_ood_views["mc"].high < 0  # planted: opposite signs
    assert b.f_ood_views["nll"].low > 0 and b.f_ood_views["mc"].low > 0  # planted: both forget

    section = forgetting_views(list(configs.values()), views)
    assert section["available"] == {"nll": True, "mc": True}
    assert [row["label"] for row in section["sign_disagreements"]] == [a.label]
    # rankings, from the planted F_ood (nll: the shift; mc: about -0.2 for A, +0.2 for B, 0 for C and E): a pair
    # flips when its planted differences have opposite signs, neither 0 (C vs E: 0 under mc, so no flip)
    planted = {"A": (0.20, -1), "B": (0.10, 1), "C": (0.05, 0), "E": (0.15, 0)}
    expected = {
        (configs[x].label, configs[y].label)
        for i, x in enumerate("ABCE")
        for y in "ABCE"[i + 1 :]
        if np.sign(planted[x][0] - planted[y][0]) * np.sign(planted[x][1] - planted[y][1]) == -1
    }
    e = configs["E"]
    assert expected == {(a.label, b.label), (a.label, c.label), (a.label, e.label), (b.label, e.label)}
    assert {(f["a"], f["b"]) for f in section["ranking_flips"]} == expected
    for flip in section["ranking_flips"]:  # both paired intervals exclude 0, on opposite sides
        signs = [1 if flip[v]["low"] > 0 else -1 if flip[v]["high"] < 0 else 0 for v in ("nll", "mc")]
        assert signs[0] * signs[1] == -1
    rows = {row["label"]: row["f_ood"] for row in section["configurations"]}
    assert rows[d.label]["mc"] is None and rows[d.label]["nll"]["estimate"] == d.f_ood_views["nll"].estimate
    assert f"opposite signs: {a.label} (nll" in section["summary"]

    c1 = claim_c1(list(configs.values()))  # SFT (B) under both views
    assert c1.numbers["f_ood_views"]["mc"]["estimate"] == pytest.approx(BASE_MC.mean() - mc["B"].mean())
    assert f"under mc: {b.f_ood_views['mc'].text()}" in c1.evidence
    assert f"under nll: {b.f_ood_views['nll'].text()}" in c1.evidence


def test_forgetting_views_without_mc_scores_say_so():
    from rpsft.sweeps.analysis.configurations import forgetting_views

    configs, views, _ = _views_study(with_mc=False)
    assert views["mc"] is None
    section = forgetting_views(list(configs.values()), views)
    assert section["available"] == {"nll": True, "mc": False}
    assert section["sign_disagreements"] == [] and section["ranking_flips"] == []
    assert "no mc item scores" in section["summary"] and "not compared" in section["summary"]


def test_reproduction_page_renders_the_forgetting_views(tmp_path):
    import json

    from rpsft.dashboards.reproduction import write_reproduction_page
    from rpsft.sweeps.analysis.configurations import forgetting_views
    from rpsft.sweeps.stages.study import StudyResult, write_result

    configs, views, _ = _views_study()
    section = forgetting_views(list(configs.values()), views)
    result = StudyResult("s", "s", "tiny", "champ:train", 1.0, [], list(configs.values()), {}, {}, section)
    path = write_result(result, tmp_path / "docs" / "results" / "tiny")
    stored = json.loads(path.read_text())
    stored["claims"] = [{"id": "C1", "claim": "c", "verdict": "reproduced", "evidence": "e", "numbers": {}}]
    path.write_text(json.dumps(stored))
    page = write_reproduction_page(tmp_path / "docs").read_text()
    assert "| configuration | F_ood nll | F_ood mc |" in page
    a = configs["A"].f_ood_views
    row = f"| {configs['A'].label} | {a['nll'].estimate:+.4f} [{a['nll'].low:+.4f}, {a['nll'].high:+.4f}] | "
    assert row in page
    assert f"| {configs['D'].label} | " in page and page.split(f"| {configs['D'].label} | ")[1].split("\n")[
        0
    ].endswith("| - |")
    assert "**Disagreements.** Rule: the views disagree on a configuration when" in page
    assert f"opposite signs: {configs['A'].label}" in page


def test_reproduction_page_from_the_committed_claims_files(tmp_path):
    """The committed results, of either design (with or without the C5 regimes and the two views), render into a
    copy: the drift figure has one line per regime the file holds, and the 1/lambda guide."""
    import json
    import shutil
    from pathlib import Path

    from rpsft.dashboards.reproduction import study_figures, write_reproduction_page

    committed = Path(__file__).resolve().parents[1] / "docs" / "results"
    files = sorted(committed.glob("*/claims.json"))
    assert files
    for path in files:
        target = tmp_path / "docs" / "results" / path.parent.name / "claims.json"
        target.parent.mkdir(parents=True)
        shutil.copy(path, target)
    page = write_reproduction_page(tmp_path / "docs").read_text()
    assert page.count("### Forgetting under two views") == len(files)
    # the two views side by side where a study scored mc items, one line where it did not
    with_mc = [
        path
        for path in files
        if any(
            row["f_ood"].get("mc")
            for row in json.loads(path.read_text())["forgetting_views"]["configurations"]
        )
    ]
    assert page.count("| configuration | F_ood nll | F_ood mc |") == len(with_mc)
    assert page.count("F_ood is under `nll` only") == len(files) - len(with_mc)
    for path in files:
        stored = json.loads(path.read_text())
        c5 = next(c for c in stored["claims"] if c["id"] == "C5")["numbers"]
        regimes = len(c5.get("regimes") or {}) or int(bool(c5.get("lambda")))  # an old file: its one slice
        drawn = study_figures(stored)["drift_lambda"].data
        assert [t.name for t in drawn[regimes:]] == (["1/lambda"] if regimes else [])
        assert len(drawn) == regimes + int(regimes > 0)


# ------------------------------------------------------------------------------------------ per-reference optimizer


def _sweep(references):
    from rpsft.sweeps.config.sweep import parse_sweep_config

    raw = {
        "name": "opt",
        "train": {"learning_rate": 5.0e-5, "max_steps": 2},
        "references": references,
        "search": {"num_trials": 0},
    }
    return parse_sweep_config(raw)


def test_a_reference_sets_its_own_optimizer_and_learning_rate():
    from rpsft.sweeps.store.sweep_store import trial_label

    ref = {"method": "rpsft", "k": 32, "lambda": 100, "layers": "all"}
    config = _sweep(
        [{**ref, "optimizer": "sgd", "learning_rate": 0.05}, {**ref, "optimizer": "adamw_torch"}, ref]
    )
    sgd, adamw, plain = config.reference_params()
    train_sgd = config.trial_train_config(sgd)
    assert (train_sgd.optimizer, train_sgd.learning_rate) == ("sgd", 0.05)
    train_adamw = config.trial_train_config(adamw)
    assert (train_adamw.optimizer, train_adamw.learning_rate) == ("adamw_torch", 5.0e-5)  # the sweep's lr
    assert trial_label(sgd) == "[ref] rpsft k=32 lambda=100 layers=all optimizer=sgd lr=0.05"
    assert (
        trial_label(adamw) == trial_label(plain) == "[ref] rpsft k=32 lambda=100 layers=all"
    )  # the sweep's own
    # as logged by the trial (every trial logs its optimizer and learning rate): two configurations
    logged = [
        {**p, "optimizer": t.optimizer, "learning_rate": t.learning_rate}
        for p, t in ((sgd, train_sgd), (adamw, train_adamw))
    ]
    assert knob_key(logged[0]) != knob_key(logged[1])
    # the same reference name, only the optimizer differs: still two configurations
    assert knob_key({**logged[1], "optimizer": "sgd"}) != knob_key(logged[1])


def test_a_reference_with_an_unknown_optimizer_is_rejected():
    from rpsft.sweeps.config.errors import SweepConfigError

    with pytest.raises(SweepConfigError, match=r"references\[0\]\.optimizer: Input should be 'adamw_torch'"):
        _sweep([{"method": "sft", "optimizer": "sgdm"}])
    with pytest.raises(SweepConfigError, match=r"references\[0\]\.learning_rate"):
        _sweep([{"method": "sft", "learning_rate": 0}])


def test_lora_references_at_two_ranks_are_two_configurations():
    from rpsft.sweeps.config.errors import SweepConfigError

    config = _sweep([{"method": "lora", "lora_r": 8}, {"method": "lora", "lora_r": 32}])
    r8, r32 = config.reference_params()
    assert (config.trial_train_config(r8).lora_r, config.trial_train_config(r32).lora_r) == (8, 32)
    assert knob_key(r8) != knob_key(r32)
    assert r8["reference"] == "lora lora_r=8"
    with pytest.raises(SweepConfigError, match="lora_r: method sft has no adapters"):
        _sweep([{"method": "sft", "lora_r": 8}])


def test_a_reference_without_a_penalty_refuses_penalty_mode():
    from rpsft.sweeps.config.errors import SweepConfigError

    with pytest.raises(SweepConfigError, match="penalty_mode: method sft has no penalty to decouple. Fix:"):
        _sweep([{"method": "sft", "penalty_mode": "decoupled"}])
    assert _sweep([{"method": "l2-init", "lambda": 10, "penalty_mode": "decoupled"}]).reference_params()


def test_k_slice_and_rotation_claims_read_only_the_papers_setting():
    from rpsft.sweeps.analysis.claims import k_slice

    other_settings = [  # at the slice's lambda, far better than anything: would decide C4 and C6 if admitted
        (_rpsft(32, optimizer="sgd", learning_rate=5e-3), 0.60, 0.01, {"rotation/mean_deg": 0.1}),
        (_rpsft(32, penalty_mode="decoupled"), 0.60, 0.01, {"rotation/mean_deg": 0.1}),
        (_rpsft(32, learning_rate=1.0), 0.60, 0.01, {"rotation/mean_deg": 0.1}),  # Adam at another lr
    ]
    plain = _verdicts(paper_like())
    mixed = _verdicts(paper_like() + other_settings)
    for claim in ("C3", "C4", "C6"):
        assert (mixed[claim].verdict, mixed[claim].evidence) == (plain[claim].verdict, plain[claim].evidence)
    configs, _ = _study(paper_like() + other_settings)
    assert all(c.param("k") != "32" for c in k_slice(configs, CLAIMS))
    assert [c.paper_setting for c in configs[-3:]] == [False, False, False]
