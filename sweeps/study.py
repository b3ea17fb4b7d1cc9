"""A reproduction study: one fixed sweep (methods, a k grid, a lambda grid, layer presets, seeds) whose stored
results are checked against the paper's claims, each with numbers, intervals and a verdict.

    name: study-smollm2
    results_dir: docs/results/smollm2
    claims: {betas: [0.25, 0.5, 1, 2, 4], k_slice: {lambda: 10, layers: all}, drift_slice: {k: 64, layers: all}}
    sweep: {...}                # a sweep config, inline or a path relative to this file

The claims (see ``docs/reproduction.md``):

* **C1** SFT raises ID and lowers OOD: the intervals of SFT's ``G_id`` and ``F_ood`` are both above 0.
* **C2** RPSFT at its chosen (k, lambda) has a higher Phi than SFT, L2-init and LoRA over the beta range, and
  Pareto-dominates SFT: every paired ``Phi_rpsft - Phi_other`` interval is above 0.
* **C3** At equal ID gain RPSFT rotates the top singular subspaces less than SFT (App. F.3).
* **C4** Phi(k) has an interior optimum on the k slice (k = 0 is SFT, full k is L2-init at the same lambda).
* **C5** The protected drift shrinks as O(1/lambda): slope of log drift against log lambda near -1.
* **C6** The energy rule's k lands near the best k of the grid: its Phi is not distinguishable from the best.

A verdict is ``reproduced``, ``not reproduced`` (the data contradict the claim with intervals that exclude the
claimed direction) or ``inconclusive`` (the intervals allow both). Nothing here tunes an evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evaluation.intervals import Interval
from sweeps.config import SweepConfig, SweepConfigError, parse_sweep_config, read_config_with_sweep
from sweeps.selection import TrialPoint
from sweeps.store import TrialRecord
from sweeps.summary import configuration_label

Verdict = Literal["reproduced", "not reproduced", "inconclusive"]
ROTATION = "rotation/mean_deg"
EQUAL_GAIN = 0.25  # C3: an ID gain within 25% of SFT's counts as equal


class KSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    lam: float = Field(alias="lambda")
    layers: str = "all"


class DriftSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    k: int | float
    layers: str = "all"


class Claims(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    betas: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    k_slice: KSlice
    drift_slice: DriftSlice


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
        from rpsft_core.config import format_validation_error

        raise SweepConfigError(format_validation_error(exc, str(path), "study configuration")) from None
    study.sweep_config()  # the sweep is validated before anything runs
    return study


# ------------------------------------------------------------------------------------------ configurations


@dataclass
class Configuration:
    """One configuration of the study (its seeds pooled), with the numbers the claims read."""

    point: TrialPoint
    intervals: dict[str, Interval]
    metrics: dict[str, float]  # mean over seeds: drift_mean, rotation/mean_deg, train_loss, ...

    @property
    def method(self) -> str:
        return str(self.point.params.get("method", ""))

    @property
    def label(self) -> str:
        return configuration_label(self.point)

    def param(self, name: str) -> str | None:
        value = self.point.params.get(name)
        return None if value in (None, "", "None") else str(value)

    @property
    def lam(self) -> float | None:
        value = self.param("lambda")
        return None if value is None else float(value)

    @property
    def k_value(self) -> float | None:
        """k as trained: the resolved fraction for ``auto``, else the logged number."""
        for name in ("k_resolved", "k"):
            value = self.param(name)
            if value is None:
                continue
            try:
                return float(value)
            except ValueError:
                continue
        return None

    @property
    def auto(self) -> bool:
        return str(self.param("k") or "").startswith("auto")

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "trial_id": self.point.trial_id,
            "n_seeds": self.point.n_seeds,
            "params": self.point.params,
            "g_id": self.point.g_id,
            "f_ood": self.point.f_ood,
            "intervals": {name: i.to_dict() for name, i in self.intervals.items()},
            "metrics": self.metrics,
        }


@dataclass
class ClaimResult:
    id: str
    claim: str
    verdict: Verdict
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_metrics(trials: dict[str, TrialRecord], point: TrialPoint) -> dict[str, float]:
    keys = ("drift_mean", "drift_max", ROTATION, "train_loss", "train_seconds")
    out = {}
    for key in keys:
        members = [trials[r].metrics for r in (point.run_ids or (point.run_id,))]
        values = [metrics[key] for metrics in members if key in metrics]
        if values:
            out[key] = sum(values) / len(values)
    return out


def configurations(stored: Any) -> tuple[list[Configuration], Any]:
    """The study's configurations from a stored sweep (:class:`sweeps.store.StoredSweep`)."""
    analysis = stored.analysis
    if analysis.intervals is None:
        raise SweepConfigError(
            f"study: sweep {stored.config.name!r} has no per-item scores to build intervals from. "
            "Fix: objective.metric nll, kl or mc, and rerun the sweep"
        )
    trials = {trial.run_id: trial for trial in stored.trials}
    out = []
    for point in analysis.all_points:  # the study reads every configuration on all items (no choice is reported)
        summary = analysis.intervals.of(point)
        if summary is None:
            continue
        out.append(Configuration(point, summary, _mean_metrics(trials, point)))
    return out, analysis.intervals


