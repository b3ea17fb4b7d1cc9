"""What a sweep teaches: how much each searched knob (k, lambda, layers, period) decides Phi, G_id and F_ood.

The searched trials (not the references) are put into an in-memory Optuna study, one per target, and Optuna
does the rest: its importance evaluators (PED-ANOVA by default, fANOVA as an option) and its plotly figures
(importances, parallel coordinates, Phi contours over (k, lambda) for each layer subset). A knob that took one
value in the sweep has no importance and is left out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

from rpsft.dashboards.sweep_data import SweepData, TrialRecord

KNOBS = ("k", "lambda", "layers", "period")
Evaluator = Literal["ped-anova", "fanova"]
MIN_TRIALS = 4  # fewer searched trials than this teach nothing about importance


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def searched_trials(data: SweepData) -> list[TrialRecord]:
    """The finished trials the search proposed (references are fixed points, not samples of the space)."""
    return [t for t in data.trials if t.finished and not t.reference]


def _distributions(trials: list[TrialRecord]) -> dict[str, Any]:
    """One Optuna distribution per knob that varied: a float range (log where it spans a decade) for numbers,
    categorical otherwise."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {}
    for knob in KNOBS:
        values = [t.params.get(knob) for t in trials]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        numbers = [_number(v) for v in values]
        if knob in ("k", "lambda") and all(n is not None for n in numbers):
            low, high = min(numbers), max(numbers)
            out[knob] = FloatDistribution(low, high, log=low > 0 and high / low >= 10)
        else:
            out[knob] = CategoricalDistribution(sorted(set(values)))
    return out


def _param_value(knob: str, value: str, distribution: Any) -> Any:
    from optuna.distributions import FloatDistribution

    return float(value) if isinstance(distribution, FloatDistribution) else value


TARGETS = ("phi", "g_id", "f_ood")


def targets(data: SweepData) -> dict[str, tuple[Callable[[TrialRecord], float | None], str, str]]:
    """``{key: (value of a trial, direction, display name)}``: Phi at the sweep's beta, G_id and F_ood."""
    beta = data.config.objective.beta
    return {
        "phi": (lambda t: t.phi(beta), "maximize", f"Phi (beta={beta:g})"),
        "g_id": (lambda t: t.metrics.get("g_id"), "maximize", "G_id"),
        "f_ood": (lambda t: t.metrics.get("f_ood"), "minimize", "F_ood"),
    }


def study_of(
    trials: list[TrialRecord],
    value: Callable[[TrialRecord], float | None],
    direction: str,
    distributions: dict[str, Any] | None = None,
) -> Any:
    """An in-memory Optuna study holding ``trials`` with ``value`` as their objective (``distributions``:
    those of :func:`_distributions`, when the caller has them already)."""
    import optuna

    distributions = _distributions(trials) if distributions is None else distributions
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" in the report
    try:
        study = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for trial in trials:
        objective = value(trial)
        if objective is None or not math.isfinite(objective):
            continue
        params = {knob: _param_value(knob, trial.params[knob], d) for knob, d in distributions.items()}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=objective,
                user_attrs={"label": trial.label, "trial_id": trial.trial_id},
            )
        )
    return study


def evaluator_for(name: Evaluator, n_trials: int) -> Any:
    """PED-ANOVA with a top quantile that holds at least 2 trials of a small sweep, or fANOVA."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "fanova":
        return FanovaImportanceEvaluator(seed=0)
    if name != "ped-anova":
        raise ValueError(f"importance evaluator: {name!r} is not known. Fix: ped-anova or fanova")
    return PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 2.0 / max(n_trials, 1))))


def param_importances(data: SweepData, evaluator: Evaluator = "ped-anova") -> dict[str, dict[str, float]]:
    """``{target key: {knob: importance}}`` (keys of :data:`TARGETS`; each target's importances sum to 1,
    largest first); empty when the
    sweep has fewer than :data:`MIN_TRIALS` searched trials or no knob varied."""
    import optuna

    trials = searched_trials(data)
    distributions = _distributions(trials)
    if len(trials) < MIN_TRIALS or not distributions:
        return {}
    out = {}
    for name, (value, direction, _) in targets(data).items():
        study = study_of(trials, value, direction, distributions)
        if len(study.trials) < MIN_TRIALS:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna warns that importance is experimental / has few trials
            scores = optuna.importance.get_param_importances(
                study, evaluator=evaluator_for(evaluator, len(study.trials)), normalize=True
            )
        out[name] = {knob: float(score) for knob, score in scores.items()}
    return out


def knobs_of(importances: dict[str, dict[str, float]]) -> list[str]:
    """The knobs that have an importance for some target, in :data:`KNOBS` order."""
    return sorted({k for scores in importances.values() for k in scores}, key=KNOBS.index)


def importance_figure(data: SweepData, importances: dict[str, dict[str, float]]) -> Any:
    """Grouped bars: one group per knob, one bar per target."""
    import plotly.graph_objects as go

    names = {key: display for key, (_, _, display) in targets(data).items()}
    knobs = knobs_of(importances)
    fig = go.Figure()
    for target, scores in importances.items():
        fig.add_trace(go.Bar(name=names[target], x=knobs, y=[scores.get(k, 0.0) for k in knobs]))
    fig.update_layout(
        title="Parameter importance (share of each target's variation explained)",
        barmode="group",
        template="plotly_white",
        yaxis_title="importance",
        xaxis_title="knob",
        height=460,
    )
    return fig


def parallel_figure(data: SweepData) -> Any | None:
    """Optuna's parallel-coordinates plot of the searched trials, coloured by Phi (from :data:`MIN_TRIALS`)."""
    import optuna

    trials = searched_trials(data)
    value, direction, name = targets(data)["phi"]
    distributions = _distributions(trials)
    if len(trials) < MIN_TRIALS or not distributions:
        return None
    study = study_of(trials, value, direction, distributions)
    fig = optuna.visualization.plot_parallel_coordinate(study, target_name=name)
    fig.update_layout(template="plotly_white", height=480)
    return fig


def contour_figures(data: SweepData) -> dict[str, Any]:
    """``{layers: figure}``: Optuna's Phi contour over (k, lambda) for each layer subset with at least 3
    searched trials in which both k and lambda varied."""
    import optuna

    value, direction, name = targets(data)["phi"]
    by_layers: dict[str, list[TrialRecord]] = {}
    for trial in searched_trials(data):
        by_layers.setdefault(trial.params.get("layers", "all"), []).append(trial)
    out = {}
    for layers, trials in sorted(by_layers.items()):
        distributions = _distributions(trials)
        if len(trials) < 3 or not {"k", "lambda"} <= set(distributions):
            continue
        study = study_of(trials, value, direction, distributions)
        fig = optuna.visualization.plot_contour(study, params=["k", "lambda"], target_name=name)
        fig.update_layout(
            title=f"{name} over (k, lambda), layers {layers}", template="plotly_white", height=520
        )
        out[layers] = fig
    return out


def importance_metrics(importances: dict[str, dict[str, float]]) -> dict[str, float]:
    """The importances as MLflow metric names: ``importance/<target>/<knob>``."""
    return {
        f"importance/{target}/{knob}": v
        for target, scores in importances.items()
        for knob, v in scores.items()
    }
