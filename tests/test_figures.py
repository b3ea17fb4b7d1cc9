"""The report's figures hold the stored numbers: every trial where MLflow puts it, labelled by the knobs that vary,
intervals on every point, k as the share of each protected matrix's rank (computed here from the model's own
modules), SFT and full rank placed where they belong, and the operating point marked beside its trial."""

from __future__ import annotations

import pytest
import torch
from sweep_helpers import log_trial_run

BETA = 1.0
LOSSES = [2.0, 1.0, 1.6, 0.8, 1.2]


def _run(client, experiment_id, parent, trial_id, params, metrics, tags=None):
    """A trial run with a task loss per step, and a penalty per step whose scale depends on the method."""
    run_id = log_trial_run(client, experiment_id, parent, trial_id, params, metrics, tags=tags)
    scale = 25.0 if params["method"] == "l2-init" else 3.0  # penalties of different methods differ in scale
    for step, loss in enumerate(LOSSES, start=1):
        client.log_metric(run_id, "loss", loss, step=step)
        if step % 2 == 0 and params["method"] == "rpsft":  # intermediate evaluations every 2 steps
            client.log_metric(run_id, "eval/g_id", metrics["g_id"] * step / 4, step=step)
            client.log_metric(run_id, "eval/f_ood", metrics["f_ood"] * step / 4, step=step)
            client.log_metric(run_id, "eval/objective", metrics["objective"] * step / 4, step=step)
        if params["method"] != "sft":
            client.log_metric(run_id, "rpsft/penalty", scale * step, step=step)
    return run_id


