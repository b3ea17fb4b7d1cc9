"""A reproduction study: one fixed sweep (methods, a k grid, a lambda grid, layer presets, seeds) whose stored
results are checked against the paper's claims (:mod:`rpsft.sweeps.analysis.claims`), each with numbers,
intervals and a verdict; forgetting is reported under two views (:mod:`rpsft.sweeps.analysis.configurations`).

    name: study-smollm2
    results_dir: docs/results/smollm2
    claims: {betas: [0.25, 0.5, 1, 2, 4], k_slice: {lambda: 10, layers: all}, drift_slice: {k: 64, layers: all}}
    sweep: {...}                # a sweep config, inline or a path relative to this file
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from rpsft.core.config import TrainConfig
from rpsft.sweeps.analysis.claims import ClaimResult, Claims, evaluate_claims
from rpsft.sweeps.analysis.configurations import (
    Configuration,
    attach_views,
    configurations,
    forgetting_views,
    stored_view_intervals,
)
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig, parse_sweep_config, read_config_with_sweep


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    results_dir: str
    claims: Claims
    sweep: dict[str, Any]

    def sweep_config(self) -> SweepConfig:
        return parse_sweep_config(self.sweep, f"study {self.name}: sweep")


def load_study_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    raw = read_config_with_sweep(path, "study", "study YAML")
    raw.setdefault("name", path.stem)
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        from rpsft.core.config import format_validation_error

        raise SweepConfigError(format_validation_error(exc, str(path), "study configuration")) from None
    study.sweep_config()  # the sweep is validated before anything runs
    return study


@dataclass
class StudyResult:
    name: str
    sweep: str
    model: str
    data: str
    beta: float
    claims: list[ClaimResult]
    configurations: list[Configuration]
    base_metrics: dict[str, float]
    setup: dict[str, Any]
    forgetting: dict[str, Any] = field(default_factory=dict)  # forgetting_views(): F_ood under nll and mc

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sweep": self.sweep,
            "model": self.model,
            "data": self.data,
            "beta": self.beta,
            "claims": [c.to_dict() for c in self.claims],
            "configurations": [c.to_dict() for c in self.configurations],
            "base_metrics": self.base_metrics,
            "setup": self.setup,
            "forgetting_views": self.forgetting,
        }


def study_result(study: StudyConfig, stored: Any, base_metrics: dict[str, float], setup: dict[str, Any]) -> StudyResult:
    configs, intervals = configurations(stored)
    views = stored_view_intervals(stored)
    attach_views(configs, views)
    beta0 = stored.config.objective.beta
    return StudyResult(
        name=study.name,
        sweep=stored.config.name,
        model=stored.config.model,
        data=stored.config.data,
        beta=beta0,
        claims=evaluate_claims(configs, intervals, study.claims, beta0, analysis=stored.analysis),
        configurations=configs,
        base_metrics=base_metrics,
        setup=setup,
        forgetting=forgetting_views(configs, views),
    )


def write_result(result: StudyResult, results_dir: str | Path) -> Path:
    path = Path(results_dir) / "claims.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1, sort_keys=False) + "\n")
    return path


def run_study(
    study: StudyConfig, *, address: str | None = None, run: bool = True, echo=print
) -> tuple[StudyResult, Any]:
    """Run the study's sweep (or resume it, or reuse it when finished) and evaluate the claims; with
    ``run=False`` only the claims, on the trials stored so far."""
    from rpsft.sweeps.analysis.stored_sweep import StoredSweep
    from rpsft.sweeps.runner import absolutize, resume_sweep, run_sweep
    from rpsft.sweeps.store.sweep_store import SweepStore

    config = absolutize(study.sweep_config())
    store = SweepStore.of(config)
    if not run:
        if not store.exists():
            raise SweepConfigError(f"study: sweep {config.name!r} has not run yet. Fix: rpsft study without --no-run")
    elif not store.exists():
        run_sweep(config, address=address, echo=echo)
    elif store.status() != "finished":  # running, incomplete
        echo(f"[rpsft] study {study.name}: resuming sweep {config.name}")
        resume_sweep(config.name, root=config.output_dir, address=address, echo=echo)
    else:
        echo(f"[rpsft] study {study.name}: sweep {config.name} is finished; evaluating the claims")
    stored = StoredSweep.read(store)
    base = stored.base_metrics()
    ev = config.evaluation
    setup = {
        "training examples": config.train.get("data_limit") or "all",
        "steps": config.max_steps or f"{config.train.get('epochs', 1):g} epochs",
        "learning rate": config.train.get("learning_rate"),
        "optimizer": config.train.get("optimizer") or TrainConfig.model_fields["optimizer"].default,
        "batch size": config.train.get("batch_size"),
        "max length": config.train.get("max_length"),
        "objective": f"{config.objective.metric} (beta {config.objective.beta:g})",
        "ID items per benchmark": ev.loss.n_id,
        "OOD items per benchmark": (
            ev.loss.n_ood if ev.mc is None else f"{ev.loss.n_ood} (nll), {ev.mc.n} (mc)"
        ),
        "forgetting views": "nll, mc" if ev.mc is not None else "nll (no evaluation.mc)",
        "trials finished": f"{sum(1 for trial in stored.trials if trial.finished)} of "
        f"{config.num_reference_trials + config.search.num_trials}",
        "training time (s, all trials)": round(
            sum(trial.metrics.get("train_seconds", 0.0) for trial in stored.trials)
        ),
    }
    return study_result(study, stored, base, setup), stored
