"""A tiny sweep with seeds, a grid search and the multiple-choice objective: item scores, intervals and the
operating point's comparisons are stored, and they agree with an independent computation from the items."""

from __future__ import annotations

import json
import math

import pytest
from conftest import PAPER_DATA
from sweep_helpers import run_quietly, sweep_dict

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present"),
]


def _weighted(rows):
    return sum(v for v, _ in rows) / sum(w for _, w in rows)


def _macro_gain(tuned, base, sign):
    return sum(sign * (_weighted(tuned[b]) - _weighted(base[b])) for b in base) / len(base)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("intervals")
    raw = sweep_dict(
        "ci",
        tiny_dir,
        root,
        space={"k": [4, 0.25], "lambda": [1.0], "layers": ["all"]},
        references=[{"method": "sft", "seeds": [0, 1]}, "l2-init"],
        search={"algorithm": "grid", "num_trials": 2, "seed": 0},
        scheduler={"type": "fifo"},
        objective={"mode": "phi", "metric": "mc", "betas": [1.0, 0.5]},
    )
    raw["evaluation"]["mc"] = {"benchmarks": ["arc_c", "gpqa"], "n": 3, "batch_size": 8}
    raw["evaluation"]["intervals"] = {"draws": 500}
    return run_quietly(raw), root


def test_item_scores_and_intervals_are_stored_and_consistent(outcome):
    from rpsft.sweeps.store.tracking import child_runs, client_for, download_json

    result, _ = outcome
    client = client_for(result.tracking_uri)
    runs = [r for r in child_runs(client, result.experiment_id, result.parent_run_id) if r.info.status == "FINISHED"]
    assert len(runs) == 5  # sft x 2 seeds, l2-init, 2 grid points
    base = json.loads((result.sweep_dir / "base_item_scores.json").read_text())
    assert download_json(client, result.parent_run_id, "base_item_scores.json") == base
    for run in runs:
        items = download_json(client, run.info.run_id, "item_scores.json")
        assert {b: len(v) for b, v in items["ood_mc"].items()} == {"arc_c": 3, "gpqa": 3}
        assert {b: len(v) for b, v in items["id_nll"].items()} == {b: len(v) for b, v in base["id_nll"].items()}
        m = run.data.metrics
        # G_id and F_ood recomputed by hand from the stored items: token-weighted NLL gain, accuracy drop
        assert m["g_id"] == pytest.approx(_macro_gain(items["id_nll"], base["id_nll"], +1), abs=1e-9)
        assert m["f_ood"] == pytest.approx(_macro_gain(items["ood_mc"], base["ood_mc"], -1), abs=1e-9)
        assert m["g_id_lo"] <= m["g_id"] <= m["g_id_hi"]
        assert m["f_ood_lo"] <= m["f_ood"] <= m["f_ood_hi"]
        assert m["phi_at_0.5_lo"] <= m["phi_at_0.5"] <= m["phi_at_0.5_hi"]
        assert set(m) >= {"mc/ood/arc_c", "mc/ood/gpqa", "mc/f_ood", "nll/g_id"}
    # the grid covered both k choices once
    searched = sorted(r.data.params["k"] for r in runs if not r.data.tags.get("rpsft.reference"))
    assert searched == ["0.25", "4"]