# ------------------------------------------------------------------------------------------ claims


def _best(configs: list[Configuration], beta: float) -> Configuration | None:
    return max(configs, key=lambda c: c.point.phi(beta), default=None)


def _reference(configs: list[Configuration], method: str) -> Configuration | None:
    return next((c for c in configs if c.method == method and c.param("reference")), None)


def _sign(interval: Interval | None) -> int:
    """+1 / -1 when the interval excludes 0 on that side, 0 when it holds 0 (or is missing)."""
    if interval is None or not math.isfinite(interval.low):
        return 0
    return 1 if interval.low > 0 else -1 if interval.high < 0 else 0


def claim_c1(configs: list[Configuration]) -> ClaimResult:
    text = "SFT raises ID and lowers OOD (G_id > 0 and F_ood > 0)"
    sft = _reference(configs, "sft")
    if sft is None:
        return ClaimResult("C1", text, "inconclusive", "the study has no sft reference")
    g, f = sft.intervals["g_id"], sft.intervals["f_ood"]
    signs = (_sign(g), _sign(f))
    verdict: Verdict = (
        "reproduced" if signs == (1, 1) else "not reproduced" if -1 in signs else "inconclusive"
    )
    return ClaimResult(
        "C1", text, verdict, f"SFT: G_id {g.text()}, F_ood {f.text()}", {"g_id": g.to_dict(), "f_ood": f.to_dict()}
    )


