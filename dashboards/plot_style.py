"""The shared look of rpsft's Plotly figures: palette, layout, axis titles, hover text and interval bars."""

from __future__ import annotations

from typing import Any

from rpsft.dashboards.sweep_data import TrialRecord

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
REFERENCE_SYMBOLS = ["square", "diamond", "triangle-up", "triangle-down", "pentagon", "hexagon", "x"]
LAYER_SYMBOLS = ["circle", "circle-open", "square-open", "diamond-open", "triangle-up-open", "star-open"]


def plotly_go():
    import plotly.graph_objects as go

    return go


def styled(fig: Any, title: str, x: str, y: str, height: int = 560) -> Any:
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


def hover_text(trial: TrialRecord, beta: float) -> str:
    phi = trial.phi(beta)
    return (
        f"{trial.label}<br>trial {trial.trial_id}<br>G_id {trial.metrics['g_id']:+.4f}  "
        f"F_ood {trial.metrics['f_ood']:+.4f}<br>Phi(beta={beta:g}) {phi:+.4f}"
    )


def interval_bars(points: list[tuple[float, float, float]], width: int = 3) -> dict[str, Any]:
    """Asymmetric error bars from ``(value, lo, hi)`` per point."""
    return {
        "type": "data",
        "symmetric": False,
        "array": [hi - value for value, _, hi in points],
        "arrayminus": [value - lo for value, lo, _ in points],
        "thickness": 1,
        "width": width,
    }


def metric_bars(trials: list[TrialRecord], name: str) -> dict[str, Any] | None:
    """Error bars from each trial's logged 95% interval of ``name`` (``<name>_lo`` / ``<name>_hi``)."""
    if not trials or not all(f"{name}_lo" in t.metrics and f"{name}_hi" in t.metrics for t in trials):
        return None
    return interval_bars(
        [(t.metrics[name], t.metrics[f"{name}_lo"], t.metrics[f"{name}_hi"]) for t in trials]
    )


F_OOD_AXIS = "F_ood (forgetting, lower is better)"
G_ID_AXIS = "G_id (in-domain gain, higher is better)"


def base_model_marker() -> Any:
    """The base model at the origin of the (F_ood, G_id) plane."""
    return plotly_go().Scatter(
        x=[0.0],
        y=[0.0],
        mode="markers",
        name="base model",
        marker={"size": 12, "symbol": "x", "color": "black"},
    )
