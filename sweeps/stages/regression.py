"""Regression runs: a fixed small sweep whose metrics are compared with a stored baseline under tolerances.

A regression config (YAML) names the sweep (a path to a sweep YAML, relative to the regression config, or the
sweep config inline) and declares which metrics are compared and how far each may move::

    sweep: smoke.yaml
    operating_point: true          # the chosen trial must stay the same
    tolerances:                    # first matching rule wins; metrics no rule matches are not compared
      - {metric: g_id, direction: higher, abs: 0.01}
      - {metric: "nll/*", direction: lower, abs: 0.01, rel: 0.001}

Trials are matched by their knobs (``[ref] sft``, ``rpsft k=8 lambda=1 layers=attn period=1``), so searched
trials only match when the search is seeded; references always do. ``direction: higher`` (lower) fails only
when the value falls (rises) by more than ``max(abs, rel * |baseline|)``; ``both`` fails either way.
"""

from __future__ import annotations

import fnmatch
import json
import math
import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rpsft.core.config import format_validation_error
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig, parse_sweep_config, read_config_with_sweep
from rpsft.sweeps.store.sweep_store import TrialRecord, trial_label

BASELINE_VERSION = 1


class Tolerance(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    metric: str = Field(description="metric name or glob, e.g. g_id, phi_at_0.5, nll/ood/*")
    direction: Literal["higher", "lower", "both"] = "both"
    abs: float = Field(0.0, ge=0)
    rel: float = Field(0.0, ge=0)

    def allowed(self, baseline: float) -> float:
        return max(self.abs, self.rel * abs(baseline))


class RegressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sweep: dict[str, Any] = Field(description="the sweep config (inline, or loaded from the path given)")
    tolerances: list[Tolerance]
    operating_point: bool = Field(True, description="fail when the chosen trial changes")

    @field_validator("tolerances")
    @classmethod
    def _some(cls, value: list[Tolerance]) -> list[Tolerance]:
        if not value:
            raise ValueError(
                "no metric is compared. Fix: add at least one rule, e.g. {metric: g_id, abs: 0.01}"
            )
        return value

    def rule_for(self, metric: str) -> Tolerance | None:
        return next((rule for rule in self.tolerances if fnmatch.fnmatchcase(metric, rule.metric)), None)

    def sweep_config(self, **overrides: Any) -> SweepConfig:
        return parse_sweep_config({**self.sweep, **overrides}, "regression sweep")


def load_regression_config(path: str | Path) -> RegressionConfig:
    path = Path(path)
    raw = read_config_with_sweep(path, "--config", "regression YAML")
    try:
        config = RegressionConfig.model_validate(raw)
    except ValidationError as exc:
        raise SweepConfigError(format_validation_error(exc, str(path), "regression configuration")) from None
    config.sweep_config()  # the sweep itself must be valid before anything runs
    return config


# ----------------------------------------------------------------------------------------------- measure


def measured_metrics(trials: list[TrialRecord], config: RegressionConfig) -> dict[str, dict[str, float]]:
    """``{trial label: {metric: value}}`` of the finished trials, for the metrics some tolerance rule covers."""
    out: dict[str, dict[str, float]] = {}
    for trial in trials:
        if trial.status != "FINISHED":
            continue
        label = trial.label  # references log their name as the `reference` param
        if label in out:
            raise SweepConfigError(
                f"sweep: two finished trials share the knobs {label!r}, so they cannot be matched to a baseline. "
                "Fix: a regression sweep with distinct references (and a seeded search)"
            )
        out[label] = {
            name: float(value)
            for name, value in sorted(trial.metrics.items())
            if config.rule_for(name) is not None and math.isfinite(float(value))
        }
    return out


def run_regression_sweep(
    config: RegressionConfig, work_dir: str | Path, echo=print
) -> tuple[dict[str, dict[str, float]], str | None]:
    """Run the regression sweep in ``work_dir``; ``(metrics per trial label, operating point label)``."""
    from rpsft.sweeps.runner import run_sweep

    sweep = config.sweep_config(output_dir=str(Path(work_dir) / "sweeps"))
    outcome = run_sweep(sweep, echo=echo, progress=False)
    chosen = trial_label(outcome.selection.best.params) if outcome.selection is not None else None
    return measured_metrics(outcome.trials, config), chosen


# ----------------------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    trial: str
    metric: str
    baseline: float | None
    current: float | None
    allowed: float | None
    status: Literal["ok", "improved", "REGRESSED", "MISSING", "new"]

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "MISSING")