def claim_c2(configs: list[Configuration], intervals: Any, betas: list[float], beta0: float) -> ClaimResult:
    text = "RPSFT at its chosen (k, lambda) has a higher Phi than SFT, L2-init and LoRA over a range of beta, and Pareto-dominates SFT"
    rpsft = [c for c in configs if c.method == "rpsft"]
    best = _best(rpsft, beta0)
    if best is None:
        return ClaimResult("C2", text, "inconclusive", "the study has no rpsft configuration")
    numbers: dict[str, Any] = {"chosen": best.label, "differences": {}}
    signs = []
    lines = [f"chosen RPSFT (max Phi at beta={beta0:g}): {best.label}"]
    for method in ("sft", "l2-init", "lora"):
        other = _reference(configs, method)
        if other is None:
            continue
        per_beta = {}
        for beta in betas:
            diff = intervals.difference(best.point, other.point, beta)
            per_beta[f"{beta:g}"] = diff.to_dict()
            signs.append(_sign(diff))
        numbers["differences"][method] = per_beta
        wins = [b for b in betas if _sign(intervals.difference(best.point, other.point, b)) == 1]
        losses = [b for b in betas if _sign(intervals.difference(best.point, other.point, b)) == -1]
        d1 = intervals.difference(best.point, other.point, beta0)
        lines.append(
            f"vs {method}: Phi difference at beta={beta0:g} {d1.text()}; above 0 at beta in "
            f"{[f'{b:g}' for b in wins] or 'none'}, below 0 at {[f'{b:g}' for b in losses] or 'none'}"
        )
    sft = _reference(configs, "sft")
    dominates = None
    if sft is not None:
        dg = intervals.draws.g_difference(intervals.key_of(best.point), intervals.key_of(sft.point))
        df = intervals.draws.f_difference(intervals.key_of(best.point), intervals.key_of(sft.point))
        dominates = best.point.g_id >= sft.point.g_id and best.point.f_ood <= sft.point.f_ood
        numbers["pareto_vs_sft"] = {"g_difference": dg.to_dict(), "f_difference": df.to_dict(), "dominates": dominates}
        lines.append(
            f"Pareto vs SFT: G_id difference {dg.text()}, F_ood difference {df.text()} "
            f"({'dominates' if dominates else 'does not dominate'} on the point estimates)"
        )
        if _sign(dg) == -1 and _sign(df) == 1:
            signs.append(-1)
    if not signs:
        return ClaimResult("C2", text, "inconclusive", "no sft, l2-init or lora reference", numbers)
    if all(s == 1 for s in signs) and dominates:
        verdict: Verdict = "reproduced"
    elif any(s == -1 for s in signs):
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return ClaimResult("C2", text, verdict, "; ".join(lines), numbers)


def claim_c3(configs: list[Configuration], intervals: Any) -> ClaimResult:
    text = (
        "At equal ID gain, RPSFT rotates the top singular subspaces less than SFT (App. F.3; equal: within "
        f"{EQUAL_GAIN:.0%} of SFT's G_id)"
    )
    sft = _reference(configs, "sft")
    rpsft = [c for c in configs if c.method == "rpsft" and ROTATION in c.metrics]
    if sft is None or ROTATION not in sft.metrics or not rpsft:
        return ClaimResult("C3", text, "inconclusive", "no rotation measured (evaluation.rotation: true)")
    key_sft = intervals.key_of(sft.point)
    # comparable ID gain: within 25% of SFT's G_id, or a paired G_id difference whose interval holds 0
    equal = [
        c
        for c in rpsft
        if abs(c.point.g_id - sft.point.g_id) <= EQUAL_GAIN * abs(sft.point.g_id)
        or _sign(intervals.draws.g_difference(intervals.key_of(c.point), key_sft)) == 0
    ]
    per_gain = {
        c.label: c.metrics[ROTATION] / c.point.g_id for c in rpsft + [sft] if c.point.g_id > 0
    }
    numbers = {
        "sft_rotation_deg": sft.metrics[ROTATION],
        "sft_g_id": sft.point.g_id,
        "equal_gain": [
            {"label": c.label, "rotation_deg": c.metrics[ROTATION], "g_id": c.point.g_id} for c in equal
        ],
        "rotation_per_g_id": per_gain,
    }
    if not equal:
        return ClaimResult(
            "C3",
            text,
            "inconclusive",
            f"no RPSFT configuration has an ID gain comparable to SFT's (G_id {sft.point.g_id:+.4f}; within "
            f"{EQUAL_GAIN:.0%} or a paired interval that holds 0); rotation per unit of G_id: "
            + ", ".join(f"{k} {v:.4g} deg" for k, v in per_gain.items()),
            numbers,
        )
    less = [c for c in equal if c.metrics[ROTATION] < sft.metrics[ROTATION]]
    verdict: Verdict = "reproduced" if len(less) == len(equal) else "not reproduced" if not less else "inconclusive"
    evidence = f"SFT rotates {sft.metrics[ROTATION]:.4g} deg at G_id {sft.point.g_id:+.4f}; at equal ID gain: " + ", ".join(
        f"{c.label} {c.metrics[ROTATION]:.4g} deg (G_id {c.point.g_id:+.4f})" for c in equal
    )
    return ClaimResult("C3", text, verdict, evidence, numbers)


