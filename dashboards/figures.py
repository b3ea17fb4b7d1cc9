"""Plotly figures of a sweep's outcome: the ID-vs-OOD trade-off and Phi against k; the report's figure list."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from rpsft.dashboards.curves import rl_figure, rotation_figure, training_curves_figure, trajectory_figure
from rpsft.dashboards.plot_style import (
    F_OOD_AXIS,
    G_ID_AXIS,
    LAYER_SYMBOLS,
    PALETTE,
    REFERENCE_SYMBOLS,
    base_model_marker,
    hover_text,
    interval_bars,
    metric_bars,
    plotly_go,
    styled,
)
from rpsft.dashboards.sweep_data import SweepData, TrialRecord


def varying_knobs(trials: list[TrialRecord]) -> list[str]:
    """The knobs (method, k, lambda, layers, ...) whose logged value differs between ``trials``."""
    knobs = sorted({knob for t in trials for knob in t.knobs})
    return [knob for knob in knobs if len({t.knobs.get(knob) for t in trials}) > 1]


def knob_label(trial: TrialRecord, knobs: list[str]) -> str:
    """``k=8 lambda=100``: the trial's values of ``knobs`` (``k=auto`` for an energy-rule k)."""

    def short(value: str) -> str:
        try:
            return f"{float(value):.3g}"
        except ValueError:
            return value

    return (
        " ".join(f"{knob}={short(trial.knobs[knob])}" for knob in knobs if knob in trial.knobs) or trial.label
    )


