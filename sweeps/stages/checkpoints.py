"""Kept checkpoints: which trials keep their weights, their MLflow Model Registry entries, and export.

With ``keep:`` set (see :class:`rpsft.sweeps.config.Keep`), every trial writes ``<sweep>/trials/<id>/model/`` (HF
safetensors + tokenizer). After each finished trial the driver deletes the weights of every trial that can no
longer be kept (:func:`prune`); at the end of the sweep the kept ones are logged to their trial's MLflow run
(artifact ``model/``), registered as versions of ``rpsft-<sweep>`` (tagged with the trial id, its knobs, Phi
and why it was kept), and their local copies removed: the artifact store holds them.

:func:`export_trial` writes any stored trial's weights to a directory: a kept trial's are downloaded; any other
trial is retrained from its stored config and seed (the sweep's own training and scoring code,
:func:`rpsft.sweeps.trial.run.train_and_score`) and its metrics are checked against the stored ones.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpsft.sweeps.analysis.selection import Selection, TrialPoint, select
from rpsft.sweeps.analysis.trajectory import intermediate_step
from rpsft.sweeps.analysis.uncertainty import _SEED_SUFFIX, TrialGroup, group_points
from rpsft.sweeps.config import SweepConfig, SweepConfigError
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import (
    MODEL_DIR,
    TAG_MODEL_VERSION,
    StoredSweep,
    SweepStore,
    TrialRecord,
    trial_points,
)

TAG_KEPT = "rpsft.kept"  # why a trial's weights were kept: operating_point, top-<n>, reference
EXPORT_RECORD = "rpsft_export.json"
COMPARED_METRICS = ("g_id", "f_ood")
DEFAULT_TOLERANCE = 1e-4  # absolute, on G_id and F_ood (mean token NLL differences)
OPERATING_POINT = ("op", "operating_point")


class ExportMismatch(SweepConfigError):
    """A retrained trial whose metrics differ from the stored ones by more than the tolerance."""


def registered_model_name(sweep: str) -> str:
    return f"rpsft-{sweep}"


def trial_model_dir(config: SweepConfig, trial_id: str) -> Path:
    """Deprecated: :meth:`rpsft.sweeps.store.sweep_store.SweepStore.trial_model_dir`."""
    warnings.warn(
        "rpsft.sweeps.stages.checkpoints.trial_model_dir is deprecated; use rpsft.sweeps.store.sweep_store.SweepStore.of(config).trial_model_dir",
        DeprecationWarning,
        stacklevel=2,
    )
    return SweepStore.of(config).trial_model_dir(trial_id)


# ----------------------------------------------------------------------------------------------- which


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


# ----------------------------------------------------------------------------------------------- export


def find_export_point(stored: StoredSweep, selector: str | None) -> tuple[TrialRecord, int | None]:
    """``(trial, step)``: the finished trial a selector names and, for an intermediate point of its trajectory
    (``<trial id>@<step>``, or ``op`` / ``best:<method>`` choosing one), that step; ``None`` for the trial's
    final weights (every selector of :func:`find_trial_run`)."""
    from rpsft.sweeps.analysis.trajectory import G_ID, final_step, metric_steps, split_point_id

    if selector is None or selector in OPERATING_POINT or selector.startswith("best:"):
        selection = stored.selection()
        if selector is None or selector in OPERATING_POINT:
            point = selection.best
        else:
            method = selector.removeprefix("best:")
            point = next((p for p in selection.ranking if p.params.get("method") == method), None)
        step = intermediate_step(point) if point is not None else None
        if step is None:
            return find_trial_run(stored, selector), None
        return next(t for t in stored.trials if t.run_id == point.run_id), step
    trial_id, step = split_point_id(selector)
    finished = [t for t in stored.trials if t.status == "FINISHED"]
    trial = next((t for t in finished if t.tags.get(tracking.TAG_TRIAL) == trial_id), None)
    if step is None or trial is None:
        return find_trial_run(stored, selector), None
    if step == final_step(stored.client, trial):
        return trial, None
    evaluated = sorted(metric_steps(stored.client, trial, G_ID))
    if step not in evaluated:
        raise SweepConfigError(
            f"trial: {selector!r}: trial {trial_id} has no intermediate evaluation at step {step}. Fix: one of "
            + ", ".join(f"{trial_id}@{s}" for s in evaluated if s < final_step(stored.client, trial))
            + f" (evaluation.every), or {trial_id} for its final weights"
        )
    return trial, step


def export_name(trial: TrialRecord, step: int | None) -> str:
    """The name of an export: the trial id, or ``<trial id>@<step>`` for a point of its trajectory."""
    from rpsft.sweeps.analysis.trajectory import point_id

    return trial.trial_id if step is None else point_id(trial.trial_id, step)


def find_trial_run(stored: StoredSweep, selector: str | None) -> TrialRecord:
    """The finished trial a selector names: ``op`` (the operating point, the default), ``best:<method>`` (that
    method's best configuration by Phi), a trial id, a reference label (``sft``, ``rpsft k=32 lambda=100
    layers=all``; its first seed), or a method's first reference."""
    trials = [t for t in stored.trials if t.status == "FINISHED"]
    if selector is None or selector in OPERATING_POINT:
        chosen = stored.selection().best.run_id
        return next(t for t in trials if t.run_id == chosen)
    if selector.startswith("best:"):  # the best configuration of one method, by Phi at the sweep's beta
        method = selector.removeprefix("best:")
        ranked = [p for p in stored.selection().ranking if p.params.get("method") == method]
        if ranked:
            return next(t for t in trials if t.run_id == ranked[0].run_id)
    for trial in trials:
        if trial.tags.get(tracking.TAG_TRIAL) == selector:
            return trial
    for trial in trials:  # a reference label, its first seed
        if trial.reference and _SEED_SUFFIX.sub("", trial.reference) == selector:
            return trial
    for trial in trials:  # a method's first reference
        if trial.reference and trial.params.get("method") == selector:
            return trial
    known = sorted({t.tags.get(tracking.TAG_TRIAL, "") for t in trials})
    raise SweepConfigError(
        f"trial: no finished trial {selector!r} in sweep {stored.config.name!r}. Fix: 'op' (the operating "
        f"point), 'best:rpsft', a reference name such as 'sft', or a trial id: {', '.join(known)}"
    )


