"""Which trials keep their weights (``keep:``), and the kept ones in the MLflow Model Registry.

With ``keep:`` set (see :class:`rpsft.sweeps.config.sections.Keep`), every trial writes ``<sweep>/trials/<id>/model/`` (HF
safetensors + tokenizer). After each finished trial the driver deletes the weights of every trial that can no
longer be kept (:func:`prune`, from :class:`rpsft.sweeps.search.pruning.CheckpointPruner`); at the end of the
sweep (:func:`keep_checkpoints`) the kept ones are logged to their trial's MLflow run (artifact ``model/``),
registered as versions of ``rpsft-<sweep>`` (tagged with the trial id, its knobs, Phi and why it was kept), and
their local copies removed: the artifact store holds them. ``rpsft export``
(:mod:`rpsft.sweeps.stages.checkpoints`) reads them back.
"""

from __future__ import annotations

import math
import shutil
from typing import Any

from rpsft.sweeps.analysis.points import trial_points
from rpsft.sweeps.analysis.selection import Selection, TrialPoint, select
from rpsft.sweeps.analysis.trajectory import intermediate_step
from rpsft.sweeps.analysis.uncertainty import _SEED_SUFFIX, TrialGroup, group_points
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import MODEL_DIR, TAG_MODEL_VERSION, SweepStore, TrialRecord

TAG_KEPT = "rpsft.kept"  # why a trial's weights were kept: operating_point, top-<n>, reference


def registered_model_name(sweep: str) -> str:
    return f"rpsft-{sweep}"


def expected_seeds(config: SweepConfig) -> dict[str, int]:
    """How many runs each reference configuration has when complete (``seeds:`` runs it once per seed)."""
    counts: dict[str, int] = {}
    for params in config.reference_params():
        label = _SEED_SUFFIX.sub("", params["reference"])
        counts[label] = counts.get(label, 0) + 1
    return counts


def _complete(group: TrialGroup, expected: dict[str, int]) -> bool:
    reference = _SEED_SUFFIX.sub("", str(group.members[0].params.get("reference") or ""))
    return len(group.members) >= expected.get(reference, 1) if reference else True


def kept_roles(
    config: SweepConfig, selection: Selection | None, groups: list[TrialGroup]
) -> dict[str, list[str]]:
    """``{run id: [why it is kept, ...]}``. A configuration of several seeds keeps its first seed's run. An
    intermediate trajectory point (``<trial id>@<step>``) keeps nothing: its weights never existed on disk
    (:func:`trajectory_roles`; ``rpsft export`` retrains them)."""
    keep = config.keep
    roles: dict[str, list[str]] = {}

    def add(point: TrialPoint, role: str) -> None:
        if point.run_id and intermediate_step(point) is None:
            roles.setdefault(point.run_id, []).append(role)

    for point, role in _chosen_roles(config, selection):
        add(point, role)
    if keep.references:
        for group in groups:
            if group.members[0].params.get("reference"):
                add(group.members[0], "reference")
    return roles


def _chosen_roles(config: SweepConfig, selection: Selection | None) -> list[tuple[TrialPoint, str]]:
    """The points ``keep.operating_point`` and ``keep.top`` name, with their roles."""
    if selection is None:
        return []
    chosen = [(selection.best, "operating_point")] if config.keep.operating_point else []
    top = selection.ranking[: config.keep.top]
    return chosen + [(p, f"top-{rank}") for rank, p in enumerate(top, start=1)]


def trajectory_roles(config: SweepConfig, selection: Selection | None) -> list[tuple[TrialPoint, str]]:
    """The kept roles that fall on intermediate trajectory points (not kept: exported by retraining)."""
    return [(p, role) for p, role in _chosen_roles(config, selection) if intermediate_step(p) is not None]


def _selection(
    config: SweepConfig, groups: list[TrialGroup], points: list[TrialPoint] | None = None
) -> Selection | None:
    """The choice as it stands: on ``points`` (the selection-item points of
    :func:`rpsft.sweeps.analysis.uncertainty.analyze_sweep`) when given, else on the configurations' means on all items."""
    points = points if points is not None else [g.point for g in groups]
    usable = [p for p in points if math.isfinite(p.g_id) and math.isfinite(p.f_ood)]
    return select(usable, config.objective.beta) if usable else None


