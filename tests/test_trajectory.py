"""A trial's trajectory as points of the trade-off: ``stop_at_step`` gives the full run's weights at a step (the
schedule of the full run kept), intermediate evaluations store their per-item scores, the trajectory points
come from the logged ``eval/`` metrics, and ``rpsft export --trial <id>@<step>`` retrains one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PAPER_DATA
from rpsft.core.config import ConfigError, TrainConfig
from rpsft.core.models import tiny_model
from rpsft.core.train import train
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.analysis.trajectory import (
    intermediate_step,
    point_id,
    split_point_id,
    trajectory_artifact,
    trajectory_points,
)
from rpsft.sweeps.store.sweep_store import TrialRecord, trial_label
from transformers import TrainerCallback

needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")


# ----------------------------------------------------------------------------------------------- stop_at_step


def _config(tmp_path, **overrides):
    base = dict(
        data="demo-math:16",
        max_length=96,
        batch_size=2,
        grad_accum=2,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        method="rpsft",
        k=4,
        layers="all",
        save_model=False,
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        seed=0,
    )
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Capture(TrainerCallback):
    """The weights, learning rates and protected drift of a run at optimizer step ``step``."""

    def __init__(self, step):
        self.step, self.weights, self.drift, self.regularizer = step, None, None, None

    def bind_regularizer(self, regularizer):
        self.regularizer = regularizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = _weights(model)
            self.drift = self.regularizer.drift()


def _learning_rates(result):
    return [e["learning_rate"] for e in result.metrics["log_history"] if "learning_rate" in e]


def test_stop_at_step_gives_the_full_runs_weights_at_that_step(tmp_path, smol_tokenizer):
    step = 2
    capture = Capture(step)
    full = train(
        _config(tmp_path / "full"),
        model=tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0),
        tokenizer=smol_tokenizer,
        callbacks=[capture],
        progress=False,
        print_logs=False,
    )
    assert capture.weights is not None and full.metrics["global_steps"] == 4

    stopped = train(
        _config(tmp_path / "stopped", stop_at_step=step),
        model=tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0),
        tokenizer=smol_tokenizer,
        progress=False,
        print_logs=False,
    )
    assert stopped.metrics["global_steps"] == step
    assert _learning_rates(stopped) == _learning_rates(full)[:step]  # the full run's cosine schedule
    weights = _weights(stopped.model)
    for name, value in capture.weights.items():
        assert torch.allclose(weights[name], value, atol=1e-6, rtol=0), name
    # the drift an intermediate evaluation logs (the bound regularizer's, at that step) is the stopped run's
    assert stopped.drift == pytest.approx(capture.drift, abs=1e-6)

    short = train(  # max_steps: 2 runs its own (shorter) cosine schedule: other weights
        _config(tmp_path / "short", max_steps=step),
        model=tiny_model("llama", vocab_size=len(smol_tokenizer), seed=0),
        tokenizer=smol_tokenizer,
        progress=False,
        print_logs=False,
    )
    assert _learning_rates(short) != _learning_rates(full)[:step]
    short_weights = _weights(short.model)
    assert max((short_weights[n] - v).abs().max().item() for n, v in capture.weights.items()) > 1e-5


def test_stop_at_step_is_validated(tmp_path):
    with pytest.raises(ValueError, match="stop_at_step: 5 is past max_steps: 4"):
        _config(tmp_path, stop_at_step=5)
    with pytest.raises(ValueError, match="stop_at_step"):
        _config(tmp_path, stop_at_step=0)
    assert _config(tmp_path, stop_at_step=4).stop_at_step == 4


def test_sharded_training_refuses_stop_at_step(tmp_path):
    from rpsft.core.sharded_method import check_sharded_settings

    config = _config(tmp_path, stop_at_step=2, resources={"workers": 2})
    with pytest.raises(ConfigError, match="stop_at_step: 2 under sharded training.*Fix:"):
        check_sharded_settings(config)
    check_sharded_settings(_config(tmp_path, resources={"workers": 2}))


# ----------------------------------------------------------------------------------------------- config


@needs_paper_data
@pytest.mark.parametrize(
    "evaluation, extra, message",
    [
        ({"trajectory": True}, {}, r"evaluation\.trajectory: true needs .*evaluation\.every is 0.*Fix:"),
        (
            {"trajectory": True, "every": 1},
            {"resources": {"cpus": 1, "workers": 2}},
            r"evaluation\.trajectory: true with resources\.workers: 2.*Fix:",
        ),
        (
            {"trajectory": True, "every": 1, "loss": {"kl": True}},
            {"objective": {"metric": "kl"}},
            r"evaluation\.trajectory: true with objective\.metric: kl.*Fix:",
        ),
    ],
)
def test_trajectory_config_is_validated(tmp_path, tiny_dir, evaluation, extra, message):
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from sweep_helpers import sweep_dict

    raw = sweep_dict("traj", tiny_dir, tmp_path, scheduler={"type": "fifo"}, **extra)
    raw["evaluation"] = {**raw["evaluation"], **evaluation}
    with pytest.raises(SweepConfigError, match=message):
        parse_sweep_config(raw)
    raw["evaluation"] = {**raw["evaluation"], "trajectory": False, "every": 0}
    parse_sweep_config(raw)  # the same sweep without intermediate evaluations is fine


# ----------------------------------------------------------------------------------------------- scoring


def test_checkpoint_scores_are_the_loss_items_and_the_mc_items_without_base_model(monkeypatch):
    from types import SimpleNamespace

    from rpsft.sweeps.config.sweep import SweepConfig
    from rpsft.sweeps.trial.scoring import TrialScorer

    config = SweepConfig.model_validate(
        {"name": "mc", "evaluation": {"mc": {"n": 2}}, "objective": {"metric": "mc"}, "cache_dir": "/tmp"}
    )
    scorer = TrialScorer(config, "base", "/tmp")
    seen = {}

    class Scores:
        ood_kl_items = None

        def item_scores(self, ood="nll"):
            return {"id": {"math500": [(-1.0, 3)]}, "ood": {"gpqa": [(-2.0, 4)]}}

    def loss(model, tokenizer, base_model=None):
        seen["base_model"] = base_model
        return {"nll/g_id": 0.5}, SimpleNamespace(tuned=Scores())

    monkeypatch.setattr(scorer, "_loss", loss)
    monkeypatch.setattr(
        scorer,
        "mc_metrics",
        lambda m, t, metrics: ({"mc/f_ood": 0.1}, {"arc": [(1.0, 1)]}, {"arc": [(1.0, 1)]}),
    )
    metrics, items = scorer.checkpoint_scores(object(), object())
    assert seen["base_model"] is None  # no base model during training: no KL
    assert metrics == {"nll/g_id": 0.5, "mc/f_ood": 0.1}
    assert items == {
        "id_nll": {"math500": [(-1.0, 3)]},
        "ood_nll": {"gpqa": [(-2.0, 4)]},
        "ood_mc": {"arc": [(1.0, 1)]},
    }
    # an nll objective without trajectory points does not use the mc scores at a checkpoint: none are computed
    config = SweepConfig.model_validate(
        {"name": "mc", "evaluation": {"mc": {"n": 2}, "every": 1}, "objective": {"metric": "nll"}, "cache_dir": "/tmp"}
    )
    scorer = TrialScorer(config, "base", "/tmp")
    monkeypatch.setattr(scorer, "_loss", loss)
    monkeypatch.setattr(scorer, "mc_metrics", lambda *a: pytest.fail("mc scored where nothing uses it"))
    metrics, items = scorer.checkpoint_scores(object(), object())
    assert metrics == {"nll/g_id": 0.5} and "ood_mc" not in items


# ----------------------------------------------------------------------------------------------- points


def _record(trial_id, g_id, f_ood, history, status="FINISHED", lam="1.0"):
    params = {"method": "rpsft", "k": "4", "lambda": lam, "seed": "0", "max_steps": "3"}
    return TrialRecord(
        trial_id,
        f"run-{trial_id}",
        trial_label(params),
        status,
        "finished",
        "",
        params,
        {"g_id": g_id, "f_ood": f_ood} if status == "FINISHED" else {},
        history=history,
    )


def test_trajectory_points_from_records():
    from rpsft.sweeps.analysis.uncertainty import group_points

    history = {"eval/g_id": [(1, 0.1), (2, 0.2)], "eval/f_ood": [(1, 0.01), (2, float("nan"))]}
    records = [
        _record("a", 0.3, 0.03, history),
        _record("b", 0.5, 0.05, {"eval/g_id": [(1, 0.4)], "eval/f_ood": [(1, 0.04)]}, lam="2.0"),
        _record("b-seed1", 0.7, 0.07, {"eval/g_id": [(1, 0.6)], "eval/f_ood": [(1, 0.06)]}, lam="2.0"),
        _record("c", 0.0, 0.0, history, status="RUNNING"),
    ]
    points = trajectory_points(records)
    assert [(p.trial_id, p.g_id, p.f_ood, p.params["step"]) for p in points] == [
        ("a@1", 0.1, 0.01, 1),  # a@2 has no finite F_ood
        ("a", 0.3, 0.03, 3),
        ("b@1", 0.4, 0.04, 1),
        ("b", 0.5, 0.05, 3),
        ("b-seed1@1", 0.6, 0.06, 1),
        ("b-seed1", 0.7, 0.07, 3),
    ]
    assert all(p.run_id == f"run-{split_point_id(p.trial_id)[0]}" for p in points)
    assert [intermediate_step(p) for p in points] == [1, None, 1, None, 1, None]
    # "step" is a knob: two steps of one trial are two configurations; one step of two seeds is one
    groups = group_points(points)
    assert [[p.trial_id for p in g.members] for g in groups] == [
        ["a@1"],
        ["a"],
        ["b@1", "b-seed1@1"],
        ["b", "b-seed1"],
    ]


def test_point_ids_and_artifact_names():
    assert trajectory_artifact(8) == "trajectory/step-000008.json"
    assert point_id("abc_00001", 8) == "abc_00001@8"
    assert split_point_id("abc_00001@8") == ("abc_00001", 8)
    assert split_point_id("rpsft k=auto@0.9") == ("rpsft k=auto@0.9", None)
    assert intermediate_step(TrialPoint("x@2", 0, 0, params={"step": 2})) == 2
    assert intermediate_step(TrialPoint("x", 0, 0, params={"step": 3})) is None
    assert intermediate_step(TrialPoint("x@2", 0, 0, params={})) is None


def test_a_trajectory_point_keeps_no_weights(tmp_path):
    from rpsft.sweeps.analysis.selection import select
    from rpsft.sweeps.config.sweep import SweepConfig
    from rpsft.sweeps.retention import kept_roles, trajectory_roles

    config = SweepConfig.model_validate(
        {"name": "keep-traj", "keep": {"operating_point": True, "top": 2}, "output_dir": str(tmp_path)}
    )
    points = [
        TrialPoint("a@1", 0.9, 0.0, params={"step": 1}, run_id="run-a"),
        TrialPoint("a", 0.5, 0.0, params={"step": 3}, run_id="run-a"),
        TrialPoint("b", 0.1, 0.0, params={"step": 3}, run_id="run-b"),
    ]
    selection = select(points, 1.0)
    assert selection.best.trial_id == "a@1"
    assert kept_roles(config, selection, []) == {"run-a": ["top-2"]}  # a's final weights, not a@1's
    assert [(p.trial_id, role) for p, role in trajectory_roles(config, selection)] == [
        ("a@1", "operating_point"),
        ("a@1", "top-1"),
    ]


# ----------------------------------------------------------------------------------------------- a sweep


@pytest.fixture(scope="module")
def trajectory_sweep(tmp_path_factory, tiny_dir):
    from sweep_helpers import run_quietly, sweep_dict

    root = tmp_path_factory.mktemp("trajectory-sweep")
    raw = sweep_dict(
        "traj",
        tiny_dir,
        root,
        references=["sft"],
        search={"num_trials": 1, "seed": 0},
        scheduler={"type": "fifo"},
    )
    raw["train"] = {**raw["train"], "max_steps": 3, "lr_scheduler": "cosine"}
    raw["evaluation"] = {**raw["evaluation"], "every": 1, "trajectory": True}
    outcome = run_quietly(raw)
    yield outcome, root
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _shape(items):
    return {key: {bench: [n for _, n in rows] for bench, rows in part.items()} for key, part in items.items()}


@needs_paper_data
@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_stores_its_trials_trajectories(trajectory_sweep):
    from rpsft.evaluation.intervals import bootstrap_tradeoff
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.analysis.trajectory import metric_steps, point_item_scores
    from rpsft.sweeps.analysis.uncertainty import group_points, objective_items
    from rpsft.sweeps.store import tracking
    from rpsft.sweeps.store.sweep_store import ITEM_SCORES
    from rpsft.sweeps.store.tracking import download_json

    outcome, root = trajectory_sweep
    client = tracking.client_for(outcome.tracking_uri)
    stored = load_stored_sweep("traj", root / "sweeps")
    finished = [t for t in stored.trials if t.finished]
    assert len(finished) == 2
    base = json.loads((outcome.sweep_dir / "base_item_scores.json").read_text())
    for trial in finished:
        listed = sorted(a.path for a in client.list_artifacts(trial.run_id, "trajectory"))
        assert listed == [trajectory_artifact(1), trajectory_artifact(2)]
        final_items = download_json(client, trial.run_id, ITEM_SCORES)
        logged_g = metric_steps(client, trial, "eval/g_id")
        logged_f = metric_steps(client, trial, "eval/f_ood")
        assert sorted(logged_g) == [1, 2]
        for step in (1, 2):
            items = download_json(client, trial.run_id, trajectory_artifact(step))
            assert _shape(items) == _shape(final_items)  # the same items, benchmarks and token counts
            draws = bootstrap_tradeoff(
                objective_items(base, "nll"), {"t": [objective_items(items, "nll")]}, draws=100, seed=0
            )
            assert draws.point_g["t"] == pytest.approx(logged_g[step], abs=1e-6)
            assert draws.point_f["t"] == pytest.approx(logged_f[step], abs=1e-6)
        assert logged_g[1] != pytest.approx(logged_g[2], abs=1e-9)  # the steps are different checkpoints
        drift = metric_steps(client, trial, "eval/drift_mean")
        if trial.method == "rpsft":
            assert sorted(drift) == [1, 2] and all(v > 0 for v in drift.values())
        else:
            assert drift == {}  # sft has no regularizer

    points = trajectory_points(stored.trials, client)
    assert len(points) == 2 * 3 and len({p.trial_id for p in points}) == 6
    for trial in finished:
        mine = [p for p in points if p.run_id == trial.run_id]
        assert [p.params["step"] for p in mine] == [1, 2, 3]
        assert [p.trial_id for p in mine] == [f"{trial.trial_id}@1", f"{trial.trial_id}@2", trial.trial_id]
        assert (mine[-1].g_id, mine[-1].f_ood) == (trial.g_id, trial.f_ood)
        assert point_item_scores(client, mine[0]) == download_json(
            client, trial.run_id, trajectory_artifact(1)
        )
        assert point_item_scores(client, mine[-1]) == download_json(client, trial.run_id, ITEM_SCORES)
    assert len(group_points(points)) == 6
    # evaluation.trajectory: the sweep's end chose among every scored checkpoint, as `rpsft sweep select` does
    assert {p.trial_id for p in outcome.selection.ranking} == {p.trial_id for p in points}
    assert {p.trial_id for p in stored.points} == {p.trial_id for p in points}
    assert outcome.selection.best.trial_id == stored.selection().best.trial_id


@needs_paper_data
@pytest.mark.slow
@pytest.mark.integration
def test_export_retrains_a_trajectory_point(trajectory_sweep):
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from typer.testing import CliRunner

    from rpsft.cli import app

    outcome, root = trajectory_sweep
    stored = load_stored_sweep("traj", root / "sweeps")
    trial = next(t for t in stored.trials if t.finished and t.method == "rpsft")
    args = ["export", "traj", "--runs-dir", str(root / "sweeps"), "--trial"]
    result = CliRunner().invoke(app, [*args, f"{trial.trial_id}@2"])
    assert result.exit_code == 0, result.output
    exported = outcome.sweep_dir / "exports" / f"{trial.trial_id}@2"
    assert (exported / "model.safetensors").is_file()
    record = json.loads((exported / "rpsft_export.json").read_text())
    # retrained up to step 2 of the 3-step schedule: the G_id and F_ood the trial logged at step 2
    assert record["trial_id"] == f"{trial.trial_id}@2" and record["source"] == "retrained"
    assert record["matches"] and record["stored"]["g_id"] != pytest.approx(trial.g_id, abs=1e-9)
    result = CliRunner().invoke(app, [*args, f"{trial.trial_id}@7"])
    assert result.exit_code == 2 and "no intermediate evaluation at step 7" in result.output


def test_a_sweep_refuses_stop_at_step_in_its_train_section():
    from rpsft.sweeps.config.errors import SweepConfigError
    from rpsft.sweeps.config.sweep import parse_sweep_config

    with pytest.raises(SweepConfigError, match="train: stop_at_step would stop every trial early. Fix: remove it"):
        parse_sweep_config({"name": "s", "train": {"stop_at_step": 2}, "references": ["sft"]})
