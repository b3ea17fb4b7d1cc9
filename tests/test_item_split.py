"""The item split (:mod:`rpsft.evaluation.item_split`) and the operating point chosen on the selection items and
reported on the held-out report items: the split's properties, the winner's curse it removes (synthetic
configurations of equal true Phi on noisy items), and the real analysis path of a stored sweep (MLflow, SQLite)
against an independent computation on the items."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rpsft.evaluation.item_split import ItemSplit, ItemSplitError, report_count, split_item_scores
from rpsft.sweeps.analysis.points import trial_points
from rpsft.sweeps.analysis.selection import TrialPoint, select
from rpsft.sweeps.analysis.stored_sweep import StoredSweep
from rpsft.sweeps.analysis.uncertainty import analyze_items
from sweep_helpers import log_trial_run

BETA = 1.0
LAYOUT = {"id": {"math500": 10, "gsm8k": 7}, "ood": {"gpqa": 2, "mmlu": 33}}


def _indexed(layout):
    """Item scores whose value is the item's index (so a part shows which items it holds)."""
    return {
        s: {b: [(float(i), 1.0) for i in range(n)] for b, n in benches.items()}
        for s, benches in layout.items()
    }


# ------------------------------------------------------------------------------------------ the split


def test_the_split_is_stratified_disjoint_covering_and_deterministic():
    split = ItemSplit(0.5, seed=3)
    want = {"math500": (5, 5), "gsm8k": (3, 4), "gpqa": (1, 1), "mmlu": (16, 17)}  # (selection, report)
    for suite, benches in LAYOUT.items():
        for bench, n in benches.items():
            selection, report = split.indices(suite, bench, n)
            assert (len(selection), len(report)) == want[bench]
            assert not set(selection) & set(report)
            assert sorted([*selection, *report]) == list(range(n))
            again = ItemSplit(0.5, seed=3).indices(suite, bench, n)
            assert np.array_equal(again[0], selection) and np.array_equal(again[1], report)
    # the parts of item scores hold exactly those items, in their original order, whatever the dict order
    selection, report = split_item_scores(_indexed(LAYOUT), 0.5, 3)
    reordered = {s: dict(reversed(list(b.items()))) for s, b in reversed(list(_indexed(LAYOUT).items()))}
    assert split_item_scores(reordered, 0.5, 3) == (selection, report)
    for suite, benches in LAYOUT.items():
        for bench, n in benches.items():
            sel_idx, rep_idx = split.indices(suite, bench, n)
            assert [v for v, _ in selection[suite][bench]] == list(map(float, sel_idx))
            assert [v for v, _ in report[suite][bench]] == list(map(float, rep_idx))
    assert split.counts(_indexed(LAYOUT))["id"]["gsm8k"] == {"selection": 3, "report": 4}
    # pinned: a change of the permutation would silently move every stored sweep's choice
    assert [list(a) for a in ItemSplit(0.5, 0).indices("id", "math500", 6)] == [[1, 3, 4], [0, 2, 5]]
    assert [list(a) for a in ItemSplit(0.5, 0).indices("ood", "gpqa", 5)] == [[0, 2], [1, 3, 4]]
    # keyed by seed and by benchmark
    assert not np.array_equal(
        ItemSplit(0.5, 1).indices("ood", "mmlu", 33)[1], split.indices("ood", "mmlu", 33)[1]
    )
    assert not np.array_equal(split.indices("ood", "other", 33)[1], split.indices("ood", "mmlu", 33)[1])


def test_report_counts_round_half_up_and_keep_one_item_per_part():
    assert [report_count(n, 0.5) for n in (2, 3, 4, 5, 10)] == [1, 2, 2, 3, 5]
    assert report_count(10, 0.25) == 3 and report_count(2, 0.1) == 1 and report_count(2, 0.9) == 1
    assert report_count(10, 0.0) == 0


def test_no_split_is_every_item_in_both_parts_and_one_item_cannot_be_split():
    scores = _indexed({"id": {"a": 1, "b": 4}})
    assert split_item_scores(scores, 0.0) == (scores, scores)
    with pytest.raises(
        ItemSplitError,
        match=r"evaluation\.split\.report_fraction: id/a has 1 scored item.*Fix:.*n_id.*report_fraction: 0",
    ):
        split_item_scores(scores, 0.5)
    with pytest.raises(ItemSplitError, match="must be in"):
        ItemSplit(1.0)


