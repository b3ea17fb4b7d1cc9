"""Plotly figures of a sweep: the ID-vs-OOD trade-off, Phi against k, training curves, rotation."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from rpsft.dashboards.sweep_data import CURVES, ROTATION_LAYER_PREFIX, ROTATION_MEAN, SweepData, TrialRecord

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
REFERENCE_SYMBOLS = ["square", "diamond", "triangle-up", "triangle-down", "pentagon", "hexagon", "x"]
LAYER_SYMBOLS = ["circle", "circle-open", "square-open", "diamond-open", "triangle-up-open", "star-open"]


def _go():
    import plotly.graph_objects as go

    return go


def _layout(fig: Any, title: str, x: str, y: str, height: int = 560) -> Any:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        height=height,
        legend={"font": {"size": 11}, "orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
    )
    return fig


def _hover(trial: TrialRecord, beta: float) -> str:
    phi = trial.phi(beta)
    return (
        f"{trial.label}<br>trial {trial.trial_id}<br>G_id {trial.metrics['g_id']:+.4f}  "
        f"F_ood {trial.metrics['f_ood']:+.4f}<br>Phi(beta={beta:g}) {phi:+.4f}"
    )


def _error_bars(trials: list[TrialRecord], name: str) -> dict[str, Any] | None:
    """Asymmetric error bars from each trial's logged 95% interval (``<name>_lo`` / ``<name>_hi``)."""
    if not trials or not all(f"{name}_lo" in t.metrics and f"{name}_hi" in t.metrics for t in trials):
        return None
    return {
        "type": "data",
        "symmetric": False,
        "array": [t.metrics[f"{name}_hi"] - t.metrics[name] for t in trials],
        "arrayminus": [t.metrics[name] - t.metrics[f"{name}_lo"] for t in trials],
        "thickness": 1,
        "width": 3,
    }


def tradeoff_figure(data: SweepData) -> Any:
    """G_id (up) against F_ood (left): every finished trial, the Pareto front, the operating point per beta,
    and the line of equal Phi through the operating point at the sweep's beta."""
    go = _go()
    fig = go.Figure()
    beta = data.beta
    finished = [t for t in data.trials if t.finished]
    searched = [t for t in finished if not t.reference]
    if searched:
        lams = [t.lam or 0.0 for t in searched]
        fig.add_trace(
            go.Scatter(
                x=[t.metrics["f_ood"] for t in searched],
                y=[t.metrics["g_id"] for t in searched],
                mode="markers",
                name="searched trials",
                error_x=_error_bars(searched, "f_ood"),
                error_y=_error_bars(searched, "g_id"),
                text=[_hover(t, beta) for t in searched],
                hoverinfo="text",
                marker={
                    "size": 11,
                    "color": [math.log10(v) if v > 0 else 0.0 for v in lams],
                    "colorscale": "Viridis",
                    "colorbar": {"title": "log10 lambda"},
                    "line": {"width": 1, "color": "#333"},
                },
            )
        )
    for i, trial in enumerate(t for t in finished if t.reference):
        fig.add_trace(
            go.Scatter(
                x=[trial.metrics["f_ood"]],
                y=[trial.metrics["g_id"]],
                mode="markers",
                name=f"[ref] {trial.reference}",
                error_x=_error_bars([trial], "f_ood"),
                error_y=_error_bars([trial], "g_id"),
                text=[_hover(trial, beta)],
                hoverinfo="text",
                marker={"size": 13, "symbol": REFERENCE_SYMBOLS[i % len(REFERENCE_SYMBOLS)], "color": "#555"},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[0.0],
            y=[0.0],
            mode="markers",
            name="base model",
            marker={"size": 12, "symbol": "x", "color": "black"},
        )
    )
    if data.selections:
        # the figure plots every trial on all items; the choice may have been made on the selection items
        # (rpsft.evaluation.item_split): the front, the stars and the Phi line are drawn on all items too
        from rpsft.sweeps.analysis.selection import pareto_front

        analysis = data.selections[beta].analysis

        def plotted(point: Any) -> Any:
            return analysis.all_items_point(point) if analysis is not None else point

        everything = analysis.all_points if analysis is not None else data.selections[beta].front
        front = sorted(pareto_front(everything), key=lambda p: p.f_ood)
        fig.add_trace(
            go.Scatter(
                x=[p.f_ood for p in front],
                y=[p.g_id for p in front],
                mode="lines",
                name="Pareto front",
                line={"color": "#d62728", "dash": "dot", "shape": "hv"},
            )
        )
        chosen: dict[str, list[float]] = defaultdict(list)  # one star per chosen trial, naming its betas
        for b, selection in data.selections.items():
            chosen[selection.best.trial_id].append(b)  # a trajectory's steps of one run are distinct points
        for i, betas in enumerate(chosen.values()):
            chosen_on = data.selections[betas[0]].best.items
            best = plotted(data.selections[betas[0]].best)
            on = " (chosen on the selection items)" if chosen_on == "selection" else ""
            label = "beta=" + ", ".join(f"{b:g}" for b in betas)
            fig.add_trace(
                go.Scatter(
                    x=[best.f_ood],
                    y=[best.g_id],
                    mode="markers+text",
                    name=f"operating point, {label}{on}",
                    text=[label],
                    textposition="top center",
                    marker={"size": 20, "symbol": "star", "color": PALETTE[(i + 1) % len(PALETTE)]},
                )
            )
        best = plotted(data.selections[beta].best)
        xs = [t.metrics["f_ood"] for t in finished] + [0.0]
        lo, hi = min(xs), max(xs)
        pad = 0.1 * (hi - lo or 1.0)
        phi = best.phi(beta)
        fig.add_trace(
            go.Scatter(
                x=[lo - pad, hi + pad],
                y=[phi + beta * (lo - pad), phi + beta * (hi + pad)],
                mode="lines",
                name=f"Phi = {phi:+.4f} at beta={beta:g}",
                line={"color": "#999", "dash": "dash", "width": 1},
            )
        )
    return _layout(
        fig,
        f"ID gain vs OOD forgetting ({data.config.objective.metric}; bars: 95% paired bootstrap intervals)",
        "F_ood (forgetting, lower is better)",
        "G_id (in-domain gain, higher is better)",
    )