def prune(
    config: SweepConfig,
    trials: list[TrialRecord],
    final: bool,
    selection: Selection | None = None,
    *,
    client: Any = None,
    parent_run_id: str | None = None,
    item_cache: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[str]]:
    """Delete the weights of every ended trial that is not kept; returns the kept ``{run id: roles}``.

    During the sweep (``final`` False) a configuration whose seeds have not all finished keeps its weights,
    since its mean may still rise; a running trial's directory is never touched. Without ``selection``, the
    choice is made as the sweep's end makes it: on the selection items when the items are split and
    ``client`` / ``parent_run_id`` can read the item scores (``item_cache`` saves downloads across calls), and
    among every scored checkpoint with ``evaluation.trajectory: true`` and a ``client``."""
    from rpsft.sweeps.analysis.trajectory import sweep_points

    groups = group_points(trial_points(trials))
    if selection is None:
        points = None
        if client is not None and parent_run_id and config.evaluation.split.report_fraction > 0:
            from rpsft.sweeps.analysis.uncertainty import analyze_sweep

            try:
                analysis = analyze_sweep(
                    config,
                    client,
                    parent_run_id,
                    sweep_points(config, trials, client),
                    draws=1,
                    item_cache=item_cache,
                )
            except ValueError:  # item scores that cannot be paired or split: delete nothing now
                return {}
            points = analysis.points
        elif client is not None and config.evaluation.trajectory:
            points = [g.point for g in group_points(sweep_points(config, trials, client))]
        selection = _selection(config, groups, points)
    kept = kept_roles(config, selection, groups)
    protected = set(kept)
    if not final:
        expected = expected_seeds(config)
        for group in groups:
            if not _complete(group, expected):
                protected.update(p.run_id for p in group.members if p.run_id)
    store = SweepStore.of(config)
    for trial in trials:
        if trial.running or trial.run_id in protected:
            continue
        shutil.rmtree(store.trial_model_dir(trial.trial_id), ignore_errors=True)
    return kept


# ----------------------------------------------------------------------------------------------- registry


def _ensure_registered_model(client: Any, name: str, sweep: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={tracking.TAG_SWEEP: sweep},
            description=f"Kept checkpoints of the rpsft sweep {sweep!r}",
        )


def _version_tags(config: SweepConfig, trial: TrialRecord, roles: list[str], beta: float) -> dict[str, str]:
    params = trial.params
    knobs = {
        key: params[key]
        for key in ("method", "k", "lambda", "layers", "period", "penalty_mode", "seed")
        if key in params
    }
    tags = {
        tracking.TAG_SWEEP: config.name,
        tracking.TAG_TRIAL: trial.tags.get(tracking.TAG_TRIAL, ""),
        TAG_KEPT: ",".join(roles),
        "rpsft.beta": f"{beta:g}",
        **{f"rpsft.{key}": str(value) for key, value in knobs.items()},
    }
    if trial.g_id is not None and trial.f_ood is not None:
        tags["rpsft.g_id"] = f"{trial.g_id:.6g}"
        tags["rpsft.f_ood"] = f"{trial.f_ood:.6g}"
        tags["rpsft.phi"] = f"{trial.phi(beta):.6g}"
    if trial.reference:
        tags[tracking.TAG_REFERENCE] = trial.reference
    return tags


def keep_checkpoints(
    config: SweepConfig, client: Any, trials: list[TrialRecord], selection: Selection | None, echo=print
) -> dict[str, str]:
    """At the end of a sweep: prune, then log and register the kept trials' weights. Returns ``{trial id:
    model version}`` of the versions registered now; a trial registered before (a resumed sweep) is skipped."""
    if not config.keep.any:
        return {}
    kept = prune(config, trials, final=True, selection=selection)
    for point, role in trajectory_roles(config, selection):
        echo(
            f"[rpsft] keep: the {role} {point.trial_id} is a point of its trial's trajectory, whose weights are "
            f"not stored; not registered. Fix: `rpsft export {config.name} --trial {point.trial_id}`"
        )
    by_id = {trial.run_id: trial for trial in trials}
    name = registered_model_name(config.name)
    store = SweepStore.of(config)
    registered: dict[str, str] = {}
    for run_id, roles in kept.items():
        trial = by_id[run_id]
        trial_id = trial.trial_id
        if trial.kept_version:
            continue
        local = store.trial_model_dir(trial_id)
        if not (local / "config.json").is_file():
            echo(
                f"[rpsft] keep: trial {trial_id} has no weights on disk (it ran without keep:); not registered"
            )
            continue
        client.log_artifacts(run_id, str(local), MODEL_DIR)
        _ensure_registered_model(client, name, config.name)
        version = client.create_model_version(
            name,
            source=f"runs:/{run_id}/{MODEL_DIR}",
            run_id=run_id,
            tags=_version_tags(config, trial, roles, config.objective.beta),
            description=f"trial {trial_id} ({', '.join(roles)})",
        )
        tracking.set_tags(
            client, run_id, {TAG_KEPT: ",".join(roles), TAG_MODEL_VERSION: str(version.version)}
        )
        shutil.rmtree(local, ignore_errors=True)
        registered[trial_id] = str(version.version)
        echo(f"[rpsft] keep: trial {trial_id} ({', '.join(roles)}) -> model {name} version {version.version}")
    return registered
