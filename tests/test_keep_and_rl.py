"""From operating point to model to RL, end to end on real services: a sweep keeps its operating point's
weights (logged to MLflow and registered as ``rpsft-<sweep>``, on SQLite and on a tracking server), deletes
the rest, a kept checkpoint loads back and reproduces the trial's stored metrics, an unkept trial is exported
by retraining and matches its stored metrics, ``rpsft rl`` runs DAPO from both as child runs of the sweep,
and the report shows the init -> RL table."""

from __future__ import annotations

import pytest
from conftest import PAPER_DATA
from services import MlflowServer
from sweep_helpers import run_quietly, sweep_dict

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("fresh_ray")]
needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")

RL_YAML = """rl:
  data: champ:train:8
  max_steps: 2
  learning_rate: 1.0e-4
  prompts_per_step: 2
  num_generations: 2
  micro_batch: 4
  max_completion_length: 8
  overlong_buffer: 2
  eval_every: 1
  kl_probe: 2
"""


def _keep_sweep(name, tiny_dir, tmp_path, keep, storage=None):
    raw = sweep_dict(
        name,
        tiny_dir,
        tmp_path,
        references=["sft", "l2-init"],
        search={"num_trials": 1, "seed": 0},
        keep=keep,
    )
    raw["train"] = {**raw["train"], "mixed_precision": "bf16"}  # trained under autocast, scored without it
    if storage:
        raw["storage"] = storage
    return raw


def _versions(client, name):
    return sorted(client.search_model_versions(f"name='rpsft-{name}'"), key=lambda v: int(v.version))


def _rescore(stored, model_dir):
    """G_id and F_ood of the checkpoint in ``model_dir`` by the sweep's own scorer (an independent load)."""
    import torch
    from rpsft.core.models import load_model
    from rpsft.sweeps.trial.scoring import TrialScorer

    scorer = TrialScorer(stored.config, stored.context.base_key, stored.context.cache_dir)
    model, tokenizer = load_model(str(model_dir))
    with torch.no_grad():
        metrics, _, _ = scorer.final_scores(model.eval(), tokenizer)
    return scorer.primary(metrics)