@dataclass
class Export:
    trial_id: str
    run_id: str
    path: Path
    source: str  # "kept" (downloaded) or "retrained"
    stored: dict[str, float]
    retrained: dict[str, float]
    tolerance: float

    @property
    def differences(self) -> dict[str, float]:
        return {k: abs(self.retrained[k] - self.stored[k]) for k in self.retrained if k in self.stored}

    @property
    def matches(self) -> bool:
        return all(d <= self.tolerance for d in self.differences.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "run_id": self.run_id,
            "source": self.source,
            "stored": self.stored,
            "retrained": self.retrained,
            "differences": self.differences,
            "tolerance": self.tolerance,
            "matches": self.matches,
        }


def _move_contents(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(item), target)


def _stored_trial_config(client: Any, run_id: str) -> dict[str, Any]:
    from rpsft.sweeps.store.tracking import download_json

    raw = download_json(client, run_id, "trial_config.json")
    if raw is None:
        raise SweepConfigError(
            f"trial: run {run_id} has no trial_config.json artifact, so it cannot be retrained"
        )
    return raw


def export_trial(
    stored: Any, selector: str | None, out: str | Path, tolerance: float = DEFAULT_TOLERANCE, echo=print
) -> Export:
    """Write a stored trial's weights (safetensors + tokenizer) to ``out``: downloaded when kept, otherwise
    retrained deterministically and checked against the stored G_id and F_ood (raises
    :class:`ExportMismatch` past ``tolerance``, after writing the weights and ``rpsft_export.json``). A point
    of a trial's trajectory (``<trial id>@<step>``) is always retrained, with ``stop_at_step``, and checked
    against the ``eval/g_id`` and ``eval/f_ood`` its trial logged at that step."""
    client = stored.client
    trial, step = find_export_point(stored, selector)
    run_id, trial_id = trial.run_id, export_name(trial, step)
    out = Path(out).expanduser().resolve()
    stored_metrics = {k: trial.metrics[k] for k in COMPARED_METRICS if k in trial.metrics}
    if step is not None:
        from rpsft.sweeps.analysis.trajectory import metric_steps

        stored_metrics = {k: metric_steps(client, trial, f"eval/{k}")[step] for k in COMPARED_METRICS}
        echo(f"[rpsft] export: {trial_id} is a point of its trial's trajectory; retraining up to step {step}")
        retrained = retrain_trial(stored, trial, out, stop_at_step=step)
        export = Export(trial_id, run_id, out, "retrained", stored_metrics, retrained, tolerance)
    elif trial.kept_version:
        with tempfile.TemporaryDirectory() as tmp:
            _move_contents(Path(client.download_artifacts(run_id, MODEL_DIR, tmp)), out)
        export = Export(trial_id, run_id, out, "kept", stored_metrics, {}, tolerance)
    else:
        echo(
            f"[rpsft] export: trial {trial_id} kept no weights; retraining it from its stored config and seed"
        )
        retrained = retrain_trial(stored, trial, out)
        export = Export(trial_id, run_id, out, "retrained", stored_metrics, retrained, tolerance)
    (out / EXPORT_RECORD).write_text(json.dumps(export.to_dict(), indent=2))
    if not export.matches:
        raise ExportMismatch(
            f"trial {trial_id}: the retrained metrics differ from the stored ones by "
            + ", ".join(f"{k} {d:.2e}" for k, d in export.differences.items())
            + f" (tolerance {tolerance:g}); the weights are in {out}. Fix: retrain on the sweep's hardware and "
            "thread count, or a larger --tolerance if the difference is expected"
        )
    return export


