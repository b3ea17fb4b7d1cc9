"""Export: any stored trial's weights (or a point of its trajectory's) written to a directory.

:func:`export_trial` downloads a kept trial's weights (:mod:`rpsft.sweeps.retention` kept and registered them);
any other trial is retrained from its stored config and seed (the sweep's own training and scoring code,
:func:`rpsft.sweeps.trial.training.train_and_score`) and its metrics are checked against the stored ones.
:func:`local_checkpoint` finds a trial's weights for a later stage (RL).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpsft.sweeps.analysis.stored_sweep import StoredSweep
from rpsft.sweeps.analysis.trajectory import intermediate_step
from rpsft.sweeps.analysis.uncertainty import _SEED_SUFFIX
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.store import tracking
from rpsft.sweeps.store.sweep_store import MODEL_DIR, TrialRecord

EXPORT_RECORD = "rpsft_export.json"
COMPARED_METRICS = ("g_id", "f_ood")
DEFAULT_TOLERANCE = 1e-4  # absolute, on G_id and F_ood (mean token NLL differences)
OPERATING_POINT = ("op", "operating_point")


class ExportMismatch(SweepConfigError):
    """A retrained trial whose metrics differ from the stored ones by more than the tolerance."""


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
    def matches(self) -> bool | None:
        """Whether the retrained G_id and F_ood are the stored ones within the tolerance; ``None`` when nothing
        was compared (kept weights are downloaded as stored; a trial without stored metrics has nothing to
        compare with)."""
        if not self.differences:
            return None
        return all(d <= self.tolerance for d in self.differences.values())

    def check_text(self) -> str:
        """One line on what was checked: the differences against the tolerance, or why nothing was compared."""
        if self.matches is None:
            why = "kept weights, downloaded as stored" if self.source == "kept" else "no stored G_id / F_ood"
            return f"not compared ({why})"
        differences = ", ".join(f"{k} {d:.2e}" for k, d in self.differences.items())
        verdict = "within" if self.matches else "beyond"
        return f"{'matches' if self.matches else 'differs'}: {differences} ({verdict} tolerance {self.tolerance:g})"

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
    if export.matches is False:
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
    from rpsft.sweeps.trial.scoring import TrialScorer
    from rpsft.sweeps.trial.training import set_torch_threads, train_and_score

    config, context = stored.config, stored.context
    raw = _stored_trial_config(stored.client, trial.run_id)
    set_torch_threads(config.resources.cpus)
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