def k_slice(configs: list[Configuration], claims: Claims) -> list[Configuration]:
    """Phi(k) at the slice's lambda and layers: k = 0 (SFT), the rpsft ks, full k (L2-init at that lambda)."""
    lam, layers = claims.k_slice.lam, claims.k_slice.layers
    out = []
    for c in configs:
        same_layers = (c.param("layers") or "all") == layers
        if c.method == "sft" and c.param("reference"):
            out.append(c)
        elif c.method in ("rpsft", "l2-init") and same_layers and c.lam is not None and math.isclose(c.lam, lam):
            out.append(c)
    return out


def _k_order(c: Configuration) -> float:
    if c.method == "sft":
        return 0.0
    if c.method == "l2-init":
        return math.inf
    return c.k_value if c.k_value is not None else math.nan


def claim_c4(configs: list[Configuration], intervals: Any, claims: Claims, beta0: float) -> ClaimResult:
    text = "Phi(k) has an interior optimum: too small a k forgets, too large a k stops adaptation (Fig. 3, Prop. C.4)"
    grid = sorted((c for c in k_slice(configs, claims) if not c.auto), key=_k_order)
    if len(grid) < 3:
        return ClaimResult("C4", text, "inconclusive", f"the k slice has {len(grid)} points; needs 3 or more")
    best = _best(grid, beta0)
    ends = [grid[0], grid[-1]]
    numbers = {
        "beta": beta0,
        "phi_by_k": [
            {"label": c.label, "k": _k_order(c), "phi": c.intervals[f"phi@{beta0:g}"].to_dict()} for c in grid
        ],
        "best": best.label,
    }
    if best in ends:
        others = [c for c in grid if c is not best]
        signs = [_sign(intervals.difference(best.point, o.point, beta0)) for o in others]
        verdict: Verdict = "not reproduced" if all(s == 1 for s in signs) else "inconclusive"
        return ClaimResult(
            "C4", text, verdict, f"the best k of the slice is an end point: {best.label}", numbers
        )
    diffs = {o.label: intervals.difference(best.point, o.point, beta0) for o in ends}
    numbers["best_minus_ends"] = {k: v.to_dict() for k, v in diffs.items()}
    verdict = "reproduced" if all(_sign(d) == 1 for d in diffs.values()) else "inconclusive"
    evidence = f"best k of the slice: {best.label}; " + "; ".join(
        f"Phi(best) - Phi({label}) {d.text()}" for label, d in diffs.items()
    )
    return ClaimResult("C4", text, verdict, evidence, numbers)


def claim_c5(configs: list[Configuration], claims: Claims) -> ClaimResult:
    text = "The protected drift ||Uk^T (W - W0) Vk||_F shrinks as O(1/lambda) (Prop. C.2)"
    k, layers = claims.drift_slice.k, claims.drift_slice.layers
    rows = sorted(
        (
            c
            for c in configs
            if c.method == "rpsft"
            and not c.auto
            and c.k_value is not None
            and math.isclose(c.k_value, float(k))
            and (c.param("layers") or "all") == layers
            and "drift_mean" in c.metrics
        ),
        key=lambda c: c.lam or 0.0,
    )
    if len(rows) < 2:
        return ClaimResult("C5", text, "inconclusive", f"fewer than 2 lambdas at k={k}, layers={layers}")
    xs = [math.log(c.lam) for c in rows]
    ys = [math.log(c.metrics["drift_mean"]) for c in rows]
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(rows) - 1)]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    numbers = {
        "lambda": [c.lam for c in rows],
        "drift_mean": [c.metrics["drift_mean"] for c in rows],
        "slope_fit": fit,
        "slope_between_neighbours": slopes,
    }
    # the O(1/lambda) regime is where the penalty dominates: the largest lambdas
    tail = slopes[-1]
    verdict: Verdict = (
        "reproduced" if -1.3 <= tail <= -0.7 else "not reproduced" if tail > -0.5 or tail < -1.5 else "inconclusive"
    )
    evidence = (
        "drift " + ", ".join(f"{c.metrics['drift_mean']:.4g} at lambda={c.lam:g}" for c in rows)
        + f"; log-log slope {fit:+.2f} over all, {tail:+.2f} between the two largest lambdas (O(1/lambda): -1)"
    )
    return ClaimResult("C5", text, verdict, evidence, numbers)


