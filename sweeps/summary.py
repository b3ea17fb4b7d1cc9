"""Plain-text tables of a sweep's trials and of the operating-point selection."""

from __future__ import annotations

import math
from typing import Any

from sweeps.selection import Selection


def _num(value: Any, fmt: str = "{:+.4f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def trial_label(params: dict[str, Any]) -> str:
    """A short name of a trial from its parameters: ``rpsft k=64 lambda=4.31 layers=attn period=1``."""
    if params.get("reference"):
        return f"[ref] {params['reference']}"
    parts = [params.get("method", "rpsft")]
    for key in ("k", "lambda", "layers", "period"):
        if key in params:
            value = params[key]
            try:
                value = f"{float(value):.3g}" if key == "lambda" else value
            except ValueError:
                pass
            parts.append(f"{key}={value}")
    return " ".join(parts)


def trials_table(rows: list[dict[str, Any]], beta: float) -> str:
    """One line per trial: id, knobs, status, G_id, F_ood, Phi(beta), training loss; the best Phi starred."""
    header = f"{'trial':14s} {'knobs':44s} {'status':14s} {'G_id':>9s} {'F_ood':>9s} {'Phi':>9s} {'loss':>7s}"
    lines = [header, "-" * len(header)]
    for row in rows:
        m = row["metrics"]
        g, f = m.get("g_id"), m.get("f_ood")
        phi = g - beta * f if g is not None and f is not None else None
        status = row["status"].lower() if row["status"] != "FINISHED" else "finished"
        if row.get("state") == "early-stopped":
            status = "early-stopped"
        star = " *" if row.get("operating_point") else ""
        lines.append(
            f"{(row['trial_id'] or '?')[-14:]:14s} {trial_label(row['params'])[:44]:44s} {status:14s} "
            f"{_num(g):>9s} {_num(f):>9s} {_num(phi):>9s} {_num(m.get('train_loss'), '{:.3f}'):>7s}{star}"
        )
    return "\n".join(lines)


def selection_text(selection: Selection) -> str:
    best = selection.best
    lines = [
        f"operating point (max Phi at beta={selection.beta:g}): trial {best.trial_id}  {trial_label(best.params)}",
        f"  G_id {best.g_id:+.4f}  F_ood {best.f_ood:+.4f}  Phi {best.phi(selection.beta):+.4f}",
        "Pareto front (G_id up, F_ood down):",
    ]
    for p in selection.front:
        lines.append(
            f"  {p.trial_id[-14:]:14s} G_id {p.g_id:+.4f}  F_ood {p.f_ood:+.4f}  {trial_label(p.params)}"
        )
    lines.append("choice as beta varies:")
    for interval in selection.path:
        high = "inf" if math.isinf(interval.high) else f"{interval.high:.4g}"
        lines.append(
            f"  beta in [{interval.low:.4g}, {high}): {interval.point.trial_id}  {trial_label(interval.point.params)}"
        )
    return "\n".join(lines)
