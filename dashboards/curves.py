"""Figures of a sweep over training: per-step curves, trajectories in the trade-off plane, rotation, RL."""

from __future__ import annotations

from typing import Any

from rpsft.dashboards.plot_style import (
    F_OOD_AXIS,
    G_ID_AXIS,
    PALETTE,
    base_model_marker,
    plotly_go,
    styled,
)
from rpsft.dashboards.sweep_data import CURVES, ROTATION_LAYER_PREFIX, ROTATION_MEAN, SweepData, TrialRecord


def trial_line(trial: TrialRecord, points: list[tuple[float, float]], color: str, **kwargs: Any) -> Any:
    """One trial's ``(x, y)`` series as a line, in the trial's legend group."""
    return plotly_go().Scatter(
        x=[x for x, _ in points],
        y=[y for _, y in points],
        name=trial.label,
        legendgroup=trial.run_id,
        line={"color": color},
        **{"mode": "lines+markers", **kwargs},
    )


def moving_average(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """The trailing mean of the last ``window`` values at each step (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(points):
        recent = [v for _, v in points[max(0, i - window + 1) : i + 1]]
        out.append((step, sum(recent) / len(recent)))
    return out


def curve_panels(data: SweepData) -> list[tuple[str, str, str, list[TrialRecord]]]:
    """``(metric, panel title, y label, trials)`` of each training-curve panel that has data: one penalty panel
    per method (an L2-init penalty is far larger than a rank-k one)."""
    panels = []
    for key, (title, y_label) in CURVES.items():
        trials = [t for t in data.trials if t.history.get(key)]
        if not trials:
            continue
        if key != "rpsft/penalty":
            panels.append((key, title, y_label, trials))
            continue
        for method in sorted({t.method for t in trials}):
            panels.append((key, f"{method} penalty", y_label, [t for t in trials if t.method == method]))
    return panels


def training_curves_figure(data: SweepData, window: int | None = None) -> Any:
    """Per-step task loss (with its moving average over ``window`` steps, by default about an epoch or a tenth
    of the run), each method's penalty, the protected drift, and the trade-off at the intermediate evaluations
    of every trial (up to four panels a row), each panel with its own labelled y axis."""
    from plotly.subplots import make_subplots

    panels = curve_panels(data)
    if not panels:
        return None
    if window is None:
        steps = max((len(t.history.get("loss", [])) for t in data.trials), default=0)
        train = data.config.train  # the sweep's shared TrainConfig fields, as given
        epochs = train.get("epochs") if train.get("max_steps", 0) is None else None
        window = max(2, steps // epochs if epochs else steps // 10)  # an epoch, or a tenth of the run
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[title for _, title, _, _ in panels], horizontal_spacing=0.09
    )
    colors = {t.run_id: PALETTE[i % len(PALETTE)] for i, t in enumerate(data.trials)}
    shown: set[str] = set()  # one legend entry per trial
    for index, (key, _, _, trials) in enumerate(panels):
        row, col = index // cols + 1, index % cols + 1
        for trial in trials:
            series = trial.history[key]
            color = colors[trial.run_id]
            legend = trial.run_id not in shown
            shown.add(trial.run_id)
            if key == "loss":
                fig.add_trace(
                    trial_line(trial, series, color, showlegend=False, opacity=0.3, mode="lines"),
                    row=row,
                    col=col,
                )
                fig.add_trace(
                    trial_line(trial, moving_average(series, window), color, showlegend=legend, mode="lines"),
                    row=row,
                    col=col,
                )
            else:
                fig.add_trace(
                    trial_line(trial, series, color, showlegend=legend, marker={"size": 4}), row=row, col=col
                )
    # the layout first: its (empty) figure-wide axis titles would replace the first panel's
    styled(fig, f"Training curves (moving average over {window} steps)", "", "", height=420 * rows + 100)
    fig.update_layout(margin={"l": 80, "t": 90})
    for index, (_, _, y_label, _) in enumerate(panels):
        fig.update_yaxes(title_text=y_label, row=index // cols + 1, col=index % cols + 1)
    fig.update_xaxes(title_text="optimizer step")
    return fig


def trajectory_figure(data: SweepData) -> Any:
    """Each trial's path in the (F_ood, G_id) plane through its intermediate evaluations (``evaluation.every``),
    each point labelled by its optimizer step; the base model at the origin. ``None`` without intermediate
    evaluations."""
    go = plotly_go()
    fig = go.Figure()
    for i, trial in enumerate(data.trials):
        g, f = dict(trial.history.get("eval/g_id", [])), dict(trial.history.get("eval/f_ood", []))
        steps = sorted(set(g) & set(f))
        if not steps:
            continue
        fig.add_trace(
            trial_line(
                trial,
                [(f[s], g[s]) for s in steps],
                PALETTE[i % len(PALETTE)],
                mode="lines+markers+text",
                text=[f"{s:g}" for s in steps],
                textposition="top center",
                marker={"size": 8},
            )
        )
    if not fig.data:
        return None
    fig.add_trace(base_model_marker())
    return styled(
        fig,
        "Trajectories: each trial through its evaluations (labels: optimizer step)",
        F_OOD_AXIS,
        G_ID_AXIS,
    )


def rotation_figure(data: SweepData) -> Any:
    """Per-layer rotation of each trial (left) and the mean rotation against forgetting (right)."""
    go = plotly_go()
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
        fig.add_trace(trial_line(trial, layers, PALETTE[i % len(PALETTE)]), row=1, col=1)
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
    return styled(fig, "Rotation of the top-K left singular subspaces", "", "", height=520)


def rl_figure(data: SweepData) -> Any:
    """The trade-off before and after RL: each RL run's initial checkpoint and its RL checkpoint (G_id against
    F_ood), joined by an arrow; the base model is the origin."""
    from rpsft.dashboards.tables import rl_rows

    rows = [r for r in rl_rows(data) if None not in (r["id_init"], r["ood_init"], r["id_rl"], r["ood_rl"])]
    if not rows:
        return None
    go = plotly_go()
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
    return styled(
        fig,
        "Trade-off before and after RL (open: initial checkpoint)",
        "F_ood (forgetting, lower is better)",
        "G_id (gain, higher is better)",
    )
