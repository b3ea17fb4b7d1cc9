"""Which trials keep their weights (no services): the operating point, the top N configurations, the
references; a configuration whose seeds have not all finished keeps its weights during the sweep; a running
trial's directory is never touched."""

from __future__ import annotations

import pytest
from rpsft.sweeps.analysis.points import trial_points
from rpsft.sweeps.analysis.uncertainty import group_points
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.retention import kept_roles, prune
from rpsft.sweeps.store.sweep_store import SweepStore, TrialRecord, trial_label


def _config(tmp_path, **keep):
    return SweepConfig.model_validate(
        {
            "name": "keep-unit",
            "references": [{"method": "sft", "seeds": [0, 1, 2]}, {"method": "l2-init", "lambda": 10.0}],
            "keep": keep,
            "output_dir": str(tmp_path),
        }
    )


def _run(trial_id, g_id, f_ood, status="FINISHED", reference=None, method="rpsft", seed=0):
    params = {"method": method, "seed": str(seed)}
    if reference:
        params["reference"] = reference
    metrics = {} if status == "RUNNING" else {"g_id": g_id, "f_ood": f_ood}
    return TrialRecord(
        trial_id, f"run-{trial_id}", trial_label(params), status, "", reference or "", params, metrics
    )


def _runs():
    return [
        _run("sft0", 0.05, 0.06, reference="sft seed=0", method="sft"),  # Phi -0.01
        _run("sft1", 0.05, 0.05, reference="sft seed=1", method="sft", seed=1),  # Phi 0.00
        _run("l2", 0.01, -0.01, reference="l2-init lambda=10", method="l2-init"),  # Phi +0.02: the best
        _run("k8", 0.03, 0.02),  # Phi +0.01
        _run("k32", 0.02, 0.04),  # Phi -0.02
        _run("busy", 0, 0, status="RUNNING"),
    ]


def _with_weights(config, runs):
    for run in runs:
        path = SweepStore.of(config).trial_model_dir(run.trial_id)
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")


def _left(config, runs):
    store = SweepStore.of(config)
    return sorted(r.trial_id for r in runs if store.trial_model_dir(r.trial_id).exists())


def test_during_the_sweep_a_configuration_with_seeds_to_come_keeps_its_weights(tmp_path):
    config, runs = _config(tmp_path, operating_point=True), _runs()
    _with_weights(config, runs)
    kept = prune(config, runs, final=False)
    assert kept == {"run-l2": ["operating_point"]}
    # sft has 2 of its 3 seeds: both keep their weights; the running trial is untouched
    assert _left(config, runs) == ["busy", "l2", "sft0", "sft1"]
    prune(config, runs, final=True)  # the sweep is over: nothing is waiting for seeds any more
    assert _left(config, runs) == ["busy", "l2"]


def test_top_n_and_references(tmp_path):
    runs = _runs()
    config = _config(tmp_path, top=2, references=True)
    groups = group_points(trial_points(runs))
    from rpsft.sweeps.retention import _selection

    roles = kept_roles(config, _selection(config, groups), groups)
    # ranking by Phi(1): l2 (+0.02), k8 (+0.01), sft (mean of two seeds, -0.005), k32 (-0.02)
    assert roles == {"run-l2": ["top-1", "reference"], "run-k8": ["top-2"], "run-sft0": ["reference"]}
    _with_weights(config, runs)
    prune(config, runs, final=True)
    assert _left(config, runs) == ["busy", "k8", "l2", "sft0"]


def test_keep_needs_something_to_keep():
    from rpsft.sweeps.config.sections import Keep

    assert not Keep().any and Keep(top=1).any and Keep(references=True).any
    with pytest.raises(ValueError, match="top"):
        Keep(top=-1)
