"""The report's tables as rows of plain values: trials, and per-benchmark numbers against base and SFT."""

from __future__ import annotations

from typing import Any

from rpsft.dashboards.sweep_data import ROTATION_MEAN, SweepData
from rpsft.evaluation.metrics import phi as tradeoff_phi

SUITE_NAMES = {"id": "ID", "ood": "OOD"}
KIND_NAMES = {"nll": "NLL (lower is better)", "acc": "accuracy (higher is better)"}


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def benchmark_rows(data: SweepData) -> list[dict[str, Any]]:
    """One row per benchmark metric: the base model, SFT, the operating point, and their differences."""
    sft = data.reference("sft")
    chosen = data.operating_point
    rows = []
    for name in data.benchmarks():
        kind, suite, bench = name.split("/")
        base = data.base_metrics.get(name)
        sft_value = sft.metrics.get(name) if sft else None
        chosen_value = chosen.metrics.get(name) if chosen else None
        rows.append(
            {
                "metric": name,
                "benchmark": bench,
                "suite": SUITE_NAMES[suite],
                "kind": KIND_NAMES[kind],
                "base": base,
                "sft": sft_value,
                "operating_point": chosen_value,
                "sft_minus_base": _delta(sft_value, base),
                "operating_point_minus_base": _delta(chosen_value, base),
                "operating_point_minus_sft": _delta(chosen_value, sft_value),
            }
        )
    return rows


def trial_rows(data: SweepData) -> list[dict[str, Any]]:
    """One row per trial run, in start order: knobs, status, G_id, F_ood, Phi at every beta, loss, drift."""
    chosen = data.operating_point
    rows = []
    for trial in data.trials:
        status = "early-stopped" if trial.state == "early-stopped" else trial.status.lower()
        row: dict[str, Any] = {
            "trial_id": trial.trial_id,
            "run_id": trial.run_id,
            "label": trial.label,
            "status": status,
            "operating_point": chosen is not None and trial.run_id == chosen.run_id,
            "g_id": trial.metrics.get("g_id"),
            "f_ood": trial.metrics.get("f_ood"),
        }
        for beta in data.config.objective.betas:
            row[f"phi@{beta:g}"] = trial.phi(beta)
        row["train_loss"] = trial.metrics.get("train_loss")
        row["drift_mean"] = trial.metrics.get("drift_mean")
        if data.has_rotation:
            row["rotation_deg"] = trial.metrics.get(ROTATION_MEAN)
        rows.append(row)
    return rows


def rl_rows(data: SweepData) -> list[dict[str, Any]]:
    """The init -> RL table (the layout of the paper's Tables 3 and 4, on the sweep's loss-based numbers):
    per RL run, G_id (ID) and F_ood (OOD) of the initial checkpoint and of the RL checkpoint chosen by its ID
    score, the change, Phi at the sweep's beta before and after, and the reward's first and last step."""
    beta = data.beta
    rows = []
    for record in data.rl:
        init, chosen = record.scores("init"), record.scores("chosen")
        row: dict[str, Any] = {"run_id": record.run_id, "init": record.label, "init_trial": record.init_trial}
        for name, key in (("id", "g_id"), ("ood", "f_ood")):
            row[f"{name}_init"], row[f"{name}_rl"] = init.get(key), chosen.get(key)
            row[f"{name}_delta"] = _delta(chosen.get(key), init.get(key))
        phi = [
            None
            if s.get("g_id") is None or s.get("f_ood") is None
            else tradeoff_phi(s["g_id"], s["f_ood"], beta)
            for s in (init, chosen)
        ]
        row["phi_init"], row["phi_rl"] = phi
        row["steps"] = record.metrics.get("rl/steps")
        row["chosen_step"] = record.metrics.get("rl/chosen_step")
        row["reward_first"] = record.metrics.get("rl/reward_first")
        row["reward_last"] = record.metrics.get("rl/reward_last")
        rows.append(row)
    return rows
