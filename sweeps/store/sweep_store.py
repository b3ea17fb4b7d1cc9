"""A sweep's persisted state, read and written only through :class:`SweepStore`.

A sweep persists in two places: its directory ``<output_dir>/<name>/`` and its MLflow experiment (a parent run
per sweep, a child run per trial, :mod:`rpsft.sweeps.store.tracking`). :class:`SweepStore` is the one
interface to both, in the manner of Optuna's ``BaseStorage``: every other module asks it for a path, the
state, or the trial records, and no other module builds a path under the sweep directory or opens
``sweep.json`` itself.

The directory holds (each path named by a :class:`SweepStore` property or method): ``sweep.json`` (the state
file: config, MLflow ids, shared context, status), ``tune/`` (Ray Tune's experiment), ``optuna.db`` (default
Optuna storage), ``driver.lock``, ``trials/<trial id>/`` (each trial's training output; ``model/`` while its
weights may still be kept), ``ray_train/`` (Ray Train's runs of trials over several workers), ``bases/``
(pretrained bases shared by all trials), ``rotation_base.pt`` (the base model's subspaces for the rotation
diagnostic), ``base_item_scores.json``, ``intervals.json``, ``exports/<trial id>/`` (``rpsft export``) and
``rl/`` (``rpsft rl``: ``inits/`` and one directory per RL run).

Contract:

* A store is a value: ``SweepStore(root, name)`` with ``root`` resolved once, so two spellings of one directory
  are one store. Building one touches nothing on disk; paths are only named, never created, except by the
  writers below.
* ``sweep.json`` exists from the first :meth:`SweepStore.write_state` on; before it, :meth:`SweepStore.exists`
  is False, :meth:`SweepStore.status` is None, and every other reader of the state raises
  :class:`rpsft.sweeps.config.errors.SweepConfigError` naming the sweep and the fix.
* Writers replace a whole file atomically (a partial file renamed into place): a reader sees the old file or
  the new one, never a part.
* Trial records are read from MLflow on each call (nothing is cached here), into frozen :class:`TrialRecord`
  objects in start order; selection, the report, regression, warm starts, checkpoints and RL all read the
  same records, and a record's Phi is :func:`rpsft.evaluation.metrics.phi`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpsft.evaluation.metrics import phi
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig, parse_sweep_config
from rpsft.sweeps.store import tracking

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
LOCK_FILE = "driver.lock"
OPTUNA_DB = "optuna.db"
TRIALS_DIR = "trials"
MODEL_DIR = "model"  # a trial's weights under its directory, and the artifact path in its MLflow run
RAY_TRAIN_DIR = "ray_train"
BASES_DIR = "bases"
ROTATION_BASE = "rotation_base.pt"
BASE_ITEM_SCORES = "base_item_scores.json"  # also the artifact of the sweep's parent run
INTERVALS = "intervals.json"  # also the artifact of the sweep's parent run
EXPORTS_DIR = "exports"
RL_DIR = "rl"
ITEM_SCORES = "item_scores.json"  # a trial run's artifact: its per-item scores
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


# ----------------------------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class SweepStore:
    """The persisted state of one sweep: its directory ``<root>/<name>/`` and its trial records in MLflow."""

    root: Path
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @classmethod
    def of(cls, config: SweepConfig) -> SweepStore:
        """The store of a config's sweep: ``<output_dir>/<name>`` (:meth:`SweepConfig.sweep_dir`)."""
        return cls(Path(config.output_dir), config.name)

    # ------------------------------------------------------------------------------------------- layout

    @property
    def dir(self) -> Path:
        """The sweep's directory, ``<root>/<name>``."""
        return self.root / self.name

    @property
    def state_file(self) -> Path:
        """``sweep.json``: written by :meth:`write_state`, read by :meth:`read_state`."""
        return self.dir / STATE_FILE

    @property
    def tune_dir(self) -> Path:
        """Ray Tune's experiment (restored on resume)."""
        return self.dir / TUNE_DIR

    @property
    def lock_file(self) -> Path:
        """The file the running driver holds locked."""
        return self.dir / LOCK_FILE

    @property
    def optuna_db(self) -> Path:
        """The default (SQLite) Optuna storage."""
        return self.dir / OPTUNA_DB

    @property
    def bases_dir(self) -> Path:
        """The pretrained bases every trial shares."""
        return self.dir / BASES_DIR

    @property
    def rotation_base(self) -> Path:
        """The base model's top-K left subspaces, computed once by the driver for the rotation diagnostic."""
        return self.dir / ROTATION_BASE

    @property
    def base_item_scores(self) -> Path:
        """The base model's per-item scores: written by :meth:`write_base_item_scores`."""
        return self.dir / BASE_ITEM_SCORES

    @property
    def intervals(self) -> Path:
        """Every configuration's intervals: written by :meth:`write_intervals`."""
        return self.dir / INTERVALS

    @property
    def ray_train_dir(self) -> Path:
        """Ray Train's runs of the trials over several workers (``train-<trial id>``)."""
        return self.dir / RAY_TRAIN_DIR

    def trial_dir(self, trial_id: str) -> Path:
        """A trial's training output (its checkpoints)."""
        return self.dir / TRIALS_DIR / trial_id

    def trial_model_dir(self, trial_id: str) -> Path:
        """A trial's saved weights, while they may still be kept."""
        return self.trial_dir(trial_id) / MODEL_DIR

    def export_dir(self, trial_id: str) -> Path:
        """Where ``rpsft export`` writes a trial's (or a trajectory point's) weights."""
        return self.dir / EXPORTS_DIR / trial_id

    @property
    def rl_dir(self) -> Path:
        """The RL stage's runs, one directory each."""
        return self.dir / RL_DIR

    @property
    def rl_inits_dir(self) -> Path:
        """The kept weights RL starts from, downloaded."""
        return self.rl_dir / "inits"

    # ------------------------------------------------------------------------------------------- state

    def exists(self) -> bool:
        """Whether the sweep has a state file (it has started once)."""
        return self.state_file.is_file()

    def write_state(self, config: SweepConfig, context: SweepContext, status: str, optuna_url: str) -> None:
        """Write ``sweep.json``: the sweep's name, ``status`` (``running``, ``incomplete`` or ``finished``), its
        Optuna storage URL and ``context`` (which holds the config)."""
        state = {
            "name": config.name,
            "status": status,
            "optuna_storage": optuna_url,
            "context": context.__dict__,
        }
        _write_json(self.state_file, state, indent=2)

    def read_state(self) -> dict[str, Any]:
        """``sweep.json`` as written by :meth:`write_state`; raises :class:`SweepConfigError` (naming the fix)
        when the sweep has none."""
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
        """The context every trial shares, from ``sweep.json``."""
        return SweepContext(**self.read_state()["context"])

    def config(self, context: SweepContext | None = None) -> SweepConfig:
        """The sweep's config as stored (in ``context``, read from ``sweep.json`` when not given), validated."""
        return parse_sweep_config((context or self.context()).config, f"{self.name}/{STATE_FILE}")

    # ------------------------------------------------------------------------------------------- records

    def write_base_item_scores(self, scores: Mapping[str, Any]) -> None:
        """Write the base model's per-item scores (the driver, once per sweep)."""
        _write_json(self.base_item_scores, scores)

    def read_base_item_scores(self) -> dict[str, Any] | None:
        """The base model's per-item scores as written by :meth:`write_base_item_scores`; ``None`` when this
        directory has none (the sweep's parent run holds them too, as the artifact ``base_item_scores.json``)."""
        return json.loads(self.base_item_scores.read_text()) if self.base_item_scores.is_file() else None

    def write_intervals(self, intervals: Mapping[str, Any]) -> None:
        """Write every configuration's intervals (the driver, at the sweep's end)."""
        _write_json(self.intervals, intervals)

    def trials(self, context: SweepContext | None = None, role: str = "trial") -> list[TrialRecord]:
        """The sweep's child runs with ``role`` (``trial``, or ``rl`` for the RL stage's runs; see
        :func:`rpsft.sweeps.store.tracking.child_runs`), any status, in start order, read from MLflow now;
        ``context`` (read from ``sweep.json`` when not given) names the tracking server and the parent run."""
        context = context or self.context()
        client = tracking.client_for(context.tracking_uri)
        runs = tracking.child_runs(client, context.experiment_id, context.parent_run_id, role=role)
        return sorted((TrialRecord.from_run(run) for run in runs), key=lambda record: record.start_time or 0)


def _write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write ``payload`` to ``path`` atomically (a partial file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)
