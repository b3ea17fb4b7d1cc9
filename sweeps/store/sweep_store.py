"""A sweep as stored: its directory, its state file, and its trials read once from MLflow as typed records.

Everything of a sweep lives under ``<output_dir>/<name>/`` (:class:`SweepStore` names each path): ``sweep.json``
(config, MLflow ids, shared context), ``tune/`` (Ray Tune's experiment), ``optuna.db`` (default Optuna
storage), ``driver.lock``, ``trials/<trial id>/`` (each trial's training output; ``model/`` while its weights
may still be kept), ``bases/`` (pretrained bases shared by all trials), ``rotation_base.pt`` (the base model's
subspaces for the rotation diagnostic), ``base_item_scores.json``, ``intervals.json``, ``exports/<trial id>/``
(``rpsft export``) and ``rl/`` (``rpsft rl``: ``inits/`` and one directory per RL run).

A trial run of MLflow is read into one :class:`TrialRecord` (frozen): selection, the report, regression, warm
starts, checkpoints and RL all read the same records, and its Phi is :func:`rpsft.evaluation.metrics.phi`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpsft.evaluation.metrics import phi
from rpsft.sweeps.analysis.selection import Selection, TrialPoint, select
from rpsft.sweeps.config import SweepConfig, SweepConfigError, parse_sweep_config
from rpsft.sweeps.store import tracking

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
LOCK_FILE = "driver.lock"
OPTUNA_DB = "optuna.db"
TRIALS_DIR = "trials"
MODEL_DIR = "model"  # a trial's weights under its directory, and the artifact path in its MLflow run
BASES_DIR = "bases"
ROTATION_BASE = "rotation_base.pt"
BASE_ITEM_SCORES = "base_item_scores.json"
INTERVALS = "intervals.json"
EXPORTS_DIR = "exports"
RL_DIR = "rl"
DEFAULT_ROOT = "runs/sweeps"
TAG_MODEL_VERSION = "rpsft.model_version"  # the registered model version of a trial's kept weights


# ----------------------------------------------------------------------------------------------- context


@dataclass
class SweepContext:
    """What every trial of a sweep shares (paths are absolute); stored in ``sweep.json``."""

    config: dict[str, Any]  # SweepConfig, JSON-ready
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_key: str
    cache_dir: str
    bases_dir: str
    auto_k: dict[str, float] = field(default_factory=dict)  # "auto@x" -> resolved fraction


# ----------------------------------------------------------------------------------------------- records


def trial_label(params: Mapping[str, Any]) -> str:
    """A short name of a trial from its parameters: ``rpsft k=64 lambda=4.31 layers=attn period=1`` (and
    ``penalty_mode=decoupled`` for a decoupled one; the default ``loss`` is not named; ``step=N`` last for a point
    of a trial's trajectory, :mod:`rpsft.sweeps.analysis.trajectory`)."""
    step = f" step={params['step']}" if params.get("step") not in (None, "", "None") else ""
    if params.get("reference"):
        return f"[ref] {params['reference']}{step}"
    parts = [params.get("method", "rpsft")]
    for key in ("k", "lambda", "layers", "period"):
        if key in params:
            value = params[key]
            try:
                value = f"{float(value):.3g}" if key == "lambda" else value
            except ValueError:
                pass
            parts.append(f"{key}={value}")
    if params.get("penalty_mode") not in (None, "", "None", "loss"):
        parts.append(f"penalty_mode={params['penalty_mode']}")
    return " ".join(parts) + step


# "step": a trajectory point's optimizer step (rpsft.sweeps.analysis.trajectory), so two steps of one trial are two
# configurations; trials' own params never carry it. "optimizer" / "learning_rate": a reference may set its own.
KNOBS = (
    "method", "k", "lambda", "layers", "period", "penalty_mode", "lora_r", "optimizer", "max_steps", "learning_rate",
    "step",
)  # fmt: skip


@dataclass(frozen=True)
class TrialRecord:
    """One trial run of a sweep as MLflow stores it: ids, label, status, params, final metrics and tags.

    ``params`` leave out the values MLflow holds as ``"None"`` or ``""``; ``history`` (per-step series, see
    ``rpsft.dashboards.sweep_data``) is empty unless it was read."""

    trial_id: str
    run_id: str
    label: str
    status: str  # MLflow's: FINISHED, RUNNING, FAILED, KILLED
    state: str  # rpsft.state: finished, early-stopped, failed, restarted, ...
    reference: str  # the reference label (``sft seed=0``), "" for a searched trial
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict, compare=False)
    tags: dict[str, str] = field(default_factory=dict, compare=False)
    failure: str = ""
    start_time: int | None = None  # MLflow's, ms since the epoch
    end_time: int | None = None

    @classmethod
    def from_run(cls, run: Any) -> TrialRecord:
        tags = dict(run.data.tags)
        params = {k: v for k, v in run.data.params.items() if v not in ("None", "")}
        return cls(
            trial_id=tags.get(tracking.TAG_TRIAL) or run.info.run_id,
            run_id=run.info.run_id,
            label=trial_label(params),
            status=run.info.status,
            state=tags.get(tracking.TAG_STATE, ""),
            reference=tags.get(tracking.TAG_REFERENCE, ""),
            params=params,
            metrics={k: float(v) for k, v in run.data.metrics.items()},
            tags=tags,
            failure=tags.get(tracking.TAG_FAILURE, ""),
            start_time=run.info.start_time,
            end_time=run.info.end_time,
        )

    @property
    def method(self) -> str:
        return self.params.get("method", "rpsft")

    @property
    def seed(self) -> int | None:
        try:
            return int(self.params["seed"])
        except (KeyError, ValueError):
            return None

    @property
    def knobs(self) -> dict[str, str]:
        """The knobs that make a configuration (not the seed), as logged."""
        return {key: self.params[key] for key in KNOBS if key in self.params}

    @property
    def g_id(self) -> float | None:
        return self.metrics.get("g_id")

    @property
    def f_ood(self) -> float | None:
        return self.metrics.get("f_ood")

    @property
    def finished(self) -> bool:
        """A FINISHED run that carries G_id and F_ood."""
        return self.status == "FINISHED" and self.g_id is not None and self.f_ood is not None

    @property
    def done(self) -> bool:
        """The trial ran to its end: finished, or stopped early by the scheduler."""
        return self.status == "FINISHED" or self.state == "early-stopped"

    @property
    def wall_seconds(self) -> float | None:
        """Seconds from the run's start to its end (``None`` while it runs)."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time) / 1000

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    @property
    def kept_version(self) -> str | None:
        """The model version its kept weights were registered as (``rpsft.model_version``)."""
        return self.tags.get(TAG_MODEL_VERSION)

    def phi(self, beta: float) -> float | None:
        if self.g_id is None or self.f_ood is None:
            return None
        return phi(self.g_id, self.f_ood, beta)

    @property
    def k_value(self) -> float | None:
        """The k a trial trained with, as a number (``k_resolved`` for ``auto`` specs)."""
        for key in ("k_resolved", "k"):
            try:
                return float(self.params[key])
            except (KeyError, ValueError):
                continue
        return None

    @property
    def lam(self) -> float | None:
        try:
            return float(self.params["lambda"])
        except (KeyError, ValueError):
            return None

    def point(self) -> TrialPoint:
        """This finished trial as a selection point (see :attr:`finished`)."""
        if not self.finished:
            raise ValueError(f"trial {self.trial_id}: no finished G_id and F_ood to select on")
        return TrialPoint(self.trial_id, self.g_id, self.f_ood, params=dict(self.params), run_id=self.run_id)


def trial_points(records: Sequence[TrialRecord]) -> list[TrialPoint]:
    """The finished trials that carry ``g_id`` and ``f_ood``, as selection points."""
    return [record.point() for record in records if record.finished]


def read_trials(
    client: Any, experiment_id: str, parent_run_id: str, role: str = "trial"
) -> list[TrialRecord]:
    """The child runs of a sweep's parent run with ``role`` (see :func:`rpsft.sweeps.store.tracking.child_runs`), in start
    order, as records."""
    records = [
        TrialRecord.from_run(run)
        for run in tracking.child_runs(client, experiment_id, parent_run_id, role=role)
    ]
    return sorted(records, key=lambda record: record.start_time or 0)


# ----------------------------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class SweepStore:
    """The directory of one sweep, ``<root>/<name>/``, and everything in it."""

    root: Path
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @classmethod
    def of(cls, config: SweepConfig) -> SweepStore:
        return cls(Path(config.output_dir), config.name)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def tune_dir(self) -> Path:
        return self.dir / TUNE_DIR

    @property
    def lock_file(self) -> Path:
        return self.dir / LOCK_FILE

    @property
    def optuna_db(self) -> Path:
        return self.dir / OPTUNA_DB

    @property
    def bases_dir(self) -> Path:
        return self.dir / BASES_DIR

    @property
    def rotation_base(self) -> Path:
        """The base model's top-K left subspaces, computed once by the driver for the rotation diagnostic."""
        return self.dir / ROTATION_BASE

    @property
    def base_item_scores(self) -> Path:
        return self.dir / BASE_ITEM_SCORES

    @property
    def intervals(self) -> Path:
        return self.dir / INTERVALS

    def trial_dir(self, trial_id: str) -> Path:
        return self.dir / TRIALS_DIR / trial_id

    def trial_model_dir(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / MODEL_DIR

    def export_dir(self, trial_id: str) -> Path:
        return self.dir / EXPORTS_DIR / trial_id

    @property
    def rl_dir(self) -> Path:
        return self.dir / RL_DIR

    @property
    def rl_inits_dir(self) -> Path:
        return self.rl_dir / "inits"

    # ------------------------------------------------------------------------------------------- state

    def exists(self) -> bool:
        return self.state_file.is_file()

    def write_state(self, config: SweepConfig, context: SweepContext, status: str, optuna_url: str) -> None:
        state = {
            "name": config.name,
            "status": status,
            "optuna_storage": optuna_url,
            "context": context.__dict__,
        }
        write_json(self.state_file, state, indent=2)

    def read_state(self) -> dict[str, Any]:
        if not self.exists():
            raise SweepConfigError(
                f"name: no sweep {self.name!r} under {self.root} ({self.state_file} is missing). "
                "Fix: the name given to `rpsft sweep run`, and --runs-dir if it used another output_dir"
            )
        return json.loads(self.state_file.read_text())

    def status(self) -> str | None:
        """``running``, ``incomplete`` or ``finished``; ``None`` before the sweep has run."""
        return self.read_state().get("status") if self.exists() else None

    def context(self) -> SweepContext:
        return SweepContext(**self.read_state()["context"])

    def config(self, context: SweepContext | None = None) -> SweepConfig:
        return parse_sweep_config((context or self.context()).config, f"{self.name}/{STATE_FILE}")

    def load(self) -> StoredSweep:
        """The sweep's config and context from ``sweep.json``, its trials from MLflow (read once), its analysis."""
        context = self.context()
        return StoredSweep.read(self, self.config(context), context)


def write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write ``payload`` to ``path`` atomically (a partial file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)


@dataclass
class StoredSweep:
    """A sweep as stored: its config and context (from ``sweep.json``), its trial records (from MLflow), and its
    finished trials grouped by configuration (seeds pooled) with their intervals."""

    store: SweepStore
    config: SweepConfig
    context: SweepContext
    trials: list[TrialRecord]
    analysis: Any  # rpsft.sweeps.analysis.uncertainty.SweepAnalysis

    @classmethod
    def read(cls, store: SweepStore, config: SweepConfig, context: SweepContext) -> StoredSweep:
        from rpsft.sweeps.analysis.trajectory import sweep_points
        from rpsft.sweeps.analysis.uncertainty import analyze_sweep

        client = tracking.client_for(context.tracking_uri)
        trials = read_trials(client, context.experiment_id, context.parent_run_id)
        points = sweep_points(config, trials, client)  # every scored checkpoint with evaluation.trajectory
        analysis = analyze_sweep(config, client, context.parent_run_id, points)
        return cls(store, config, context, trials, analysis)

    @property
    def client(self) -> Any:
        return tracking.client_for(self.context.tracking_uri)

    @property
    def points(self) -> list[TrialPoint]:
        """One point per configuration with G_id and F_ood (the mean over its seeds), on the selection items
        when the items are split (``evaluation.split``; see :class:`rpsft.sweeps.analysis.uncertainty.SweepAnalysis`)."""
        return self.analysis.points

    def selection(self, beta: float | None = None) -> Selection:
        if not self.points:
            raise ValueError(
                f"select: sweep {self.config.name!r} has no finished trial with G_id and F_ood yet"
            )
        return select(self.points, self.config.objective.beta if beta is None else beta).attach(self.analysis)

    def base_metrics(self) -> dict[str, float]:
        """The base model's per-benchmark numbers (trial metric names), from the parent run's ``base/`` metrics."""
        parent = self.client.get_run(self.context.parent_run_id)
        prefix = tracking.BASE_PREFIX
        return {k.removeprefix(prefix): v for k, v in parent.data.metrics.items() if k.startswith(prefix)}

    def rl_runs(self) -> list[TrialRecord]:
        """The sweep's finished RL runs (``rpsft rl``), as records."""
        runs = read_trials(self.client, self.context.experiment_id, self.context.parent_run_id, role="rl")
        return [run for run in runs if run.status == "FINISHED"]


def load_stored_sweep(name: str, root: str | Path = DEFAULT_ROOT) -> StoredSweep:
    return SweepStore(Path(root), name).load()
