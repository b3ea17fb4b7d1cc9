"""Plain-text tables of a sweep's trials and of the operating-point selection."""

from __future__ import annotations

import math
import re
from typing import Any

from rpsft.sweeps.analysis.selection import Selection
from rpsft.sweeps.store.sweep_store import TrialRecord, trial_label


def _num(value: Any, fmt: str = "{:+.4f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def operating_point_runs(selection: Selection | None) -> set[str]:
    """The runs of the operating point (every seed of its configuration)."""
    if selection is None:
        return set()
    return set(selection.best.run_ids or (selection.best.run_id,))


def _ci(interval: Any) -> str:
    if interval is None or not math.isfinite(interval.low):
        return "-"
    return f"[{interval.low:+.4f}, {interval.high:+.4f}]"


def trials_table(trials: list[TrialRecord], beta: float, selection: Selection | None = None) -> str:
    """One line per trial: id, knobs, status, G_id, F_ood, Phi(beta) with the configuration's interval (seeds
    pooled, when the selection carries intervals), training loss; the selection's operating point starred."""
    chosen = operating_point_runs(selection)
    intervals = selection.analysis.intervals if selection is not None and selection.analysis else None
    header = (
        f"{'trial':14s} {'knobs':44s} {'status':14s} {'G_id':>9s} {'F_ood':>9s} {'Phi':>9s} "
        f"{'Phi ' + format(selection.analysis.intervals.draws.level if intervals else 0.95, '.0%') + ' CI':>21s} "
        f"{'loss':>7s}"
    )
    lines = [header, "-" * len(header)]
    for trial in trials:
        status = "early-stopped" if trial.state == "early-stopped" else trial.status.lower()
        star = " *" if trial.run_id in chosen else ""
        ci = None
        if intervals is not None and trial.run_id in intervals.keys:
            ci = intervals.draws.phi(intervals.keys[trial.run_id], beta)
        lines.append(
            f"{trial.trial_id[-14:]:14s} {trial.label[:44]:44s} {status:14s} "
            f"{_num(trial.g_id):>9s} {_num(trial.f_ood):>9s} {_num(trial.phi(beta)):>9s} {_ci(ci):>21s} "
            f"{_num(trial.metrics.get('train_loss'), '{:.3f}'):>7s}{star}"
        )
    if selection is not None and selection.best.items == "selection":
        lines.append(
            "(G_id, F_ood, Phi and the CI above: each trial on all items; the operating point * was chosen on the "
            "selection items and is reported on the report items below)"
        )
    return "\n".join(lines)


def configuration_label(point: Any) -> str:
    """A configuration's name: its trial label without a seed when its seeds are pooled, and ``step=N`` for a
    point of a trajectory (:mod:`rpsft.sweeps.analysis.trajectory`)."""
    label = trial_label({key: value for key, value in point.params.items() if key != "step"})
    if point.n_seeds > 1:
        label = re.sub(r" seed=-?\d+$", "", label) + f" ({point.n_seeds} seeds)"
    step = point.params.get("step")
    return label if step in (None, "", "None") else f"{label} step={step}"


# which items an operating point's numbers are on (rpsft.sweeps.analysis.selection.PartNumbers.items), as printed
PART_TITLES = {
    "selection": "chosen on the selection items (biased upwards by the choice)",
    "report": "reported on the report items (held out from the choice)",
    "all": "on all items (chosen and reported on the same items: biased upwards)",
}
ITEMS_NAMES = {"selection": "the selection items", "report": "the report items", "all": "all items"}


def _part_line(numbers: Any, beta: float) -> str:
    """``G_id .. F_ood .. Phi ..`` of one part (``rpsft.sweeps.analysis.selection.PartNumbers``), with intervals if any."""
    if numbers.intervals is not None:
        i = numbers.intervals
        return (
            f"G_id {i['g_id'].text()}  F_ood {i['f_ood'].text()}  Phi {i[f'phi@{beta:g}'].text()}  "
            f"({i['g_id'].level:.0%} paired bootstrap intervals)"
        )
    return f"G_id {numbers.g_id:+.4f}  F_ood {numbers.f_ood:+.4f}  Phi {numbers.phi:+.4f}"


def selection_text(selection: Selection) -> str:
    best = selection.best
    beta = selection.beta
    split = selection.split()
    parts = selection.operating_point()
    chosen, report = parts["selection"], parts["report"]
    on = " on the selection items" if chosen.items == "selection" else ""
    lines = [
        f"operating point (max Phi at beta={beta:g}{on}): trial {best.trial_id}  {configuration_label(best)}",
        f"  items: {split['text']}",
    ]
    if split["active"] and chosen.items == "selection":
        lines.append(f"  {PART_TITLES['selection']}:  {_part_line(chosen, beta)}")
    elif split["active"]:  # a configuration without item scores: nothing to split
        lines.append("  (this configuration stored no per-item scores, so it was chosen on all items)")
    lines.append(f"  {PART_TITLES[report.items]}:  {_part_line(report, beta)}")
    for comparison in selection.comparisons():
        verdict = {True: "distinguishable", False: "NOT distinguishable", None: "no interval"}[
            comparison.distinguishable
        ]
        diff = comparison.difference.text() if comparison.difference is not None else "-"
        lines.append(
            f"  vs {comparison.role} ({configuration_label(comparison.other)}): "
            f"Phi difference on {ITEMS_NAMES.get(comparison.items, comparison.items)} {diff}: {verdict}"
        )
    if report.g_id <= 0:
        gainers = [p for p in selection.ranking if p.g_id > 0]
        why = (
            f"the {len(gainers)} configuration(s) that gain on ID forget more than they gain at this beta"
            if gainers
            else "no trained trial gains on ID at this scale"
        )
        lines.append(f"  note: the operating point does not raise the ID score (G_id <= 0): {why}")
    if report.phi <= 0:
        lines.append(
            f"  note: the best Phi at beta={beta:g} is <= 0: at this scale no trained trial beats the base model "
            "(Phi = 0) at this beta; see the choice as beta varies below"
        )
    on = " on the selection items" if best.items == "selection" else ""
    lines.append(f"Pareto front{on} (G_id up, F_ood down):")
    for p in selection.front:
        lines.append(
            f"  {p.trial_id[-14:]:14s} G_id {p.g_id:+.4f}  F_ood {p.f_ood:+.4f}  {configuration_label(p)}"
        )
    lines.append(f"choice as beta varies{on}:")
    for interval in selection.path:
        high = "inf" if math.isinf(interval.high) else f"{interval.high:.4g}"
        lines.append(
            f"  beta in [{interval.low:.4g}, {high}): {interval.point.trial_id}  {trial_label(interval.point.params)}"
        )
    return "\n".join(lines)


def rl_table(outcomes: list[Any]) -> str:
    """The init -> RL table of ``rpsft rl`` (:class:`rpsft.sweeps.stages.rl.RLOutcome`): G_id and F_ood of the initial and
    the chosen RL checkpoint, and the reward of the first and last step."""
    header = (
        f"{'initial checkpoint':40s} {'G_id init':>10s} {'+RL':>9s} {'F_ood init':>11s} {'+RL':>9s} "
        f"{'step':>5s} {'reward 1st':>10s} {'last':>7s}"
    )
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        init, chosen = outcome.init_scores or {}, outcome.chosen_scores or {}
        rewards = outcome.rewards
        lines.append(
            f"{outcome.label[:40]:40s} {_num(init.get('g_id')):>10s} {_num(chosen.get('g_id')):>9s} "
            f"{_num(init.get('f_ood')):>11s} {_num(chosen.get('f_ood')):>9s} "
            f"{_num(chosen.get('step'), '{:.0f}'):>5s} "
            f"{_num(rewards[0] if rewards else None, '{:.3f}'):>10s} {_num(rewards[-1] if rewards else None, '{:.3f}'):>7s}"
        )
    return "\n".join(lines)


def _chosen(label: str, family: str) -> str:
    """A frontier point's label without its family's method (named by the row)."""
    method = family.split(" ")[0]
    return label.removeprefix(f"{method} ") if label.startswith(f"{method} ") else label


def frontiers_text(frontiers: Any) -> str:
    """The family x beta table of :class:`rpsft.sweeps.analysis.frontiers.Frontiers`: each cell ``Phi [lo, hi] (chosen: label)``
    on the report items, then the anchor's paired differences with every other family."""
    if not frontiers.points:
        return "family frontiers: no configuration with finite G_id and F_ood"
    active = frontiers.split_active
    on = (
        "chosen by max Phi on the selection items, Phi on the report items"
        if active
        else "chosen and reported on the same items (no split: biased upwards)"
    )
    level = f", {frontiers.level:.0%} CI" if frontiers.level else ""
    width = max(len(name) for name in frontiers.families) + 2
    lines = [f"family frontiers ({on}{level}):"]
    for name in frontiers.families:
        cells = []
        for beta in frontiers.betas:
            point = frontiers.point(name, beta)
            if point is None:
                cells.append(f"beta={beta:g} -")
                continue
            phi = point.phi_interval.text() if point.phi_interval is not None else _num(point.report.phi)
            cells.append(f"beta={beta:g} {phi} (chosen: {_chosen(point.label, name)})")
        lines.append(f"  {name:{width}s}" + " | ".join(cells))
    if frontiers.differences:
        items = ITEMS_NAMES.get(_items(frontiers), "all items")
        lines.append(f"  {frontiers.anchor} frontier - family frontier (paired, on {items}):")
        for name, per_beta in frontiers.differences.items():
            cells = [
                f"beta={beta:g} {d.difference.text() if d.difference is not None else '-'}"
                for beta, d in per_beta.items()
            ]
            lines.append(f"  {name:{width}s}" + " | ".join(cells))
    return "\n".join(lines)


def _items(frontiers: Any) -> str:
    return next((d.items for per_beta in frontiers.differences.values() for d in per_beta.values()), "all")
