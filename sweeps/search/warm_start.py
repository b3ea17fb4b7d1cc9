"""Warm starts: ``search.warm_start: [sweep, ...]`` hands the finished searched trials of earlier sweeps on the
same model and data to the new sweep's Optuna study before its first trial, so the sampler starts informed.

A carried trial exists only in the Optuna study (``study.add_trial``), with the user attribute
``rpsft.carried_over_from`` naming its sweep: it is never a Tune trial, never an MLflow run of the new sweep,
and never counted among its trials. Its value is recomputed for the new sweep's objective (Phi at the new
beta, or the (G_id, F_ood) pair for a Pareto sweep) from its stored G_id and F_ood, so both sweeps must score
the same metric. A trial whose knobs lie outside the new search space is left out, and said so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store.sweep_store import TrialRecord

CARRIED_ATTR = "rpsft.carried_over_from"
TRIAL_ATTR = "rpsft.trial_id"


@dataclass
class WarmStart:
    carried: dict[str, int] = field(default_factory=dict)  # earlier sweep -> trials added
    skipped: dict[str, int] = field(default_factory=dict)  # earlier sweep -> trials outside the space


def _param(value: str | None, distribution: Any) -> Any:
    """The stored MLflow string ``value`` as a value of ``distribution``, or None when it lies outside."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if value is None:
        return None
    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:
            if str(choice) == value:
                return choice
            try:
                if float(choice) == float(value):
                    return choice
            except (TypeError, ValueError):
                continue
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if isinstance(distribution, IntDistribution):
        if not number.is_integer():
            return None
        number = int(number)
    return number if distribution._contains(distribution.to_internal_repr(number)) else None


def _check_compatible(config: SweepConfig, earlier: SweepConfig, name: str) -> None:
    for field_name in ("model", "data"):
        mine, theirs = getattr(config, field_name), getattr(earlier, field_name)
        if mine != theirs:
            raise SweepConfigError(
                f"search.warm_start: sweep {name!r} trained {field_name} {theirs!r}, this one {mine!r}; its "
                f"trials say nothing about this sweep. Fix: warm-start from sweeps on the same model and data"
            )
    if earlier.objective.metric != config.objective.metric:
        raise SweepConfigError(
            f"search.warm_start: sweep {name!r} scored objective.metric {earlier.objective.metric!r}, this one "
            f"{config.objective.metric!r}. Fix: the same objective.metric, or drop {name!r} from warm_start"
        )


def check_warm_start(config: SweepConfig) -> list[Any]:
    """The stored earlier sweeps, after checking that each exists and matches (before any training)."""
    from rpsft.sweeps.analysis.stored_sweep import load_stored_sweep

    stored = []
    for name in config.search.warm_start:
        if name == config.name:
            raise SweepConfigError(
                f"search.warm_start: {name!r} is this sweep. Fix: the names of earlier, finished sweeps"
            )
        try:
            earlier = load_stored_sweep(name, config.output_dir)
        except SweepConfigError as exc:
            raise SweepConfigError(f"search.warm_start: {exc}") from None
        _check_compatible(config, earlier.config, name)
        stored.append(earlier)
    return stored


def _values(config: SweepConfig, trial: TrialRecord) -> float | list[float] | None:
    g_id, f_ood = trial.g_id, trial.f_ood
    if g_id is None or f_ood is None or not (math.isfinite(g_id) and math.isfinite(f_ood)):
        return None
    if config.objective.mode == "pareto":
        return [g_id, f_ood]
    return trial.phi(config.objective.beta)


def carry_over(config: SweepConfig, storage: Any, dists: dict[str, Any], stored: list[Any]) -> WarmStart:
    """Add the finished searched trials of ``stored`` sweeps to this sweep's Optuna study (created here, with
    the directions the Tune searcher uses); ``dists`` are the space's (``rpsft.sweeps.search.space.search_distributions``)."""
    import optuna

    if not stored:
        return WarmStart()
    kwargs: dict[str, Any] = (
        {"directions": ["maximize", "minimize"]}
        if config.objective.mode == "pareto"
        else {"direction": "maximize"}
    )
    study = optuna.create_study(study_name=config.name, storage=storage, load_if_exists=True, **kwargs)
    already = {t.user_attrs.get(TRIAL_ATTR) for t in study.get_trials(deepcopy=False)}
    result = WarmStart()
    for earlier in stored:
        name = earlier.config.name
        result.carried[name] = result.skipped[name] = 0
        for trial in earlier.trials:
            if trial.status != "FINISHED" or trial.reference or trial.trial_id in already:
                continue
            values = _values(config, trial)
            if values is None:
                continue
            # a trial from before the penalty_mode knob applied its penalty as `loss`; a space without the knob
            # (only `loss`) takes no decoupled trial
            known = {"penalty_mode": "loss", **trial.params}
            params = {knob: _param(known.get(knob), d) for knob, d in dists.items()}
            outside = "penalty_mode" not in dists and known["penalty_mode"] != "loss"
            if outside or any(value is None for value in params.values()):
                result.skipped[name] += 1
                continue
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=dists,
                    **({"values": values} if isinstance(values, list) else {"value": values}),
                    user_attrs={CARRIED_ATTR: name, TRIAL_ATTR: trial.trial_id},
                )
            )
            result.carried[name] += 1
    return result
