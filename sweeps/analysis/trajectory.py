"""A trial's trajectory: its intermediate evaluations as points of the trade-off.

With ``evaluation.every: N`` a trial scores itself every N optimizer steps (:class:`rpsft.sweeps.trial.run.
IntermediateEvaluation`): the loss-based numbers go to its MLflow run as ``eval/...`` metrics at that step
(``eval/g_id``, ``eval/f_ood``, ``eval/drift_mean``, ...), and the per-item scores as the artifact
``trajectory/step-<step>.json`` (:func:`trajectory_artifact`; the record ``item_scores.json`` holds for the
final point, less ``ood_kl``: intermediate evaluations run without the base model).

:func:`trajectory_points` turns a sweep's finished trials into one :class:`TrialPoint` per evaluated step,
named ``<trial id>@<step>`` (:func:`point_id`), plus the trial's final point; every point's ``params`` carry
its ``step``; :func:`sweep_points` gives them to the sweep's analysis when ``evaluation.trajectory`` is on, so
every scored checkpoint is a candidate operating point. :func:`point_item_scores` reads the item scores of any
such point. A point's weights come from retraining its trial with ``stop_at_step`` (``rpsft export <sweep>
--trial <trial id>@<step>``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from rpsft.sweeps.analysis.points import trial_point, trial_points
from rpsft.sweeps.analysis.selection import TrialPoint
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import ITEM_SCORES, TrialRecord

TRAJECTORY_DIR = "trajectory"  # artifact folder of a trial run
G_ID, F_OOD = "eval/g_id", "eval/f_ood"  # the objective's numbers at an intermediate evaluation
_POINT_ID = re.compile(r"^(?P<trial>.+)@(?P<step>\d+)$")


def trajectory_artifact(step: int) -> str:
    """The artifact path of the item scores a trial stored at optimizer step ``step``."""
    return f"{TRAJECTORY_DIR}/step-{int(step):06d}.json"


def point_id(trial_id: str, step: int) -> str:
    """The id of trial ``trial_id``'s point at intermediate step ``step``: ``<trial id>@<step>``."""
    return f"{trial_id}@{int(step)}"


def split_point_id(selector: str) -> tuple[str, int | None]:
    """``(trial id, step)`` of ``<trial id>@<step>``; ``(selector, None)`` for anything else."""
    match = _POINT_ID.match(selector)
    if match is None:
        return selector, None
    return match["trial"], int(match["step"])


def intermediate_step(point: TrialPoint) -> int | None:
    """The step of an intermediate trajectory point (``None`` for a trial's final point, or any other)."""
    step = point.params.get("step")
    if step is None or point.trial_id != point_id(split_point_id(point.trial_id)[0], int(step)):
        return None
    return int(step)


def log_checkpoint_items(client: Any, run_id: str, step: int, items: dict[str, Any]) -> None:
    """Store the item scores of the checkpoint at ``step`` on the trial run (compact JSON, one small file)."""
    tracking.log_json_artifact(client, run_id, trajectory_artifact(step), items, compact=True)


def point_item_scores(client: Any, point: TrialPoint) -> dict[str, Any] | None:
    """The stored item scores of a trajectory point: ``trajectory/step-<step>.json`` of an intermediate point,
    ``item_scores.json`` of a final one (``None`` when the run has no such artifact)."""
    if not point.run_id:
        return None
    step = intermediate_step(point)
    return tracking.download_json(client, point.run_id, ITEM_SCORES if step is None else trajectory_artifact(step))


def metric_steps(client: Any, record: TrialRecord, key: str) -> dict[int, float]:
    """``{step: value}`` of a logged metric: the record's ``history`` when it was read (``dashboards.
    sweep_data``), else MLflow's history, where a step logged twice (a restarted trial) keeps its last value."""
    if key in record.history:
        return {int(step): float(value) for step, value in record.history[key]}
    if client is None:
        return {}
    series = sorted(client.get_metric_history(record.run_id, key), key=lambda m: (m.timestamp, m.step))
    return {int(m.step): float(m.value) for m in series}


def final_step(client: Any, record: TrialRecord) -> int:
    """The step of a trial's final point: the steps it trained (``global_steps``), else its ``max_steps``, else the
    last step it logged a loss at."""
    if record.metrics.get("global_steps"):
        return int(record.metrics["global_steps"])
    try:
        return int(record.params["max_steps"])
    except (KeyError, ValueError):
        steps = metric_steps(client, record, "loss")
        return max(steps, default=0)


def trial_trajectory(client: Any, record: TrialRecord) -> list[TrialPoint]:
    """One finished trial's points: one per intermediate evaluation (``<trial id>@<step>``, from its logged
    ``eval/g_id`` and ``eval/f_ood``) in step order, then its final point; each with ``params["step"]``."""
    final = trial_point(record)
    last = final_step(client, record)
    g_id, f_ood = metric_steps(client, record, G_ID), metric_steps(client, record, F_OOD)
    points = [
        TrialPoint(
            point_id(record.trial_id, step),
            g_id[step],
            f_ood[step],
            params={**record.params, "step": step},
            run_id=record.run_id,
        )
        for step in sorted(set(g_id) & set(f_ood))
        if 0 < step < last and math.isfinite(g_id[step]) and math.isfinite(f_ood[step])
    ]
    return [*points, replace(final, params={**final.params, "step": last})]


def trajectory_points(records: Sequence[TrialRecord], client: Any = None) -> list[TrialPoint]:
    """The trajectory points of a sweep's finished trials (:func:`trial_trajectory` of each, in order).
    ``client`` reads the metric histories the records do not carry."""
    return [point for record in records if record.finished for point in trial_trajectory(client, record)]


def sweep_points(config: Any, records: Sequence[TrialRecord], client: Any = None) -> list[TrialPoint]:
    """The points a sweep's analysis ranks (:func:`rpsft.sweeps.analysis.uncertainty.analyze_sweep`): with
    ``evaluation.trajectory: true`` every scored checkpoint (:func:`trajectory_points`, each a candidate operating
    point), else each finished trial's final point (:func:`rpsft.sweeps.analysis.points.trial_points`)."""
    if config.evaluation.trajectory:
        return trajectory_points(records, client)
    return trial_points(records)