def claim_c6(configs: list[Configuration], intervals: Any, claims: Claims, beta0: float) -> ClaimResult:
    text = "The energy rule's k (k: auto) lands near the best k of the grid"
    slice_ = k_slice(configs, claims)
    auto = [c for c in slice_ if c.auto]
    grid = [c for c in slice_ if c.method == "rpsft" and not c.auto]
    if not auto or not grid:
        return ClaimResult("C6", text, "inconclusive", "the k slice has no k: auto or no grid k")
    a = auto[0]
    best = _best(grid, beta0)
    diff = intervals.difference(a.point, best.point, beta0)
    numbers = {
        "auto_k_fraction": a.k_value,
        "best_grid": best.label,
        "best_grid_k": best.k_value,
        "phi_auto_minus_best": diff.to_dict(),
    }
    verdict: Verdict = "not reproduced" if _sign(diff) == -1 else "reproduced"
    evidence = (
        f"k: auto resolved to {a.k_value:.4g} of each matrix's rank; best grid k {best.label}; "
        f"Phi(auto) - Phi(best) {diff.text()}"
        + (" (indistinguishable)" if _sign(diff) == 0 else "")
    )
    return ClaimResult("C6", text, verdict, evidence, numbers)


def evaluate_claims(configs: list[Configuration], intervals: Any, claims: Claims, beta0: float) -> list[ClaimResult]:
    return [
        claim_c1(configs),
        claim_c2(configs, intervals, claims.betas, beta0),
        claim_c3(configs, intervals),
        claim_c4(configs, intervals, claims, beta0),
        claim_c5(configs, claims),
        claim_c6(configs, intervals, claims, beta0),
    ]


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
        }


def study_result(study: StudyConfig, stored: Any, base_metrics: dict[str, float], setup: dict[str, Any]) -> StudyResult:
    configs, intervals = configurations(stored)
    beta0 = stored.config.objective.beta
    return StudyResult(
        name=study.name,
        sweep=stored.config.name,
        model=stored.config.model,
        data=stored.config.data,
        beta=beta0,
        claims=evaluate_claims(configs, intervals, study.claims, beta0),
        configurations=configs,
        base_metrics=base_metrics,
        setup=setup,
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
    from sweeps.runner import absolutize, resume_sweep, run_sweep
    from sweeps.store import SweepStore

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
    stored = store.load()
    base = stored.base_metrics()
    ev = config.evaluation
    setup = {
        "steps": config.max_steps,
        "learning rate": config.train.get("learning_rate"),
        "batch size": config.train.get("batch_size"),
        "max length": config.train.get("max_length"),
        "objective": f"{config.objective.metric} (beta {config.objective.beta:g})",
        "ID items per benchmark": ev.loss.n_id,
        "OOD items per benchmark": ev.mc.n if (ev.mc and config.objective.metric == "mc") else ev.loss.n_ood,
        "trials finished": f"{sum(p.n_seeds for p in stored.points)} of "
        f"{config.num_reference_trials + config.search.num_trials}",
        "training time (s, all trials)": round(
            sum(trial.metrics.get("train_seconds", 0.0) for trial in stored.trials)
        ),
    }
    return study_result(study, stored, base, setup), stored