# trial id -> (params, G_id, F_ood, half-width of the intervals, reference label)
TRIALS = {
    "sft": ({"method": "sft", "seed": 0}, 0.30, 0.20, 0.05, "sft"),
    "l2": ({"method": "l2-init", "lambda": 100.0, "seed": 0}, 0.10, 0.02, 0.03, "l2-init"),
    "k8": ({"method": "rpsft", "k": 8, "lambda": 100.0, "layers": "all", "seed": 0}, 0.25, 0.10, 0.04, ""),
    "k025": (
        {"method": "rpsft", "k": 0.25, "lambda": 100.0, "layers": "all", "seed": 0},
        0.20,
        0.05,
        0.02,
        "",
    ),
    "auto": (
        {"method": "rpsft", "k": "auto", "k_resolved": 0.5, "lambda": 100.0, "layers": "all", "seed": 0},
        0.20,
        0.03,
        0.02,
        "",
    ),
}


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    """A stored sweep of five trials over a tiny Llama (its config is all the figures read of the model)."""
    from rpsft.core.models import tiny_model
    from rpsft.dashboards.sweep_data import load_sweep_data
    from rpsft.sweeps.config.sweep import parse_sweep_config
    from rpsft.sweeps.store import tracking
    from rpsft.sweeps.store.sweep_store import SweepContext, SweepStore

    root = tmp_path_factory.mktemp("figures")
    model = tiny_model("llama", vocab_size=64, seed=0)
    model.save_pretrained(root / "model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, "figures")
    parent = tracking.create_parent_run(client, experiment_id, "figs", {})
    for trial_id, (params, g, f, half, reference) in TRIALS.items():
        phi = g - BETA * f
        metrics = {
            "g_id": g,
            "f_ood": f,
            "phi": phi,
            "objective": phi,
            "g_id_lo": g - half,
            "g_id_hi": g + half,
        }
        metrics.update({"f_ood_lo": f - half, "f_ood_hi": f + half, "phi_at_1_lo": phi - 2 * half})
        metrics["phi_at_1_hi"] = phi + 2 * half
        tags = {tracking.TAG_REFERENCE: reference} if reference else {}
        _run(client, experiment_id, parent, trial_id, params, metrics, tags)
    config = parse_sweep_config(
        {
            "name": "figs",
            "model": str(root / "model"),
            "references": ["sft", {"method": "l2-init", "lambda": 100}],
            "space": {"k": [8, 0.25, "auto"], "lambda": [100.0], "layers": ["all"]},
            "output_dir": str(root / "sweeps"),
            "objective": {"betas": [BETA]},
            "evaluation": {"split": {"report_fraction": 0}},
        }
    )
    store = SweepStore.of(config)
    context = SweepContext(
        config.model_dump(mode="json", by_alias=True), uri, experiment_id, parent, "", "", ""
    )
    store.write_state(config, context, "finished", "sqlite:///unused.db")
    return load_sweep_data("figs", root / "sweeps"), model


def test_each_evaluation_curve_ends_at_the_trials_final_scores(sweep_data):
    """The intermediate evaluations (steps 2 and 4) continue with the final scoring at the last step (5)."""
    data, _ = sweep_data
    trial = next(t for t in data.trials if t.trial_id == "k8")
    g, f = TRIALS["k8"][1], TRIALS["k8"][2]
    finals = {"eval/g_id": g, "eval/f_ood": f, "eval/objective": g - BETA * f}
    for key, final in finals.items():
        assert [step for step, _ in trial.history[key]] == [2, 4, len(LOSSES)], key
        assert trial.history[key][-1][1] == pytest.approx(final), key
        assert trial.history[key][1][1] == pytest.approx(final), key  # step 4 logged final x 4/4


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def test_the_tradeoff_plots_every_trial_labelled_and_marks_the_operating_point_beside_it(sweep_data):
    from rpsft.dashboards.figures import tradeoff_figure

    data, _ = sweep_data
    fig = tradeoff_figure(data)
    searched = _trace(fig, "searched trials")
    by_label = {text: (x, y) for text, x, y in zip(searched.text, searched.x, searched.y)}
    # labelled by the one knob that varies among the searched trials (k), not by lambda or layers
    assert by_label == {"k=8": (0.10, 0.25), "k=0.25": (0.05, 0.20), "k=auto": (0.03, 0.20)}
    assert "color" not in searched.marker or not isinstance(
        searched.marker.color, tuple
    )  # one lambda: one colour
    assert searched.marker.colorbar.title.text is None
    plus = list(searched.error_y.array)
    assert plus == pytest.approx([TRIALS[t][3] for t in ("k8", "k025", "auto")])
    for trial_id in ("sft", "l2"):
        ref = _trace(fig, f"[ref] {TRIALS[trial_id][4]}")
        assert (ref.x[0], ref.y[0]) == pytest.approx((TRIALS[trial_id][2], TRIALS[trial_id][1]))
        assert ref.text == (TRIALS[trial_id][4],)
    # the operating point (max Phi at beta 1: the auto trial, 0.17): a ring on its trial, the star beside it
    ring = next(t for t in fig.data if t.name.startswith("operating point, beta=1"))
    assert (ring.x[0], ring.y[0]) == pytest.approx((0.03, 0.20)) and ring.marker.symbol == "circle-open"
    (star,) = [a for a in fig.layout.annotations if "operating point" in a.text]
    assert (star.x, star.y) == pytest.approx((0.03, 0.20)) and star.showarrow and (star.ax, star.ay) != (0, 0)


def test_phi_of_k_places_k_as_the_share_of_each_matrix_rank_with_intervals(sweep_data):
    from rpsft.core.selection import select_matrices
    from rpsft.dashboards.figures import phi_vs_k_figure

    data, model = sweep_data
    ranks = [min(p.shape) for p in select_matrices(model, "all").values()]  # the model's own modules

    def share(k):
        per_matrix = [max(1, min(r, round(k * r))) if isinstance(k, float) else min(k, r) for r in ranks]
        return sum(n / r for n, r in zip(per_matrix, ranks)) / len(ranks)

    fig = phi_vs_k_figure(data)
    line = _trace(fig, "lambda=100")
    expected = {"k8": share(8), "k025": share(0.25), "auto": 0.5}  # auto: its resolved share
    assert len(set(expected.values())) == 3 and len(line.x) == 3
    for trial_id, x in expected.items():
        i = min(range(3), key=lambda j: abs(line.x[j] - x))
        _, g, f, half, _ = TRIALS[trial_id]
        assert line.x[i] == pytest.approx(x)
        assert line.y[i] == pytest.approx(g - BETA * f)
        assert line.error_y.array[i] == pytest.approx(2 * half) == line.error_y.arrayminus[i]
        assert (line.text[i] == "auto") == (trial_id == "auto")
    assert fig.layout.xaxis.type == "log"
    full = _trace(fig, "[ref] l2-init (full rank)")
    assert (
        full.x == (1.0,) and full.y[0] == pytest.approx(0.08) and full.error_y.array[0] == pytest.approx(0.06)
    )
    # SFT (k = 0) cannot sit on a log axis: a line at its Phi with its interval as a band
    (sft_line,) = [s for s in fig.layout.shapes if s.type == "line"]
    assert sft_line.y0 == sft_line.y1 == pytest.approx(0.10)
    (band,) = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (band.y0, band.y1) == pytest.approx((0.0, 0.20))
    assert any(a.text == "[ref] sft (k = 0)" for a in fig.layout.annotations)


def test_a_shared_rank_fraction_helper_agrees_with_torch_ranks():
    from rpsft.core.bases import mean_rank_fraction

    shapes = [(576, 576), (192, 576), (1536, 576)]
    ranks = [torch.linalg.matrix_rank(torch.randn(m, n, dtype=torch.float64)).item() for m, n in shapes]
    assert mean_rank_fraction(64, shapes) == pytest.approx(sum(min(64, r) / r for r in ranks) / 3)
    assert mean_rank_fraction(0, shapes) == 0.0 and mean_rank_fraction(10_000, shapes) == 1.0
    assert mean_rank_fraction(0.5, shapes) == pytest.approx(0.5)


def test_training_curves_have_labelled_axes_a_penalty_panel_per_method_and_a_moving_average(sweep_data):
    from rpsft.dashboards.curves import training_curves_figure

    data, _ = sweep_data
    fig = training_curves_figure(data, window=2)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["task loss (faint: per step)", "l2-init penalty", "rpsft penalty"]
    assert fig.layout.yaxis.title.text == "cross-entropy (nats/token)"
    assert fig.layout.yaxis2.title.text == fig.layout.yaxis3.title.text == "lambda x penalty"
    assert all(fig.layout[f"xaxis{i}"].title.text == "optimizer step" for i in ("", "2", "3"))
    l2 = [t for t in fig.data if t.xaxis == "x2"]
    rpsft = [t for t in fig.data if t.xaxis == "x3"]
    assert len(l2) == 1 and "l2-init" in l2[0].name and max(l2[0].y) == 25.0 * len(LOSSES)
    assert len(rpsft) == 3 and max(max(t.y) for t in rpsft) == 3.0 * len(LOSSES)
    sft = [t for t in fig.data if t.xaxis == "x" and t.name.startswith("sft")]
    raw, smooth = sorted(sft, key=lambda t: t.opacity or 1.0)
    assert list(raw.y) == LOSSES and raw.opacity == 0.3
    assert list(smooth.y) == pytest.approx(
        [2.0, 1.5, 1.3, 1.2, 1.0]
    )  # the mean of each step and the one before


def test_trajectories_follow_each_trial_through_its_evaluations(sweep_data):
    from rpsft.dashboards.curves import trajectory_figure
    from rpsft.dashboards.figures import report_figures
    from rpsft.dashboards.report import figure_title

    data, _ = sweep_data
    fig = trajectory_figure(data)
    paths = {t.name: t for t in fig.data if t.name != "base model"}
    assert len(paths) == 3  # the rpsft trials; the references logged no intermediate evaluation
    for trial_id in ("k8", "k025", "auto"):
        _, g, f, _, _ = TRIALS[trial_id]
        path = next(
            t
            for name, t in paths.items()
            if name == next(r.label for r in data.trials if r.trial_id == trial_id)
        )
        # steps 2 and 4 of the intermediate evaluations, then the final scoring at the last step (5)
        assert list(path.text) == ["2", "4", "5"]
        assert list(path.x) == pytest.approx([f / 2, f, f]) and list(path.y) == pytest.approx([g / 2, g, g])
    figures = report_figures(data)
    assert "trajectories" in figures and all(figure_title(name) for name in figures)  # each has its heading