def test_the_config_field_is_typed():
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config

    raw = {"name": "s", "references": ["sft"]}
    assert parse_sweep_config(raw).evaluation.split.item_split() == ItemSplit(0.5, 0)
    config = parse_sweep_config({**raw, "evaluation": {"split": {"report_fraction": 0.3, "seed": 7}}})
    assert config.evaluation.split.item_split() == ItemSplit(0.3, 7)
    for bad in ({"report_fraction": 1.0}, {"report_fraction": -0.1}, {"fraction": 0.5}):
        with pytest.raises(SweepConfigError, match="evaluation.split"):
            parse_sweep_config({**raw, "evaluation": {"split": bad}})


# ------------------------------------------------------------------------------------------ the winner's curse

TRUE_G, TRUE_F = 0.10, 0.05  # every configuration: the same true gain and forgetting
TRUE_PHI = TRUE_G - BETA * TRUE_F
BENCHES = {"id": ("a", "b"), "ood": ("c", "d")}


def _synthetic(rng, n_configs=40, n_items=30, noise=0.5):
    """Base and trial item scores (``{run id: stored record}``) and the trials' points: each item's score is a
    shared difficulty plus independent noise, and every configuration has the same true G_id and F_ood."""
    base: dict = {"id_nll": {}, "ood_nll": {}}
    trials: dict = {f"run{j}": {"id_nll": {}, "ood_nll": {}} for j in range(n_configs)}
    for suite, names in BENCHES.items():
        shift = TRUE_G if suite == "id" else -TRUE_F  # G = tuned - base on ID, F = base - tuned on OOD
        for bench in names:
            difficulty = rng.normal(0.0, 1.0, n_items)
            base[f"{suite}_nll"][bench] = [(v, 1.0) for v in difficulty + rng.normal(0, noise, n_items)]
            for record in trials.values():
                record[f"{suite}_nll"][bench] = [
                    (v, 1.0) for v in difficulty + shift + rng.normal(0, noise, n_items)
                ]
    points = []
    for j, (run_id, record) in enumerate(trials.items()):
        g, f = _tradeoff(base, record)
        points.append(TrialPoint(f"t{j}", g, f, {"method": "rpsft", "k": j}, run_id=run_id))
    return base, trials, points


def _tradeoff(base, record, indices=None):
    """G_id and F_ood computed by hand (weighted means per benchmark, macro average), on ``indices``
    (``{(suite, bench): item indices}``) or all items."""
    out = {}
    for suite, sign in (("id", 1.0), ("ood", -1.0)):
        diffs = []
        for bench in base[f"{suite}_nll"]:
            rows_b = np.asarray(base[f"{suite}_nll"][bench])
            rows_t = np.asarray(record[f"{suite}_nll"][bench])
            idx = slice(None) if indices is None else indices[(suite, bench)]
            mean_b = rows_b[idx, 0].sum() / rows_b[idx, 1].sum()
            mean_t = rows_t[idx, 0].sum() / rows_t[idx, 1].sum()
            diffs.append(sign * (mean_t - mean_b))
        out[suite] = sum(diffs) / len(diffs)
    return out["id"], out["ood"]


def test_the_chosen_point_is_biased_on_the_items_it_was_chosen_on_and_not_on_the_report_items():
    split, no_split = ItemSplit(0.5, 0), ItemSplit(0.0)
    chosen_on, reported_on, all_items = [], [], []
    for rep in range(150):
        base, trials, points = _synthetic(np.random.default_rng(1000 + rep))
        analysis = analyze_items(points, base, trials, "nll", [BETA], split=split, draws=1)
        assert all(p.items == "selection" for p in analysis.points)
        parts = select(analysis.points, BETA).attach(analysis).operating_point()
        assert (parts["selection"].items, parts["report"].items) == ("selection", "report")
        chosen_on.append(parts["selection"].phi)
        reported_on.append(parts["report"].phi)
        unsplit = analyze_items(points, base, trials, "nll", [BETA], split=no_split, draws=1)
        parts = select(unsplit.points, BETA).attach(unsplit).operating_point()
        assert parts["selection"].items == parts["report"].items == "all"
        assert parts["selection"].phi == parts["report"].phi
        all_items.append(parts["report"].phi)

    def mean_se(values):
        values = np.asarray(values)
        return values.mean(), values.std(ddof=1) / np.sqrt(len(values))

    mean, se = mean_se(chosen_on)
    assert mean > TRUE_PHI + 8 * se, (mean, se)  # the max of 40 noisy estimates: biased upwards
    mean, se = mean_se(all_items)
    assert mean > TRUE_PHI + 8 * se, (mean, se)  # chosen and reported on the same items: biased as well
    mean, se = mean_se(reported_on)
    assert abs(mean - TRUE_PHI) < 3 * se, (mean, se)  # held-out items: no bias


