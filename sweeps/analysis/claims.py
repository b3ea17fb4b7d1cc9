"""The paper's claims checked on a study's configurations, each with numbers, intervals and a verdict.

* **C1** SFT raises ID and lowers OOD: the intervals of SFT's ``G_id`` and ``F_ood`` are both above 0.
* **C2** RPSFT's frontier is above SFT's, L2-init's and LoRA's over the beta range: at each beta every
  family's best configuration by Phi on the selection items, compared on the held-out report items (paired
  ``Phi_rpsft - Phi_other`` intervals above 0; :mod:`rpsft.sweeps.analysis.frontiers`). The paper's protocol (fixed
  configurations at the shared settings and method defaults, ``claims.paper_protocol``) is reported alongside.
* **C3** At equal ID gain RPSFT rotates the top singular subspaces less than SFT (App. F.3).
* **C4** Phi(k) has an interior optimum on the k slice (k = 0 is SFT, full k is L2-init at the same lambda).
* **C5** The protected drift shrinks as O(1/lambda): slope of log drift against log lambda near -1. Prop. C.2
  assumes gradient descent, so the drift slice is fitted per regime: Adam with the penalty in the loss (the
  paper's setting, which gives the verdict), Adam with the decoupled penalty, and plain SGD (loss form).
* **C6** The energy rule's k lands near the best k of the grid: its Phi is not distinguishable from the best.

A verdict is ``reproduced``, ``not reproduced`` (the data contradict the claim with intervals that exclude the
claimed direction) or ``inconclusive`` (the intervals allow both). Nothing here tunes an evaluation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rpsft.core.config import TrainConfig
from rpsft.evaluation.intervals import Interval
from rpsft.sweeps.analysis.configurations import ROTATION, Configuration, _dict, _sign
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.analysis.summary import configuration_label
from rpsft.sweeps.analysis.uncertainty import _SEED_SUFFIX

Verdict = Literal["reproduced", "not reproduced", "inconclusive"]
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
    # C2's second comparison, the paper's protocol: family (rpsft, sft, l2-init, lora) -> a configuration
    # label ("rpsft k=32 lambda=100 layers=all") or knobs ({k: 32, lambda: 100}) matched against the logged
    # params, final step; a family left out: its reference at the method defaults (named by the method alone)
    paper_protocol: dict[str, str | dict[str, int | float | str]] | None = None


@dataclass
class ClaimResult:
    id: str
    claim: str
    verdict: Verdict
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ claims


def _best(configs: list[Configuration], beta: float) -> Configuration | None:
    return max(configs, key=lambda c: c.point.phi(beta), default=None)


def _reference(configs: list[Configuration], method: str) -> Configuration | None:
    return next((c for c in configs if c.method == method and c.param("reference")), None)


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
    numbers: dict[str, Any] = {"g_id": g.to_dict(), "f_ood": f.to_dict()}
    evidence = f"SFT: G_id {g.text()}, F_ood {f.text()}"
    if sft.f_ood_views:  # the verdict reads the objective's view (f_ood); both views are reported
        numbers["f_ood_views"] = {view: i.to_dict() for view, i in sft.f_ood_views.items()}
        evidence += "; F_ood " + ", ".join(f"under {view}: {i.text()}" for view, i in sft.f_ood_views.items())
        evidence += "" if "mc" in sft.f_ood_views else " (no mc scores)"
    return ClaimResult("C1", text, verdict, evidence, numbers)


C2_OTHERS = ("sft", "l2-init", "lora")  # the families RPSFT's frontier is compared with
C2_PROTOCOL = ("rpsft", *C2_OTHERS)
# the knobs a paper_protocol entry may leave unnamed: matched at the method defaults (TrainConfig's) when
# several configurations match the named ones
PROTOCOL_DEFAULTS = {
    "layers": TrainConfig.model_fields["layers"].default,
    "period": TrainConfig.model_fields["period"].default,
    "penalty_mode": TrainConfig.model_fields["penalty_mode"].default,
    "lora_r": TrainConfig.model_fields["lora_r"].default,
    "lora_alpha": TrainConfig.model_fields["lora_alpha"].default,
}


def _same_value(logged: Any, wanted: Any) -> bool:
    """A logged parameter (a string) against a protocol value: as numbers when both are, else as text."""
    if logged in (None, "", "None"):
        return False
    try:
        return math.isclose(float(logged), float(wanted))
    except (TypeError, ValueError):
        return str(logged) == str(wanted)


def _protocol_names(point: TrialPoint) -> set[str]:
    """The names a ``paper_protocol`` label may give a configuration: its reference name and its knob label
    (each with and without ``[ref]``), without seed or step."""
    from rpsft.sweeps.store.sweep_store import trial_label

    params = {k: v for k, v in point.params.items() if k not in ("step", "seed")}
    names = {trial_label({k: v for k, v in params.items() if k != "reference"})}
    if params.get("reference"):
        names.add(_SEED_SUFFIX.sub("", str(params["reference"])))
    return names | {f"[ref] {name}" for name in names}


def protocol_point(
    points: list[TrialPoint], name: str, spec: str | dict[str, Any] | None
) -> tuple[TrialPoint | None, str]:
    """The configuration (final step) the paper's protocol uses for family ``name``, and how it was found.

    ``spec`` a label (``"rpsft k=32 lambda=100 layers=all"``, ``"lora"``) or knobs (``{k: 32, lambda: 100}``,
    matched against the logged parameters; knobs left unnamed at the method defaults when several match, then
    references first); ``None``: the family's reference at its method defaults (the reference named by the
    method alone), else its only reference."""
    from rpsft.sweeps.analysis.frontiers import family
    from rpsft.sweeps.analysis.trajectory import intermediate_step

    mine = [p for p in points if family(p.params) == name and intermediate_step(p) is None]
    if spec is None:
        refs = [p for p in mine if p.params.get("reference")]
        bare = [p for p in refs if _SEED_SUFFIX.sub("", str(p.params["reference"])) == name]
        matches = bare or refs
        if len(matches) == 1:
            return matches[0], "its reference" if bare else "its only reference"
        if not matches:
            return None, "no reference (set claims.paper_protocol)"
        return None, f"{len(matches)} references, none at the method defaults (set claims.paper_protocol)"
    if isinstance(spec, str):
        matches = [p for p in mine if spec in _protocol_names(p)]
    else:
        matches = [p for p in mine if all(_same_value(p.params.get(k), v) for k, v in spec.items())]
        if len(matches) > 1:  # the knobs the protocol leaves unnamed at the method defaults
            at_defaults = [
                p
                for p in matches
                if all(
                    p.params.get(k) in (None, "", "None") or _same_value(p.params[k], v)
                    for k, v in PROTOCOL_DEFAULTS.items()
                    if k not in spec
                )
            ]
            matches = at_defaults or matches
    if len(matches) > 1:
        matches = [p for p in matches if p.params.get("reference")] or matches
    if len(matches) == 1:
        return matches[0], f"claims.paper_protocol {spec!r}"
    if not matches:
        return None, f"no {name} configuration matches claims.paper_protocol {spec!r}"
    labels = ", ".join(configuration_label(p) for p in matches)
    many = f"{len(matches)} configurations ({labels})"
    return None, f"claims.paper_protocol {spec!r} matches {many}: name a knob more"


def _c2_verdict(signs: list[int]) -> Verdict:
    if signs and all(s == 1 for s in signs):
        return "reproduced"
    return "not reproduced" if any(s == -1 for s in signs) else "inconclusive"


def _signs_text(per_beta: dict[float, Interval | None]) -> str:
    above = [f"{b:g}" for b, d in per_beta.items() if _sign(d) == 1]
    below = [f"{b:g}" for b, d in per_beta.items() if _sign(d) == -1]
    return f"above 0 at beta in {above or 'none'}, below 0 at {below or 'none'}"


def _unsplit_analysis(configs: list[Configuration], intervals: Any, betas: list[float]) -> Any:
    """An analysis of ``configs`` on all items (no split) from their intervals alone (callers without one)."""
    from rpsft.sweeps.analysis.uncertainty import SweepAnalysis

    points = [c.point for c in configs]
    return SweepAnalysis([], points, intervals, all_points=points, betas=list(betas))


def claim_c2(
    configs: list[Configuration],
    intervals: Any,
    betas: list[float],
    beta0: float,
    *,
    analysis: Any = None,
    protocol: dict[str, Any] | None = None,
) -> ClaimResult:
    """C2 by family frontiers (:mod:`rpsft.sweeps.analysis.frontiers`): at each beta, RPSFT's best configuration against
    SFT's, L2-init's and LoRA's, each chosen by max Phi on the selection items and compared on the held-out
    report items (paired intervals; the verdict). Alongside, the paper's protocol: fixed configurations at the
    shared settings and method defaults (``protocol``: ``Claims.paper_protocol``), final step, report items
    (its own sub-verdict in the numbers). ``analysis``: the sweep's :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis`
    (default: ``configs`` on all items, chosen and reported on the same items)."""
    from rpsft.sweeps.analysis.frontiers import beta_key, family_frontiers
    from rpsft.sweeps.analysis.trajectory import intermediate_step

    text = (
        "RPSFT's frontier (its best configuration at each beta) has a higher Phi than SFT's, L2-init's and "
        "LoRA's over a range of beta"
    )
    analysis = analysis if analysis is not None else _unsplit_analysis(configs, intervals, betas)
    frontiers = family_frontiers(analysis, betas)
    split = analysis.split_active
    items = (
        "chosen on the selection items, reported on the held-out report items"
        if split
        else "chosen and reported on the same items (no split: evaluation.split.report_fraction 0)"
    )
    numbers: dict[str, Any] = {
        "items": items,
        "split": analysis.split_dict(),
        "betas": list(betas),
        "frontiers": frontiers.to_dict()["families"],
        "chosen": {},
        "differences": {},
    }
    shown = beta0 if beta0 in betas or not betas else betas[0]  # the beta the evidence text names
    if "rpsft" not in frontiers.points:
        return ClaimResult("C2", text, "inconclusive", "the study has no rpsft configuration", numbers)
    numbers["chosen"] = {beta_key(b): p.label for b, p in frontiers.points["rpsft"].items()}
    lines = [f"frontiers {items}"]
    signs: list[int] = []
    for name in C2_OTHERS:
        if name not in frontiers.differences:
            continue
        per_beta = {b: d.difference for b, d in frontiers.differences[name].items()}
        numbers["differences"][name] = {beta_key(b): _dict(d) for b, d in per_beta.items()}
        signs += [_sign(d) for d in per_beta.values()]
        d0 = per_beta.get(shown)
        other = frontiers.point(name, shown)
        lines.append(
            f"vs {name} (at beta={shown:g}: {other.label if other else '-'}): Phi difference "
            f"{d0.text() if d0 is not None else '-'}; {_signs_text(per_beta)}"
        )
    mine = frontiers.point("rpsft", shown)
    lines.insert(1, f"RPSFT's frontier at beta={shown:g}: {mine.label if mine else '-'}")
    # the paper's protocol: fixed configurations, final step, report items
    final = [p for p in analysis.points if intermediate_step(p) is None]
    chosen = {name: protocol_point(final, name, (protocol or {}).get(name)) for name in C2_PROTOCOL}
    report = analysis.report_intervals
    paper: dict[str, Any] = {
        "items": "report" if split else "all",
        "configurations": {name: (configuration_label(p) if p else None) for name, (p, _) in chosen.items()},
        "how": {name: how for name, (_, how) in chosen.items()},
        "differences": {},
    }
    paper_signs: list[int] = []
    anchor = chosen["rpsft"][0]
    paper_lines = []
    for name in C2_OTHERS:
        other = chosen[name][0]
        if anchor is None or other is None or report is None:
            continue
        per_beta = {b: report.difference(anchor, other, b) for b in betas}
        paper["differences"][name] = {beta_key(b): _dict(d) for b, d in per_beta.items()}
        paper_signs += [_sign(d) for d in per_beta.values()]
        d0 = per_beta.get(shown)
        paper_lines.append(f"vs {name} {d0.text() if d0 is not None else '-'} ({_signs_text(per_beta)})")
    paper["verdict"] = _c2_verdict(paper_signs)
    numbers["paper_protocol"] = paper
    if anchor is None:
        lines.append(f"paper protocol: no rpsft configuration ({chosen['rpsft'][1]})")
    else:
        lines.append(
            f"paper protocol (final step, {'report items' if split else 'all items'}; "
            f"{configuration_label(anchor)}) at beta={shown:g}: "
            + ("; ".join(paper_lines) or "no sft, l2-init or lora configuration")
            + f": {paper['verdict']}"
        )
    if not signs:
        evidence = "no sft, l2-init or lora configuration; " + "; ".join(lines)
        return ClaimResult("C2", text, "inconclusive", evidence, numbers)
    return ClaimResult("C2", text, _c2_verdict(signs), "; ".join(lines), numbers)


def claim_c3(configs: list[Configuration], intervals: Any) -> ClaimResult:
    text = (
        "At equal ID gain, RPSFT rotates the top singular subspaces less than SFT (App. F.3; equal: within "
        f"{EQUAL_GAIN:.0%} of SFT's G_id)"
    )
    sft = _reference(configs, "sft")
    rpsft = [c for c in configs if c.method == "rpsft" and c.paper_setting and ROTATION in c.metrics]
    if sft is None or ROTATION not in sft.metrics or not rpsft:
        return ClaimResult(
            "C3", text, "inconclusive", "no rotation measured (set evaluation.rotation: true to measure it)"
        )
    key_sft = intervals.key_of(sft.point)
    # comparable ID gain: within 25% of SFT's G_id, or a paired G_id difference whose interval holds 0
    equal = [
        c
        for c in rpsft
        if abs(c.point.g_id - sft.point.g_id) <= EQUAL_GAIN * abs(sft.point.g_id)
        or _sign(intervals.draws.g_difference(intervals.key_of(c.point), key_sft)) == 0
    ]
    per_gain = {c.label: c.metrics[ROTATION] / c.point.g_id for c in rpsft + [sft] if c.point.g_id > 0}
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
    verdict: Verdict = (
        "reproduced" if len(less) == len(equal) else "not reproduced" if not less else "inconclusive"
    )
    evidence = (
        f"SFT rotates {sft.metrics[ROTATION]:.4g} deg at G_id {sft.point.g_id:+.4f}; at equal ID gain: "
        + ", ".join(f"{c.label} {c.metrics[ROTATION]:.4g} deg (G_id {c.point.g_id:+.4f})" for c in equal)
    )
    return ClaimResult("C3", text, verdict, evidence, numbers)


def k_slice(configs: list[Configuration], claims: Claims) -> list[Configuration]:
    """Phi(k) at the slice's lambda and layers: k = 0 (SFT), the rpsft ks, full k (L2-init at that lambda); only
    configurations trained in the paper's setting (:attr:`Configuration.paper_setting`)."""
    lam, layers = claims.k_slice.lam, claims.k_slice.layers
    out = []
    for c in configs:
        if not c.paper_setting:
            continue
        same_layers = (c.param("layers") or "all") == layers
        if c.method == "sft" and c.param("reference"):
            out.append(c)
        elif (
            c.method in ("rpsft", "l2-init")
            and same_layers
            and c.lam is not None
            and math.isclose(c.lam, lam)
        ):
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
    auto = [c for c in k_slice(configs, claims) if c.auto]
    numbers = {
        "beta": beta0,
        "layers": claims.k_slice.layers,
        "phi_by_k": [
            {"label": c.label, "k": _k_order(c), "phi": c.intervals[f"phi@{beta0:g}"].to_dict()} for c in grid
        ],
        # k: auto, beside the grid (C6 compares it): its k is the resolved fraction of each matrix's rank
        "auto": [
            {"label": c.label, "k": _k_order(c), "phi": c.intervals[f"phi@{beta0:g}"].to_dict()} for c in auto
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


PAPER_REGIME = "loss"
REGIME_TEXT = {
    "loss": "Adam, penalty in the loss (the paper's setting)",
    "decoupled": "Adam, decoupled penalty",
    "sgd": "SGD, penalty in the loss",
}


def drift_regime(c: Configuration) -> str:
    """The C5 regime of a configuration: ``loss`` / ``decoupled`` (an AdamW optimizer with that penalty mode),
    ``sgd`` (plain SGD, penalty in the loss), else ``<optimizer>`` or ``<optimizer> <penalty mode>``."""
    if c.optimizer.startswith("adamw"):
        return c.penalty_mode
    return c.optimizer if c.penalty_mode == "loss" else f"{c.optimizer} {c.penalty_mode}"


def drift_slices(configs: list[Configuration], claims: Claims) -> dict[str, list[Configuration]]:
    """The rpsft configurations at the drift slice's k and layers with a drift, per regime, by lambda."""
    k, layers = claims.drift_slice.k, claims.drift_slice.layers
    out: dict[str, list[Configuration]] = {}
    for c in configs:
        if (
            c.method == "rpsft"
            and not c.auto
            and c.k_value is not None
            and math.isclose(c.k_value, float(k))
            and (c.param("layers") or "all") == layers
            and "drift_mean" in c.metrics
            and c.lam is not None
        ):
            out.setdefault(drift_regime(c), []).append(c)
    order = [*REGIME_TEXT, *sorted(set(out) - set(REGIME_TEXT))]
    return {r: sorted(out[r], key=lambda c: c.lam or 0.0) for r in order if r in out}


def _tail_verdict(tail: float) -> Verdict:
    if -1.3 <= tail <= -0.7:
        return "reproduced"
    return "not reproduced" if tail > -0.5 or tail < -1.5 else "inconclusive"


def drift_fit(regime: str, rows: list[Configuration]) -> dict[str, Any]:
    """One regime's drift against lambda: the log-log slopes (all points, and between the two largest lambdas,
    which gives the verdict: the O(1/lambda) regime is where the penalty dominates)."""
    out: dict[str, Any] = {
        "regime": regime,
        "setting": REGIME_TEXT.get(regime, regime),
        "optimizers": sorted({c.optimizer for c in rows}),
        "labels": [c.label for c in rows],
        "lambda": [c.lam for c in rows],
        "drift_mean": [c.metrics["drift_mean"] for c in rows],
        "train_loss": [c.metrics.get("train_loss") for c in rows],
    }
    lams = [c.lam for c in rows]
    if len(set(lams)) < len(lams):
        out.update(verdict="inconclusive", note="configurations at the same lambda differ in another knob")
        return out
    if len(rows) < 2:
        out.update(verdict="inconclusive", note="fewer than 2 lambdas")
        return out
    if any(c.lam <= 0 or c.metrics["drift_mean"] <= 0 for c in rows):
        out.update(verdict="inconclusive", note="a drift or lambda of 0 has no logarithm")
        return out
    xs = [math.log(c.lam) for c in rows]
    ys = [math.log(c.metrics["drift_mean"]) for c in rows]
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(rows) - 1)]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    out.update(slope_fit=fit, slope_between_neighbours=slopes, slope_tail=slopes[-1])
    out["verdict"] = _tail_verdict(slopes[-1])
    return out