def _lambda_groups(trials: list[TrialRecord], max_lines: int = 6) -> dict[str, list[TrialRecord]]:
    """One group per lambda when there are few, else lambda bins of equal width in log10 (continuous spaces)."""
    values = sorted({t.lam for t in trials if t.lam})
    groups: dict[str, list[TrialRecord]] = defaultdict(list)
    if len(values) <= max_lines:
        for t in trials:
            groups[f"lambda={t.lam:.3g}"].append(t)
        return dict(groups)
    lo, hi = math.log10(values[0]), math.log10(values[-1])
    n_bins = 3
    width = (hi - lo) / n_bins
    for t in trials:
        i = min(n_bins - 1, int((math.log10(t.lam) - lo) / width)) if width else 0
        low, high = 10 ** (lo + i * width), 10 ** (lo + (i + 1) * width)
        groups[f"lambda in [{low:.3g}, {high:.3g}]"].append(t)
    return dict(sorted(groups.items(), key=lambda kv: min(t.lam for t in kv[1])))


def _k_category(value: float) -> str:
    return f"{value:g}"


def phi_vs_k_figure(data: SweepData) -> Any:
    """Phi(beta) against the rank k, one line per lambda (or lambda bin), one marker per layer subset; the
    references as horizontal lines. Integer ranks and rank fractions share a categorical axis (fractions first)."""
    go = _go()
    beta = data.beta
    fig = go.Figure()
    ranked = [t for t in data.trials if t.finished and not t.reference and t.k_value is not None and t.lam]
    order = sorted({t.k_value for t in ranked}, key=lambda k: (k >= 1, k))
    layer_names = sorted({t.params.get("layers", "all") for t in ranked})
    symbols = {name: LAYER_SYMBOLS[i % len(LAYER_SYMBOLS)] for i, name in enumerate(layer_names)}
    for i, (group, trials) in enumerate(_lambda_groups(ranked).items()):
        trials = sorted(trials, key=lambda t: order.index(t.k_value))
        fig.add_trace(
            go.Scatter(
                x=[_k_category(t.k_value) for t in trials],
                y=[t.phi(beta) for t in trials],
                mode="lines+markers",
                name=group,
                text=[f"{t.label}<br>Phi {t.phi(beta):+.4f}" for t in trials],
                hoverinfo="text",
                line={"color": PALETTE[i % len(PALETTE)]},
                marker={
                    "size": 11,
                    "symbol": [symbols[t.params.get("layers", "all")] for t in trials],
                    "color": PALETTE[i % len(PALETTE)],
                },
            )
        )
    for name, symbol in symbols.items():  # a legend entry per layer subset
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"layers={name}",
                marker={"symbol": symbol, "color": "#444"},
            )
        )
    for trial in data.trials:
        if trial.finished and trial.reference:
            fig.add_hline(
                y=trial.phi(beta),
                line={"dash": "dash", "color": "#888", "width": 1},
                annotation_text=f"[ref] {trial.reference}",
                annotation_position="top left",
            )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[_k_category(k) for k in order])
    return _layout(
        fig, f"Phi(k) at beta={beta:g}", "k (rank; a value < 1 is a share of each matrix's rank)", "Phi"
    )


def _trial_line(trial: TrialRecord, points: list[tuple[float, float]], color: str, **kwargs: Any) -> Any:
    """One trial's ``(x, y)`` series as a line, in the trial's legend group."""
    return _go().Scatter(
        x=[x for x, _ in points],
        y=[y for _, y in points],
        mode="lines+markers",
        name=trial.label,
        legendgroup=trial.run_id,
        line={"color": color},
        **kwargs,
    )