def test_seeds_pool_into_one_configuration(outcome):
    from rpsft.sweeps.store.tracking import child_runs, client_for

    result, _ = outcome
    intervals = json.loads((result.sweep_dir / "intervals.json").read_text())
    sft = [c for c in intervals["configurations"] if c["params"]["method"] == "sft"]
    assert len(sft) == 1 and sft[0]["n_seeds"] == 2
    client = client_for(result.tracking_uri)
    runs = {r.info.run_id: r for r in child_runs(client, result.experiment_id, result.parent_run_id)}
    mean_g = sum(runs[r].data.metrics["g_id"] for r in sft[0]["run_ids"]) / 2
    assert sft[0]["g_id"]["estimate"] == pytest.approx(mean_g, abs=1e-9)
    assert sft[0]["g_id"]["low"] <= sft[0]["g_id"]["estimate"] <= sft[0]["g_id"]["high"]
    # 4 configurations: sft (2 seeds), l2-init, 2 grid points
    assert len(intervals["configurations"]) == 4
    selection = result.selection
    assert sum(p.n_seeds for p in selection.ranking) == 5
    roles = [c.role for c in selection.comparisons()]
    assert "runner-up" in roles
    # the choice is made on the selection items and reported on the report items (evaluation.split defaults:
    # half of each benchmark's items, seed 0): both recomputed here from the stored items
    base = json.loads((result.sweep_dir / "base_item_scores.json").read_text())
    on_selection = {run_id: _phi_by_hand(client, run_id, base, 0, 1.0) for run_id in runs}
    on_report = {run_id: _phi_by_hand(client, run_id, base, 1, 1.0) for run_id in runs}

    def mean_over_seeds(point, table):
        return sum(table[r] for r in point.run_ids) / len(point.run_ids)

    for point in selection.ranking:
        assert point.items == "selection"
        assert point.phi(1.0) == pytest.approx(mean_over_seeds(point, on_selection), abs=1e-9)
    report = selection.operating_point()["report"]
    assert report.items == "report"
    assert report.phi == pytest.approx(mean_over_seeds(selection.best, on_report), abs=1e-9)
    parent = client.get_run(result.parent_run_id).data
    assert parent.metrics["operating_point/report/phi"] == pytest.approx(report.phi, abs=1e-9)
    assert parent.metrics["operating_point/selection/phi"] == pytest.approx(selection.best.phi(1.0), abs=1e-9)
    assert parent.tags["rpsft.operating_point_report_items"] == "report"
    assert "selection" in parent.tags["rpsft.item_split"]
    for c in selection.comparisons():
        assert c.difference is not None and math.isfinite(c.difference.low) and c.items == "report"
        # the paired difference's estimate is the difference of the two configurations' Phi on the report items
        want = mean_over_seeds(selection.best, on_report) - mean_over_seeds(c.other, on_report)
        assert c.difference.estimate == pytest.approx(want, abs=1e-9)


def _phi_by_hand(client, run_id, base, part, beta):
    """A run's Phi on one part (0 selection, 1 report) of the default item split, from its stored items."""
    from rpsft.evaluation.item_split import ItemSplit
    from rpsft.sweeps.store.tracking import download_json

    items = download_json(client, run_id, "item_scores.json")
    split = ItemSplit(0.5, 0)

    def gain(key, suite, sign):
        out = []
        for bench, rows in base[key].items():
            idx = split.indices(suite, bench, len(rows))[part]
            tuned, base_rows = [items[key][bench][i] for i in idx], [rows[i] for i in idx]
            out.append(sign * (_weighted(tuned) - _weighted(base_rows)))
        return sum(out) / len(out)

    return gain("id_nll", "id", 1) - beta * gain("ood_mc", "ood", -1)


def test_select_prints_intervals_and_distinguishability(outcome):
    from typer.testing import CliRunner

    from rpsft.cli import app

    result, root = outcome
    out = CliRunner().invoke(app, ["sweep", "select", "ci", "--runs-dir", str(result.sweep_dir.parent), "--beta", "0.5"])
    assert out.exit_code == 0, out.output
    assert "paired bootstrap intervals" in out.output
    assert "vs runner-up" in out.output and "distinguishable" in out.output
    assert "chosen on the selection items" in out.output and "reported on the report items" in out.output
    as_json = CliRunner().invoke(app, ["sweep", "select", "ci", "--runs-dir", str(result.sweep_dir.parent), "--json"])
    payload = json.loads(as_json.stdout)
    assert payload["best_intervals_items"] == "report" and payload["split"]["report_fraction"] == 0.5
    assert payload["operating_point"]["report"]["intervals"] == payload["best_intervals"]
    best = payload["best_intervals"]
    assert best["g_id"]["low"] <= best["g_id"]["estimate"] <= best["g_id"]["high"]
    assert payload["comparisons"] and "distinguishable" in payload["comparisons"][0]


def test_training_data_that_repeats_a_scored_item_fails_before_any_trial(tmp_path, tiny_dir):
    from rpsft.core.data import write_jsonl
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.runner import run_sweep

    first = json.loads((PAPER_DATA / "id" / "math500.jsonl").read_text().split("\n")[0])
    user = next(m["content"] for m in first["prompt"] if m["role"] == "user")
    data = tmp_path / "leaky.jsonl"
    write_jsonl(
        data,
        [
            [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": "  " + user.upper()}, {"role": "assistant", "content": "leaked"}],
        ],
    )
    raw = sweep_dict("leak", tiny_dir, tmp_path)
    raw["data"] = str(data)
    with pytest.raises(SweepConfigError, match=r"data: 1 training example\(s\) .* overlap"):
        run_sweep(parse_sweep_config(raw))
    assert not (tmp_path / "sweeps" / "leak" / "tune").exists()  # nothing ran