@needs_paper_data
# bf16 autocast on purpose, also on CPUs that only emulate it: the warning that says so is expected here
@pytest.mark.filterwarnings("default:mixed_precision. bf16 on a CPU:RuntimeWarning")
def test_keep_register_export_rl_and_report(tiny_dir, tmp_path):
    from rpsft.dashboards.report import build_report
    from rpsft.dashboards.sweep_data import load_sweep_data
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.retention import TAG_KEPT
    from rpsft.sweeps.stages.checkpoints import export_trial
    from rpsft.sweeps.store import tracking
    from typer.testing import CliRunner

    from rpsft.cli import app

    outcome = run_quietly(_keep_sweep("keep", tiny_dir, tmp_path, {"operating_point": True}))
    root = tmp_path / "sweeps"
    client = tracking.client_for(outcome.tracking_uri)
    best = outcome.selection.best
    # the choice's G_id / F_ood are on the selection items (evaluation.split); the trial's own are on all items
    best_trial = next(t for t in outcome.trials if t.run_id == best.run_id)
    # the operating point is registered, tagged with its trial, knobs and Phi; no trial keeps weights on disk
    (version,) = _versions(client, "keep")
    assert version.tags["rpsft.trial_id"] == best.trial_id and version.tags[TAG_KEPT] == "operating_point"
    assert float(version.tags["rpsft.phi"]) == pytest.approx(best_trial.phi(1.0), abs=1e-5)
    assert version.tags["rpsft.method"] == best.params["method"]
    assert not list((outcome.sweep_dir / "trials").glob("*/model"))

    stored = load_stored_sweep("keep", root)
    # the kept checkpoint loads back and reproduces the trial's stored metrics
    kept = export_trial(stored, "op", tmp_path / "op", echo=lambda *a: None)
    assert kept.source == "kept"
    rescored = _rescore(stored, kept.path)
    assert rescored["g_id"] == pytest.approx(best_trial.g_id, abs=1e-6)
    assert rescored["f_ood"] == pytest.approx(best_trial.f_ood, abs=1e-6)

    from rpsft.sweeps.stages.checkpoints import find_trial_run

    best_rpsft = next(p for p in stored.selection().ranking if p.params.get("method") == "rpsft")
    assert find_trial_run(stored, "best:rpsft").run_id == best_rpsft.run_id
    assert find_trial_run(stored, "sft").params["method"] == "sft"
    # an unkept trial is retrained from its stored config and seed, into <sweep>/exports/<trial id>
    other = next(p for p in stored.points if p.run_id != best.run_id)
    result = CliRunner().invoke(app, ["export", "keep", "--trial", other.trial_id, "--runs-dir", str(root)])
    assert result.exit_code == 0, result.output
    exported = outcome.sweep_dir / "exports" / other.trial_id
    assert (exported / "model.safetensors").is_file() and '"source": "retrained"' in result.output
    assert '"matches": true' in result.output

    # DAPO from the operating point and the exported trial, through the CLI
    (tmp_path / "rl.yaml").write_text(RL_YAML)
    args = ["rl", "--from", "keep", "--trials", f"op,{other.trial_id}", "--config", str(tmp_path / "rl.yaml")]
    result = CliRunner().invoke(app, [*args, "--runs-dir", str(root)])
    assert result.exit_code == 0, result.output
    rl_runs = tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id, role="rl")
    assert {r.data.tags["rpsft.init_trial"] for r in rl_runs} == {best.trial_id, other.trial_id}
    for run in rl_runs:
        assert run.info.status == "FINISHED"
        for key in ("rl/reward", "rl/kl_to_init", "rl/response_length", "rl/clip_fraction"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
        g_id = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "rl/g_id")}
        assert sorted(g_id) == [0, 1, 2]
        chosen = int(run.data.metrics["rl/chosen_step"])
        assert chosen in (1, 2) and g_id[chosen] == max(g_id[1], g_id[2])
        assert run.data.metrics["rl/chosen/g_id"] == pytest.approx(g_id[chosen])
        assert run.data.metrics["rl/init/g_id"] == pytest.approx(g_id[0])
    assert run.data.metrics["rl/kl_to_init"] >= 0
    # the RL runs are not trials: the sweep's trials and its choice are unchanged
    again = load_stored_sweep("keep", root)
    assert len(again.trials) == 3 and again.selection().best.run_id == best.run_id
    # a second `rpsft rl` with the same settings repeats nothing
    result = CliRunner().invoke(app, [*args, "--runs-dir", str(root)])
    assert result.exit_code == 0 and result.output.count("not repeated") == 2, result.output
    assert len(tracking.child_runs(client, outcome.experiment_id, outcome.parent_run_id, role="rl")) == 2

    # resuming the finished sweep registers nothing twice and leaves the RL runs out of its trials
    from rpsft.sweeps.runner import resume_sweep

    resumed = resume_sweep("keep", root=root, echo=lambda *a: None)
    assert len(_versions(client, "keep")) == 1 and len(resumed.trials) == 3
    # bad input names the field and the fix, and exits 2
    result = CliRunner().invoke(app, ["export", "keep", "--trial", "nosuch", "--runs-dir", str(root)])
    assert result.exit_code == 2 and "no finished trial 'nosuch'" in result.output and "Fix:" in result.output

    # the report's init -> RL table holds the runs' numbers
    data = load_sweep_data("keep", root, histories=False)
    assert len(data.rl) == 2
    from rpsft.dashboards.tables import rl_rows

    by_run = {r.info.run_id: r for r in rl_runs}
    for row in rl_rows(data):
        metrics = by_run[row["run_id"]].data.metrics
        assert row["id_init"] == metrics["rl/init/g_id"] and row["id_rl"] == metrics["rl/chosen/g_id"]
        assert row["ood_delta"] == pytest.approx(metrics["rl/chosen/f_ood"] - metrics["rl/init/f_ood"])
    files = build_report(data, tmp_path / "report", png=False)
    page = files.html.read_text()
    assert '<table id="rl">' in page and 'data-figure="rl_tradeoff"' in page


@needs_paper_data
def test_kept_checkpoints_are_registered_on_a_tracking_server(tiny_dir, tmp_path):
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep
    from rpsft.sweeps.stages.checkpoints import export_trial
    from rpsft.sweeps.store import tracking

    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        raw = _keep_sweep("keep-server", tiny_dir, tmp_path, {"top": 2}, storage={"mlflow": server.url})
        outcome = run_quietly(raw)
        client = tracking.client_for(server.url)
        ranking = outcome.selection.ranking
        versions = _versions(client, "keep-server")
        assert [v.tags["rpsft.trial_id"] for v in versions] == [p.trial_id for p in ranking[:2]]
        assert [v.tags["rpsft.kept"] for v in versions] == ["top-1", "top-2"]
        assert not list((outcome.sweep_dir / "trials").glob("*/model"))
        stored = load_stored_sweep("keep-server", tmp_path / "sweeps")
        kept = export_trial(stored, ranking[1].trial_id, tmp_path / "second", echo=lambda *a: None)
        assert kept.source == "kept" and (kept.path / "model.safetensors").is_file()
    finally:
        server.stop()
