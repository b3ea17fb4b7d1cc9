"""A stored sweep with ``evaluation.trajectory: true``: every scored checkpoint is a candidate operating point
(seeds pooled per knobs and step), chosen on the selection items and reported on the report items of that
step's own ``trajectory/step-<step>.json`` (real MLflow on SQLite, synthetic item scores, no training)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from helpers import tradeoff_by_hand
from rpsft.evaluation.item_split import ItemSplit
from rpsft.sweeps.analysis.stored_sweep import StoredSweep

BETA = 1.0
N_ITEMS = 40
BENCHES = {"id": ("a", "b"), "ood": ("c", "d")}
MAX_STEPS = 6
# (name, params, {step: (true G_id, true F_ood)}); step 6 is the final point. The best Phi(1): rpsft k=4 at step 4
TRIALS = [
    ("sft", {"method": "sft", "reference": "sft"}, {2: (0.10, 0.08), 4: (0.15, 0.15), 6: (0.18, 0.20)}),
    ("k4s0", {"method": "rpsft", "k": 4, "lambda": 1.0, "seed": 0}, {2: (0.10, 0.03), 4: (0.20, 0.04), 6: (0.22, 0.10)}),
    ("k4s1", {"method": "rpsft", "k": 4, "lambda": 1.0, "seed": 1}, {2: (0.10, 0.03), 4: (0.20, 0.04), 6: (0.22, 0.10)}),
    ("k8", {"method": "rpsft", "k": 8, "lambda": 1.0, "seed": 0}, {2: (0.05, 0.02), 4: (0.12, 0.05), 6: (0.14, 0.06)}),
]  # fmt: skip


def _scores(rng, difficulty, shift, noise=0.02):
    return [(float(v), 1.0) for v in difficulty + shift + rng.normal(0, noise, N_ITEMS)]


def _tradeoff(base, record, indices=None):
    return tradeoff_by_hand(base, record, BENCHES, indices)


@pytest.fixture
def trajectory_store(tmp_path):
    """Two stored sweeps over the same MLflow runs: ``traj`` (evaluation.trajectory: true) and ``final`` (the
    same runs without trajectory); each run stores ``eval/g_id`` / ``eval/f_ood`` at steps 2 and 4, their item
    scores as ``trajectory/step-<step>.json``, and its final point (step 6) as metrics and ``item_scores.json``."""
    from rpsft.sweeps.analysis.trajectory import log_checkpoint_items
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.store import tracking
    from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore

    rng = np.random.default_rng(5)
    difficulty = {(s, b): rng.normal(0, 1, N_ITEMS) for s, names in BENCHES.items() for b in names}
    base = {
        f"{s}_nll": {b: _scores(rng, difficulty[(s, b)], 0.0) for b in names} for s, names in BENCHES.items()
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, "trajectory-test")
    parent = tracking.create_parent_run(client, experiment_id, "traj", {})
    tracking.log_json_artifact(client, parent, "base_item_scores.json", base)
    items = {}  # (trial name, step) -> item scores
    runs = {}  # trial name -> (trial id, run id)
    for name, params, steps in TRIALS:
        for step, (g, f) in steps.items():
            items[(name, step)] = {
                f"{s}_nll": {b: _scores(rng, difficulty[(s, b)], g if s == "id" else -f) for b in names}
                for s, names in BENCHES.items()
            }
        tags = {tracking.PARENT_TAG: parent, tracking.TAG_TRIAL: f"trial_{name}", tracking.TAG_ROLE: "trial"}
        if params.get("reference"):
            tags[tracking.TAG_REFERENCE] = params["reference"]
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        tracking.log_params(client, run_id, {**params, "max_steps": MAX_STEPS})
        for step in (2, 4):
            g, f = _tradeoff(base, items[(name, step)])
            tracking.log_metrics(client, run_id, {"eval/g_id": g, "eval/f_ood": f}, step=step)
            log_checkpoint_items(client, run_id, step, items[(name, step)])
        g, f = _tradeoff(base, items[(name, MAX_STEPS)])
        tracking.log_metrics(client, run_id, {"g_id": g, "f_ood": f, "phi": g - BETA * f})
        tracking.log_json_artifact(client, run_id, "item_scores.json", items[(name, MAX_STEPS)])
        client.set_terminated(run_id, status="FINISHED")
        runs[name] = (f"trial_{name}", run_id)
        time.sleep(0.01)
    stores = {}
    for sweep, trajectory in (("traj", True), ("final", False)):
        config = parse_sweep_config(
            {
                "name": sweep,
                "references": ["sft"],
                "output_dir": str(tmp_path / "sweeps"),
                "objective": {"betas": [BETA, 4.0]},
                "evaluation": {
                    "every": 2 if trajectory else 0,
                    "trajectory": trajectory,
                    "intervals": {"draws": 200},
                    "split": {"report_fraction": 0.5, "seed": 3},
                },
            }
        )
        store = SweepStore.of(config)
        context = SweepContext(
            config.model_dump(mode="json", by_alias=True), uri, experiment_id, parent, "", "", ""
        )
        store.write_state(config, context, "finished", "sqlite:///unused.db")
        stores[sweep] = store
    return stores, base, items, runs


def _parts(base, split):
    layout = {(s, b): len(base[f"{s}_nll"][b]) for s, names in BENCHES.items() for b in names}
    selection = {k: split.indices(k[0], k[1], n)[0] for k, n in layout.items()}
    report = {k: split.indices(k[0], k[1], n)[1] for k, n in layout.items()}
    return selection, report


def _by_hand(base, items, members, step, indices):
    """(G_id, F_ood) of a configuration (its seeds' ``members``) at ``step`` on ``indices``: the mean over seeds."""
    pairs = [_tradeoff(base, items[(name, step)], indices) for name in members]
    return tuple(float(np.mean(x)) for x in zip(*pairs))


CONFIGS = {"sft": ["sft"], "k4": ["k4s0", "k4s1"], "k8": ["k8"]}


def test_the_operating_point_is_a_trajectory_step_reported_on_its_own_report_items(trajectory_store):
    from typer.testing import CliRunner

    from rpsft.cli import app

    stores, base, items, runs = trajectory_store
    selection_idx, report_idx = _parts(base, ItemSplit(0.5, 3))
    phi_sel = {
        (config, step): (lambda gf: gf[0] - BETA * gf[1])(_by_hand(base, items, members, step, selection_idx))
        for config, members in CONFIGS.items()
        for step in (2, 4, MAX_STEPS)
    }
    chosen = max(phi_sel, key=phi_sel.get)
    assert chosen == ("k4", 4)  # the planted truth survives the noise on the selection items
    root = str(stores["traj"].root)
    out = CliRunner().invoke(app, ["sweep", "select", "traj", "--runs-dir", root, "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    best = payload["best"]
    trial_id, run_id = runs["k4s0"]
    assert best["trial_id"] == f"{trial_id}@4" and best["params"]["step"] == 4
    assert best["run_id"] == run_id and best["run_ids"] == [run_id, runs["k4s1"][1]]  # the MLflow links
    assert best["n_seeds"] == 2 and best["items"] == "selection"
    assert best["phi"] == pytest.approx(phi_sel[chosen], abs=1e-12)
    # every (configuration, step) is a candidate: 3 configurations x 3 steps, seeds pooled
    assert len(payload["ranking"]) == 9
    assert {r["trial_id"] for r in payload["ranking"]} >= {f"{runs['sft'][0]}@2", runs["sft"][0]}

    g, f = _by_hand(base, items, CONFIGS["k4"], 4, report_idx)  # the step-4 artifacts' report items
    report = payload["operating_point"]["report"]
    assert report["items"] == "report"
    assert (report["g_id"], report["f_ood"], report["phi"]) == pytest.approx((g, f, g - BETA * f), abs=1e-12)
    assert payload["best_intervals_items"] == "report"
    assert payload["best_intervals"]["g_id"]["estimate"] == pytest.approx(g, abs=1e-12)
    assert payload["best_intervals"]["f_ood"]["estimate"] == pytest.approx(f, abs=1e-12)
    # the final point of the same runs is another configuration, with its own (item_scores.json) numbers
    ranked = sorted(phi_sel, key=phi_sel.get, reverse=True)
    runner_up = payload["comparisons"][0]
    assert runner_up["role"] == "runner-up"
    gr, fr = _by_hand(base, items, CONFIGS[ranked[1][0]], ranked[1][1], report_idx)
    assert runner_up["phi_difference"]["estimate"] == pytest.approx(
        (g - BETA * f) - (gr - BETA * fr), abs=1e-12
    )
    # vs sft: its final point only (not each of its steps)
    sft = [c for c in payload["comparisons"] if c["role"] == "sft"]
    assert [c["trial_id"] for c in sft] == [runs["sft"][0]]
    gs, fs = _by_hand(base, items, ["sft"], MAX_STEPS, report_idx)
    assert sft[0]["phi_difference"]["estimate"] == pytest.approx((g - BETA * f) - (gs - BETA * fs), abs=1e-12)
    # the family frontiers come with the same JSON: rpsft's at beta=1 is this point
    frontier = payload["frontiers"]["families"]["rpsft"]["1"]
    assert frontier["trial_id"] == f"{trial_id}@4"
    assert frontier["report"]["phi_interval"]["estimate"] == pytest.approx(g - BETA * f, abs=1e-12)

    text = CliRunner().invoke(app, ["sweep", "select", "traj", "--runs-dir", root]).output
    assert f"trial {trial_id}@4  rpsft k=4 lambda=1 (2 seeds) step=4" in text
    assert "family frontiers (chosen by max Phi on the selection items" in text


def test_without_trajectory_the_same_runs_give_one_point_per_trial(trajectory_store):
    stores, base, items, runs = trajectory_store
    stored = StoredSweep.read(stores["final"])
    assert sorted(p.trial_id for p in stored.points) == sorted(runs[m[0]][0] for m in CONFIGS.values())
    assert all("step" not in p.params for p in stored.points)
    selection_idx, _ = _parts(base, ItemSplit(0.5, 3))
    for members in CONFIGS.values():
        point = next(p for p in stored.points if p.run_id == runs[members[0]][1])
        assert (point.g_id, point.f_ood) == pytest.approx(
            _by_hand(base, items, members, MAX_STEPS, selection_idx), abs=1e-12
        )
    # the intervals are keyed by run id, as before trajectories
    assert set(stored.analysis.intervals.keys) == {run_id for _, run_id in runs.values()}
    selection = stored.selection()
    assert "@" not in selection.best.trial_id