def test_no_split_reproduces_the_choice_on_all_items_exactly():
    base, trials, points = _synthetic(np.random.default_rng(0), n_configs=8)
    analysis = analyze_items(points, base, trials, "nll", [BETA], split=ItemSplit(0.0), draws=200)
    assert [(p.g_id, p.f_ood, p.items) for p in analysis.points] == [(p.g_id, p.f_ood, "all") for p in points]
    assert analysis.selection_intervals is analysis.report_intervals is analysis.intervals
    selection = select(analysis.points, BETA).attach(analysis)
    assert selection.best == select(points, BETA).best
    parts = selection.operating_point()
    assert (parts["report"].g_id, parts["report"].f_ood) == (selection.best.g_id, selection.best.f_ood)
    assert parts["report"].intervals == analysis.intervals.of(selection.best)
    runner_up = selection.comparisons()[0]
    assert runner_up.items == "all"
    assert runner_up.difference == analysis.intervals.difference(selection.best, runner_up.other, BETA)


# ------------------------------------------------------------------------------------------ a stored sweep


@pytest.fixture
def stored_sweep(tmp_path):
    """Two stored sweeps over the same MLflow runs (SQLite): ``split`` (report_fraction 0.5, seed 1) and
    ``whole`` (report_fraction 0). Six configurations with item scores (sft with two seeds) and one without
    (``run6``, the worst)."""
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.store import tracking
    from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore

    rng = np.random.default_rng(12)  # noise under which the split's choice differs from the all-items choice
    base, trials, _ = _synthetic(rng, n_configs=7, n_items=12, noise=0.3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, "split-test")
    parent = tracking.create_parent_run(client, experiment_id, "split", {})
    tracking.log_json_artifact(client, parent, "base_item_scores.json", base)
    configs = {}  # configuration name -> [(run id, item scores or None)]
    for j, (name, record) in enumerate(trials.items()):
        if j == 0:  # sft, two seeds: the second seed's items are the first's, shifted
            params = {"method": "sft", "seed": 0, "reference": "sft"}
            tags = {tracking.TAG_REFERENCE: "sft"}
            second = {
                s: {b: [(v + 0.02, w) for v, w in rows] for b, rows in benches.items()}
                for s, benches in record.items()
            }
            members = [
                (params, record, tags),
                ({**params, "seed": 1, "reference": "sft seed=1"}, second, tags),
            ]
        elif j == 6:  # no item scores (as an objective scored by the harness would have)
            members = [({"method": "rpsft", "k": 99, "lambda": 1.0, "seed": 0}, None, {})]
        else:
            members = [({"method": "rpsft", "k": j, "lambda": 1.0, "seed": 0}, record, {})]
        configs[name] = []
        for i, (params, items, tags) in enumerate(members):
            g, f = _tradeoff(base, items if items is not None else record)
            if items is None:
                g, f = -1.0, 0.5  # its own numbers on all items: the worst configuration
            metrics = {"g_id": g, "f_ood": f, "phi": g - BETA * f}
            run_id = log_trial_run(
                client, experiment_id, parent, f"{name}-{i}", params, metrics, items=items, tags=tags
            )
            configs[name].append((run_id, items, g, f))
    stores = {}
    for sweep, fraction in (("split", 0.5), ("whole", 0.0)):
        config = parse_sweep_config(
            {
                "name": sweep,
                "references": ["sft"],
                "output_dir": str(tmp_path / "sweeps"),
                "objective": {"betas": [BETA, 0.5]},
                "evaluation": {
                    "intervals": {"draws": 300},
                    "split": {"report_fraction": fraction, "seed": 1},
                },
            }
        )
        store = SweepStore.of(config)
        context = SweepContext(
            config.model_dump(mode="json", by_alias=True), uri, experiment_id, parent, "", "", ""
        )
        store.write_state(config, context, "finished", "sqlite:///unused.db")
        stores[sweep] = store
    stores["split"].write_base_item_scores(base)  # "whole": the parent's artifact
    return stores, base, configs


