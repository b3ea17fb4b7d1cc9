"""Warm starts: a sweep started from an earlier one holds the earlier trials' values in its Optuna study,
marked as carried over, while MLflow gets no run for them; a warm start that cannot inform fails before any
training."""

from __future__ import annotations

import pytest
from conftest import PAPER_DATA
from sweep_helpers import run_quietly, sweep_dict

needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")


def test_a_missing_or_own_warm_start_sweep_fails_before_any_training(tmp_path):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.search.warm_start import check_warm_start

    raw = sweep_dict(
        "later", tmp_path / "model", tmp_path, search={"num_trials": 1, "warm_start": ["earlier"]}
    )
    with pytest.raises(SweepConfigError, match=r"search.warm_start: name: no sweep 'earlier'"):
        check_warm_start(parse_sweep_config(raw))
    raw["search"]["warm_start"] = ["later"]
    with pytest.raises(SweepConfigError, match="search.warm_start: 'later' is this sweep"):
        check_warm_start(parse_sweep_config(raw))
    raw["search"]["warm_start"] = ["../elsewhere"]
    with pytest.raises(SweepConfigError, match=r"search.warm_start"):
        parse_sweep_config(raw)


@needs_paper_data
@pytest.mark.slow
@pytest.mark.integration
def test_a_warm_started_sweep_holds_the_earlier_values_and_mlflow_no_duplicates(tmp_path, tiny_dir):
    import optuna
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.search.warm_start import CARRIED_ATTR, check_warm_start
    from rpsft.sweeps.store import tracking

    earlier = run_quietly(
        sweep_dict("earlier", tiny_dir, tmp_path, references=["sft"], search={"num_trials": 2, "seed": 0})
    )
    later = run_quietly(
        sweep_dict(
            "later",
            tiny_dir,
            tmp_path,
            references=["sft"],
            search={"num_trials": 1, "seed": 1, "warm_start": ["earlier"]},
        )
    )
    client = tracking.client_for(earlier.tracking_uri)
    earlier_runs = tracking.child_runs(client, earlier.experiment_id, earlier.parent_run_id)
    later_runs = tracking.child_runs(client, later.experiment_id, later.parent_run_id)
    assert len(earlier_runs) == 3 and len(later_runs) == 2  # sft + its own searched trial: nothing carried
    searched = [r for r in earlier_runs if not r.data.tags.get(tracking.TAG_REFERENCE)]
    beta = 1.0
    expected = sorted(r.data.metrics["g_id"] - beta * r.data.metrics["f_ood"] for r in searched)

    study = optuna.load_study(study_name="later", storage=f"sqlite:///{later.sweep_dir / 'optuna.db'}")
    carried = [t for t in study.trials if t.user_attrs.get(CARRIED_ATTR) == "earlier"]
    own = [t for t in study.trials if CARRIED_ATTR not in t.user_attrs]
    assert sorted(t.value for t in carried) == pytest.approx(expected, abs=1e-9)
    assert [t.state.name for t in own] == ["COMPLETE"] and len(study.trials) == 3
    parent = client.get_run(later.parent_run_id)
    assert parent.data.metrics["warm_start/earlier"] == 2
    assert len(later.trials) == 2  # the sweep counts only the trials it ran

    other_data = sweep_dict(
        "other", tiny_dir, tmp_path, data="demo-math:8", search={"warm_start": ["earlier"]}
    )
    with pytest.raises(SweepConfigError, match="search.warm_start: sweep 'earlier' trained data"):
        check_warm_start(parse_sweep_config(other_data))