def compare_metrics(
    baseline: dict[str, dict[str, float]], current: dict[str, dict[str, float]], config: RegressionConfig
) -> list[Comparison]:
    rows: list[Comparison] = []
    for trial in sorted(set(baseline) | set(current)):
        base_metrics, cur_metrics = baseline.get(trial, {}), current.get(trial, {})
        for metric in sorted(set(base_metrics) | set(cur_metrics)):
            rule = config.rule_for(metric)
            if rule is None:
                continue
            b, c = base_metrics.get(metric), cur_metrics.get(metric)
            if b is None:
                rows.append(Comparison(trial, metric, None, c, None, "new"))
                continue
            allowed = rule.allowed(b)
            if c is None:
                rows.append(Comparison(trial, metric, b, None, allowed, "MISSING"))
                continue
            delta = c - b
            worse = {"higher": -delta, "lower": delta, "both": abs(delta)}[rule.direction]
            better = {"higher": delta, "lower": -delta, "both": 0.0}[rule.direction]
            status = "REGRESSED" if worse > allowed else "improved" if better > allowed else "ok"
            rows.append(Comparison(trial, metric, b, c, allowed, status))
    return rows


def diff_table(rows: list[Comparison], baseline_point: str | None, current_point: str | None) -> str:
    def num(value: float | None, spec: str = ".6f") -> str:
        return "-" if value is None else format(value, spec)

    width = max([len(r.trial) for r in rows] + [5])
    header = f"{'trial':{width}s}  {'metric':22s} {'baseline':>12s} {'current':>12s} {'delta':>12s} {'allowed':>10s}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.trial:{width}s}  {r.metric[:22]:22s} {num(r.baseline):>12s} {num(r.current):>12s} "
            f"{num(r.delta, '+.6f'):>12s} {num(r.allowed, '.2g'):>10s}  {r.status}"
        )
    mark = "ok" if baseline_point == current_point else "CHANGED"
    lines.append(f"\noperating point: baseline {baseline_point!r}, current {current_point!r}  {mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- baseline


def read_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(
            f"--baseline: {path} does not exist. Fix: create it deliberately with --update-baseline"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SweepConfigError(
            f"--baseline: {path} is not valid JSON ({exc}). Fix: --update-baseline"
        ) from None
    if data.get("version") != BASELINE_VERSION or not isinstance(data.get("metrics"), dict):
        raise SweepConfigError(
            f"--baseline: {path} is not an rpsft baseline (version {BASELINE_VERSION}). Fix: --update-baseline"
        )
    return data


def write_baseline(
    path: str | Path, metrics: dict[str, dict[str, float]], operating_point: str | None
) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": BASELINE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "operating_point": operating_point,
        "metrics": metrics,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass
class RegressionOutcome:
    rows: list[Comparison]
    baseline_point: str | None
    current_point: str | None
    check_point: bool
    updated: bool = False

    @property
    def point_changed(self) -> bool:
        return self.check_point and self.baseline_point != self.current_point

    @property
    def failed(self) -> bool:
        return not self.updated and (any(r.failed for r in self.rows) or self.point_changed)


def regress(
    config_path: str | Path,
    baseline_path: str | Path,
    *,
    update_baseline: bool = False,
    work_dir: str | Path | None = None,
    echo=print,
) -> RegressionOutcome:
    """Run the regression sweep and compare it with the baseline (or rewrite the baseline)."""
    config = load_regression_config(config_path)
    baseline = None if update_baseline else read_baseline(baseline_path)  # fail before training
    with tempfile.TemporaryDirectory(prefix="rpsft-regress-") as tmp:
        current, point = run_regression_sweep(config, work_dir or tmp, echo=echo)
    if not current:
        raise SweepConfigError("sweep: no trial finished, nothing to compare. Fix: check the sweep's trials")
    if update_baseline:
        write_baseline(baseline_path, current, point)
        rows = compare_metrics(current, current, config)
        return RegressionOutcome(rows, point, point, config.operating_point, updated=True)
    rows = compare_metrics(baseline["metrics"], current, config)
    return RegressionOutcome(rows, baseline.get("operating_point"), point, config.operating_point)