def training_curves_figure(data: SweepData) -> Any:
    """Per-step task loss, penalty, protected drift, and the trade-off at the intermediate evaluations of every
    trial (four panels a row)."""
    from plotly.subplots import make_subplots

    keys = [k for k in CURVES if any(t.history.get(k) for t in data.trials)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[CURVES[k] for k in keys])
    for i, trial in enumerate(data.trials):
        color = PALETTE[i % len(PALETTE)]
        shown = False  # one legend entry per trial
        for index, key in enumerate(keys):
            series = trial.history.get(key)
            if not series:
                continue
            fig.add_trace(
                _trial_line(trial, series, color, showlegend=not shown, marker={"size": 4}),
                row=index // cols + 1,
                col=index % cols + 1,
            )
            shown = True
    fig.update_xaxes(title_text="step")
    return _layout(fig, "Training curves", "", "", height=420 * rows + 100)


def rotation_figure(data: SweepData) -> Any:
    """Per-layer rotation of each trial (left) and the mean rotation against forgetting (right)."""
    go = _go()
    from plotly.subplots import make_subplots

    rotated = [t for t in data.trials if ROTATION_MEAN in t.metrics]
    if not rotated:
        return None
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["rotation per layer (mean principal angle, degrees)", "mean rotation vs F_ood"],
    )
    for i, trial in enumerate(rotated):
        layers = sorted(
            (int(index), value)
            for key, value in trial.metrics.items()
            if key.startswith(ROTATION_LAYER_PREFIX)
            and (index := key[len(ROTATION_LAYER_PREFIX) :].split("_")[0]).isdigit()
        )
        fig.add_trace(_trial_line(trial, layers, PALETTE[i % len(PALETTE)]), row=1, col=1)
    with_f = [t for t in rotated if "f_ood" in t.metrics]
    fig.add_trace(
        go.Scatter(
            x=[t.metrics[ROTATION_MEAN] for t in with_f],
            y=[t.metrics["f_ood"] for t in with_f],
            mode="markers",
            name="trials",
            text=[t.label for t in with_f],
            hoverinfo="text",
            marker={"size": 11, "color": [PALETTE[rotated.index(t) % len(PALETTE)] for t in with_f]},
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="layer", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="mean rotation (degrees)", row=1, col=2)
    fig.update_yaxes(title_text="degrees", row=1, col=1)
    fig.update_yaxes(title_text="F_ood", row=1, col=2)
    return _layout(fig, "Rotation of the top-K left singular subspaces", "", "", height=520)


def rl_figure(data: SweepData) -> Any:
    """The trade-off before and after RL: each RL run's initial checkpoint and its RL checkpoint (G_id against
    F_ood), joined by an arrow; the base model is the origin."""
    from rpsft.dashboards.tables import rl_rows

    rows = [r for r in rl_rows(data) if None not in (r["id_init"], r["ood_init"], r["id_rl"], r["ood_rl"])]
    if not rows:
        return None
    go = _go()
    fig = go.Figure()
    for i, row in enumerate(rows):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=[row["ood_init"], row["ood_rl"]],
                y=[row["id_init"], row["id_rl"]],
                mode="lines+markers",
                name=f"{row['init']}: init -> RL",
                line={"color": color},
                marker={"size": [10, 14], "symbol": ["circle-open", "circle"], "color": color},
                hovertext=[f"{row['init']} (init)", f"{row['init']} + RL (step {row['chosen_step']})"],
                hoverinfo="text+x+y",
            )
        )
        fig.add_annotation(
            x=row["ood_rl"],
            y=row["id_rl"],
            ax=row["ood_init"],
            ay=row["id_init"],
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=3,
            arrowcolor=color,
            text="",
        )
    fig.add_trace(
        go.Scatter(
            x=[0],
            y=[0],
            mode="markers",
            name="base model",
            marker={"symbol": "x", "size": 10, "color": "#444"},
        )
    )
    return _layout(
        fig,
        "Trade-off before and after RL (open: initial checkpoint)",
        "F_ood (forgetting, lower is better)",
        "G_id (gain, higher is better)",
    )


def report_figures(data: SweepData, importances: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """``{file stem: figure}`` of every figure that has data, in report order; ``importances`` (from
    :func:`rpsft.dashboards.importance.param_importances`) adds their bar chart."""
    from rpsft.dashboards import importance

    figures = {
        "tradeoff": tradeoff_figure(data) if data.selections else None,
        "phi_vs_k": phi_vs_k_figure(data) if data.selections else None,
        "importance": importance.importance_figure(data, importances) if importances else None,
        "parallel": importance.parallel_figure(data),
        **{f"contour_{layers}": fig for layers, fig in importance.contour_figures(data).items()},
        "training_curves": training_curves_figure(data),
        "rotation": rotation_figure(data),
        "rl_tradeoff": rl_figure(data),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}