def retrain_trial(
    stored: StoredSweep, trial: TrialRecord, out: Path, stop_at_step: int | None = None
) -> dict[str, float]:
    """Retrain one trial as the sweep did (its stored TrainConfig, seed and thread count), up to
    ``stop_at_step`` when given (the full run's schedule); save the weights to ``out`` and return its G_id and
    F_ood."""
    from rpsft.core.config import TrainConfig
    from rpsft.sweeps.trial.run import _torch_threads, train_and_score
    from rpsft.sweeps.trial.scoring import TrialScorer

    config, context = stored.config, stored.context
    raw = _stored_trial_config(stored.client, trial.run_id)
    _torch_threads(config.resources.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"output_dir": tmp, "save_model": False, "checkpoint_every": None}
        train_config = TrainConfig.model_validate({**raw, **overrides, "stop_at_step": stop_at_step})
        scorer = TrialScorer(config, context.base_key, context.cache_dir)
        result, metrics, _ = train_and_score(config, context, train_config, scorer)
        scored = {**metrics, **scorer.primary(metrics)}
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out, safe_serialization=True)
    result.tokenizer.save_pretrained(out)
    return {k: float(scored[k]) for k in COMPARED_METRICS if k in scored}


def local_checkpoint(stored: StoredSweep, selector: str | None, work_dir: Path) -> tuple[TrialRecord, Path]:
    """``(trial, directory)`` of a trial's weights for a later stage (RL): a kept trial's, downloaded into
    ``work_dir``, or an earlier ``rpsft export`` into ``<sweep>/exports/<trial id>`` (``<trial id>@<step>`` for
    a point of its trajectory)."""
    trial, step = find_export_point(stored, selector)
    trial_id = export_name(trial, step)
    exported = stored.store.export_dir(trial_id)
    if (exported / "config.json").is_file():
        return trial, exported
    if trial.kept_version and step is None:
        target = work_dir / trial_id
        if not (target / "config.json").is_file():
            with tempfile.TemporaryDirectory() as tmp:
                _move_contents(Path(stored.client.download_artifacts(trial.run_id, MODEL_DIR, tmp)), target)
        return trial, target
    raise SweepConfigError(
        f"trial: {selector or 'op'} (trial {trial_id}) kept no weights. Fix: `rpsft export {stored.config.name} "
        f"--trial {trial_id}` (retrains it into {exported}), or rerun the sweep with keep: set"
    )