def tradeoff_figure(data: SweepData) -> Any:
    """G_id (up) against F_ood (left): every finished trial, the Pareto front, the operating point per beta,
    and the line of equal Phi through the operating point at the sweep's beta."""
    go = plotly_go()
    fig = go.Figure()
    beta = data.beta
    finished = [t for t in data.trials if t.finished]
    searched = [t for t in finished if not t.reference]
    if searched:
        lams = sorted({t.lam for t in searched if t.lam})
        marker: dict[str, Any] = {"size": 11, "color": PALETTE[0], "line": {"width": 1, "color": "#333"}}
        if len(lams) > 1:  # colour only where lambda varies
            marker.update(
                color=[math.log10(t.lam) if t.lam else 0.0 for t in searched],
                colorscale="Viridis",
                colorbar={"title": "log10 lambda"},
            )
        varying = varying_knobs(searched)
        fig.add_trace(
            go.Scatter(
                x=[t.metrics["f_ood"] for t in searched],
                y=[t.metrics["g_id"] for t in searched],
                mode="markers+text",
                name="searched trials",
                error_x=metric_bars(searched, "f_ood"),
                error_y=metric_bars(searched, "g_id"),
                text=[knob_label(t, varying) for t in searched],
                textposition="bottom right",
                textfont={"size": 11},
                hovertext=[hover_text(t, beta) for t in searched],
                hoverinfo="text",
                marker=marker,
            )
        )
    for i, trial in enumerate(t for t in finished if t.reference):
        fig.add_trace(
            go.Scatter(
                x=[trial.metrics["f_ood"]],
                y=[trial.metrics["g_id"]],
                mode="markers+text",
                name=f"[ref] {trial.reference}",
                error_x=metric_bars([trial], "f_ood"),
                error_y=metric_bars([trial], "g_id"),
                text=[trial.reference],
                textposition="bottom right",
                textfont={"size": 11},
                hovertext=[hover_text(trial, beta)],
                hoverinfo="text",
                marker={"size": 13, "symbol": REFERENCE_SYMBOLS[i % len(REFERENCE_SYMBOLS)], "color": "#555"},
            )
        )
    fig.add_trace(base_model_marker())
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
            color = PALETTE[(i + 1) % len(PALETTE)]
            fig.add_trace(  # a ring around the point it marks, so the point stays visible
                go.Scatter(
                    x=[best.f_ood],
                    y=[best.g_id],
                    mode="markers",
                    name=f"operating point, {label}{on}",
                    marker={"size": 26, "symbol": "circle-open", "color": color, "line": {"width": 3}},
                )
            )
            fig.add_annotation(  # the star beside the point, with an arrow to it
                x=best.f_ood,
                y=best.g_id,
                text=f"\u2605 operating point, {label}",
                showarrow=True,
                arrowhead=2,
                arrowcolor=color,
                ax=60,
                ay=-40 - 24 * i,
                font={"color": color, "size": 12},
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
    return styled(
        fig,
        f"ID gain vs OOD forgetting ({data.config.objective.metric}; bars: 95% paired bootstrap intervals)",
        F_OOD_AXIS,
        G_ID_AXIS,
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


RANK_SHARE_TITLE = (
    "k as a share of each protected matrix's rank (mean over the matrices; log axis; 1 = full rank)"
)


def share_of_rank_axis(fig: Any) -> None:
    """A log x axis of rank shares, ticked at 1-2-5 steps as percentages."""
    ticks = [m * 10.0**e for e in range(-4, 1) for m in (1, 2, 5) if m * 10.0**e <= 1.0]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:.2%}".replace(".00%", "%") for t in ticks])


def phi_interval(trial: TrialRecord, beta: float) -> tuple[float, float] | None:
    """The trial's logged 95% interval of Phi at ``beta`` (``phi@<beta>_lo`` / ``_hi``), if it has one."""
    from rpsft.sweeps.store.tracking import metric_name

    name = metric_name(f"phi@{beta:g}")  # as MLflow stores it
    lo, hi = trial.metrics.get(f"{name}_lo"), trial.metrics.get(f"{name}_hi")
    return None if lo is None or hi is None else (lo, hi)


def rank_fraction_of(data: SweepData) -> Callable[[TrialRecord], float | None]:
    """``trial -> the share of each protected matrix's rank its k protects`` (mean over the matrices of its
    layer subset; :func:`rpsft.core.k_spec.mean_rank_fraction`), read from the model's config alone. L2-init is
    1 (full rank), SFT 0; ``None`` where the model's config cannot be read or the trial has no k."""
    from rpsft.core.bases import mean_rank_fraction
    from rpsft.core.k_spec import parse_k_spec
    from rpsft.core.memory.dims import model_dims_for, protected_shapes

    try:
        dims = model_dims_for(data.config.model, cache_dir=data.config.cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001  # the model moved or needs a hub: the figure falls back to k itself
        dims = None

    def fraction(trial: TrialRecord) -> float | None:
        if trial.method == "l2-init":
            return 1.0
        if trial.method == "sft":
            return 0.0
        text = trial.params.get("k_resolved") or trial.params.get("k")
        try:
            k = parse_k_spec(text)
        except ValueError:
            return None
        if isinstance(k, float) or dims is None:
            return float(k) if isinstance(k, float) else None
        label = trial.params.get("layers", "all")
        try:
            spec = data.config.space.layers_for(label)
        except KeyError:
            spec = label  # a reference's preset
        return mean_rank_fraction(k, protected_shapes(dims, spec).values())

    return fraction


def phi_vs_k_figure(data: SweepData) -> Any:
    """Phi(beta) with its 95% interval against the share of each matrix's rank that k protects, on a log axis:
    one line per lambda (or lambda bin), one marker per layer subset, ``k: auto`` marked. Full rank (L2-init)
    sits at 1; SFT (k = 0) is a horizontal band, as are the other references."""
    go = plotly_go()
    beta = data.beta
    fig = go.Figure()
    fraction = rank_fraction_of(data)
    ranked = [
        t for t in data.trials if t.finished and not t.reference and t.lam and (fraction(t) or 0.0) > 0.0
    ]
    layer_names = sorted({t.params.get("layers", "all") for t in ranked})
    symbols = {name: LAYER_SYMBOLS[i % len(LAYER_SYMBOLS)] for i, name in enumerate(layer_names)}

    def bars(trials: list[TrialRecord]) -> dict[str, Any] | None:
        intervals = [phi_interval(t, beta) for t in trials]
        if any(i is None for i in intervals):
            return None
        return interval_bars([(t.phi(beta), lo, hi) for t, (lo, hi) in zip(trials, intervals)], width=4)

    for i, (group, trials) in enumerate(_lambda_groups(ranked).items()):
        trials = sorted(trials, key=fraction)
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=[fraction(t) for t in trials],
                y=[t.phi(beta) for t in trials],
                mode="lines+markers+text",
                name=group,
                error_y=bars(trials),
                text=["auto" if str(t.params.get("k", "")).startswith("auto") else "" for t in trials],
                textposition="top center",
                hovertext=[f"{t.label}<br>Phi {t.phi(beta):+.4f}" for t in trials],
                hoverinfo="text",
                line={"color": color},
                marker={
                    "size": 11,
                    "symbol": [symbols[t.params.get("layers", "all")] for t in trials],
                    "color": color,
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
        if not (trial.finished and trial.reference):
            continue
        interval = phi_interval(trial, beta)
        if trial.method == "l2-init":  # full rank: a point at 1
            fig.add_trace(
                go.Scatter(
                    x=[1.0],
                    y=[trial.phi(beta)],
                    mode="markers+text",
                    name=f"[ref] {trial.reference} (full rank)",
                    error_y=bars([trial]),
                    text=[f"{trial.reference} (full rank)"],
                    textposition="top left",
                    marker={"size": 13, "symbol": "diamond", "color": "#555"},
                )
            )
            continue
        name = f"[ref] {trial.reference}" + (" (k = 0)" if trial.method == "sft" else "")
        if interval is not None:
            fig.add_hrect(y0=interval[0], y1=interval[1], fillcolor="#888", opacity=0.12, line_width=0)
        fig.add_hline(
            y=trial.phi(beta),
            line={"dash": "dash", "color": "#888", "width": 1},
            annotation_text=name,
            annotation_position="top left",
        )
    share_of_rank_axis(fig)
    return styled(
        fig,
        f"Phi(k) at beta={beta:g} (bars and bands: 95% intervals)",
        RANK_SHARE_TITLE,
        f"Phi = G_id - {beta:g} F_ood",
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
        "trajectories": trajectory_figure(data),
        "rotation": rotation_figure(data),
        "rl_tradeoff": rl_figure(data),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}