def _by_hand(base, configs, split):
    """Per configuration with item scores: (selection G, F), (report G, F), means over seeds, by hand."""
    layout = {(s, b): len(rows) for s in ("id", "ood") for b, rows in base[f"{s}_nll"].items()}
    sel = {k: split.indices(k[0], k[1], n)[0] for k, n in layout.items()}
    rep = {k: split.indices(k[0], k[1], n)[1] for k, n in layout.items()}
    out = {}
    for name, members in configs.items():
        if members[0][1] is None:
            continue
        parts = []
        for indices in (sel, rep):
            pairs = [_tradeoff(base, items, indices) for _, items, _, _ in members]
            parts.append(tuple(float(np.mean(x)) for x in zip(*pairs)))
        out[name] = parts
    return out


def test_a_stored_sweep_is_chosen_on_the_selection_items_and_reported_on_the_report_items(stored_sweep):
    from rpsft.sweeps.analysis.summary import selection_text
    from rpsft.sweeps.runner import operating_point_metrics
    from typer.testing import CliRunner

    from rpsft.cli import app

    stores, base, configs = stored_sweep
    stored = StoredSweep.read(stores["split"])
    split = ItemSplit(0.5, 1)
    hand = _by_hand(base, configs, split)
    run_of = {name: members[0][0] for name, members in configs.items()}
    # the points select() ranks: the selection part for the configurations with item scores, all items otherwise
    for name, members in configs.items():
        point = next(p for p in stored.points if p.run_id in {m[0] for m in members})
        if name in hand:
            assert point.items == "selection" and point.n_seeds == len(members)
            assert (point.g_id, point.f_ood) == pytest.approx(hand[name][0], abs=1e-12)
        else:
            assert point.items == "all" and (point.g_id, point.f_ood) == pytest.approx(
                members[0][2:], abs=1e-12
            )
    no_items = next(n for n in configs if n not in hand)
    phi_sel = {n: g - BETA * f for n, ((g, f), _) in hand.items()}
    phi_sel[no_items] = configs[no_items][0][2] - BETA * configs[no_items][0][3]
    ranked = sorted(phi_sel, key=phi_sel.get, reverse=True)
    selection = stored.selection()
    assert selection.best.run_id == run_of[ranked[0]]
    best, runner_up = ranked[0], ranked[1]
    assert ranked[-1] == no_items and best in hand and runner_up in hand

    parts = selection.operating_point()
    g, f = hand[best][1]
    assert parts["report"].items == "report"
    assert (parts["report"].g_id, parts["report"].f_ood, parts["report"].phi) == pytest.approx(
        (g, f, g - BETA * f), abs=1e-12
    )
    assert parts["report"].intervals["g_id"].estimate == pytest.approx(g, abs=1e-12)
    assert parts["selection"].phi == pytest.approx(phi_sel[best], abs=1e-12)
    by_role = {c.role: c for c in selection.comparisons()}
    gr, fr = hand[runner_up][1]
    assert by_role["runner-up"].items == "report" and by_role["runner-up"].other.run_id == run_of[runner_up]
    assert by_role["runner-up"].difference.estimate == pytest.approx(
        (g - BETA * f) - (gr - BETA * fr), abs=1e-12
    )
    if best != "run0":
        gs, fs = hand["run0"][1]
        assert by_role["sft"].difference.estimate == pytest.approx(
            (g - BETA * f) - (gs - BETA * fs), abs=1e-12
        )

    # the parent run's numbers name the part they are on; best_* are the report part's
    metrics = operating_point_metrics(parts, BETA, 8)
    assert metrics["operating_point/report/phi"] == metrics["best_phi"] == parts["report"].phi
    assert metrics["operating_point/selection/phi"] == parts["selection"].phi
    assert metrics["operating_point/report/phi_lo"] <= metrics["operating_point/report/phi_hi"]

    # `rpsft sweep select`: JSON and text name the part of every number
    root = str(stores["split"].root)
    out = CliRunner().invoke(app, ["sweep", "select", "split", "--runs-dir", root, "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["split"]["report_fraction"] == 0.5 and payload["split"]["active"]
    assert payload["best"]["items"] == "selection"
    assert payload["operating_point"]["report"]["phi"] == pytest.approx(g - BETA * f, abs=1e-12)
    assert payload["operating_point"]["selection"]["phi"] == pytest.approx(phi_sel[best], abs=1e-12)
    assert payload["best_intervals_items"] == "report"
    assert payload["best_intervals"]["g_id"]["estimate"] == pytest.approx(g, abs=1e-12)
    assert all(c["items"] == "report" for c in payload["comparisons"])
    text = CliRunner().invoke(app, ["sweep", "select", "split", "--runs-dir", root]).output
    assert "operating point (max Phi at beta=1 on the selection items)" in text
    assert (
        f"chosen on the selection items (biased upwards by the choice):  G_id {hand[best][0][0]:+.4f}" in text
    )
    assert f"reported on the report items (held out from the choice):  G_id {g:+.4f} [" in text
    assert "Phi difference on the report items" in text
    assert selection_text(selection) in text

    # `rpsft sweep report`: the operating point's two parts, and the figure's star where its trial is plotted
    from rpsft.dashboards.figures import tradeoff_figure
    from rpsft.dashboards.report import _selection_html
    from rpsft.dashboards.sweep_data import load_sweep_data

    data = load_sweep_data("split", stores["split"].root, histories=False)
    page = _selection_html(data)
    assert "each benchmark&#x27;s items split 50% selection / 50% report (seed 1)" in page
    assert (
        f"chosen on the selection items (biased upwards by the choice): G_id {hand[best][0][0]:+.4f}" in page
    )
    assert f"reported on the report items (held out from the choice): G_id {g:+.4f} [" in page
    star = next(t for t in tradeoff_figure(data).data if t.name.startswith("operating point, beta=1"))
    assert "(chosen on the selection items)" in star.name
    trial = next(t for t in stored.trials if t.run_id == selection.best.run_id)
    assert (star.x[0], star.y[0]) == pytest.approx((trial.f_ood, trial.g_id))  # all items, like every marker


def test_a_stored_sweep_without_a_split_chooses_and_reports_on_all_items(stored_sweep):
    from rpsft.sweeps.analysis.summary import selection_text
    from rpsft.sweeps.analysis.uncertainty import group_points

    stores, base, configs = stored_sweep
    stored = StoredSweep.read(stores["whole"])
    # today's points: the configurations' means of the trials' own metrics
    assert stored.points == [g.point for g in group_points(trial_points(stored.trials))]
    assert all(p.items == "all" for p in stored.points)
    selection = stored.selection()
    assert selection.best == select(stored.points, BETA).best
    parts = selection.operating_point()
    assert parts["selection"].items == parts["report"].items == "all"
    assert (parts["report"].g_id, parts["report"].f_ood) == (selection.best.g_id, selection.best.f_ood)
    assert parts["report"].intervals == stored.analysis.intervals.of(selection.best)
    worst = next(p for p in stored.points if p.run_id == configs["run6"][0][0])
    assert stored.analysis.numbers(worst, BETA, "report").intervals is None  # no item scores: no interval
    text = selection_text(selection)
    assert "no split (evaluation.split.report_fraction: 0)" in text
    assert "on all items (chosen and reported on the same items: biased upwards)" in text
    at_half = stored.selection(0.5)
    g_best = [p for p in stored.points if p.run_id == at_half.best.run_id][0]
    assert at_half.to_dict()["operating_point"]["report"]["phi"] == pytest.approx(g_best.phi(0.5))


def test_the_choice_differs_from_all_items_here_and_pruning_during_the_sweep_keeps_the_split_choice(
    stored_sweep,
):
    from rpsft.sweeps.config.sections import Keep
    from rpsft.sweeps.retention import prune

    stores, _, _ = stored_sweep
    split, whole = StoredSweep.read(stores["split"]), StoredSweep.read(stores["whole"])
    chosen = split.selection().best.run_id
    assert (
        chosen != whole.selection().best.run_id
    )  # the fixture's noise: the held-out items change the choice
    config = split.config.model_copy(update={"keep": Keep(operating_point=True)})
    finished = [t for t in split.trials if t.finished]
    cache: dict = {}
    during = prune(
        config,
        finished,
        final=False,
        client=split.client,
        parent_run_id=split.context.parent_run_id,
        item_cache=cache,
    )
    assert during == {
        chosen: ["operating_point"]
    }  # what the end of the sweep will choose, not the all-items best
    assert len(cache) == 7  # every run with item scores, downloaded once
    assert prune(config, finished, final=False) == {whole.selection().best.run_id: ["operating_point"]}