def _drift_text(fit: dict[str, Any], head: str) -> str:
    points = ", ".join(
        f"{d:.4g} at lambda={lam:g}" + (f" (train loss {loss:.4g})" if loss is not None else "")
        for lam, d, loss in zip(fit["lambda"], fit["drift_mean"], fit["train_loss"])
    )
    if "slope_tail" not in fit:
        return f"{head}: drift {points}; {fit['note']} ({fit['verdict']})"
    return (
        f"{head}: drift {points}; log-log slope {fit['slope_fit']:+.2f} over all, "
        f"{fit['slope_tail']:+.2f} between the two largest lambdas ({fit['verdict']})"
    )


def claim_c5(configs: list[Configuration], claims: Claims) -> ClaimResult:
    text = (
        "The protected drift ||Uk^T (W - W0) Vk||_F shrinks as O(1/lambda) (Prop. C.2, for gradient descent; "
        "the verdict is Adam's with the penalty in the loss, the paper's setting)"
    )
    k, layers = claims.drift_slice.k, claims.drift_slice.layers
    fits = {regime: drift_fit(regime, rows) for regime, rows in drift_slices(configs, claims).items()}
    numbers: dict[str, Any] = {"paper_regime": PAPER_REGIME, "regimes": fits}
    paper = fits.get(PAPER_REGIME)
    others = [
        _drift_text(fit, f"under {name} ({fit['setting']})")
        for name, fit in fits.items()
        if name != PAPER_REGIME
    ]
    if paper is None or "slope_tail" not in paper:
        lead = f"fewer than 2 lambdas at k={k}, layers={layers} under {REGIME_TEXT[PAPER_REGIME]}"
        if paper is not None:
            lead = _drift_text(paper, paper["setting"])
        return ClaimResult("C5", text, "inconclusive", "; ".join([lead, *others]), numbers)
    # the paper's regime's numbers at the top level too (as before the regimes; read by the drift figure)
    top = ("lambda", "drift_mean", "train_loss", "slope_fit", "slope_between_neighbours")
    numbers.update({name: paper[name] for name in top})
    evidence = "; ".join([_drift_text(paper, paper["setting"]), *others, "O(1/lambda) is a slope of -1"])
    return ClaimResult("C5", text, paper["verdict"], evidence, numbers)


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
        f"Phi(auto) - Phi(best) {diff.text()}" + (" (indistinguishable)" if _sign(diff) == 0 else "")
    )
    return ClaimResult("C6", text, verdict, evidence, numbers)


def evaluate_claims(
    configs: list[Configuration], intervals: Any, claims: Claims, beta0: float, analysis: Any = None
) -> list[ClaimResult]:
    """Every claim's verdict; ``analysis`` (the sweep's :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis`) gives C2
    its selection and report items (without it C2 chooses and reports on the items of ``intervals``)."""
    return [
        claim_c1(configs),
        claim_c2(configs, intervals, claims.betas, beta0, analysis=analysis, protocol=claims.paper_protocol),
        claim_c3(configs, intervals),
        claim_c4(configs, intervals, claims, beta0),
        claim_c5(configs, claims),
        claim_c6(configs, intervals, claims, beta0),
    ]
