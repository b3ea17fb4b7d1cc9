"""Typed sweep configuration (``rpsft sweep sweep.yaml``), validated before Ray, a model or a trial starts.

A sweep is: a model and SFT data, a training budget shared by all trials, a search space over the RPSFT knobs
(k, lambda, layer subset, period, penalty mode), reference trials that always run once (sft, l2-init, ...),
how trials are scored (loss-based trade-off, optionally the lm-eval harness), the objective (max Phi at the first beta, or the
Pareto front of ID gain vs OOD forgetting), and where things run and are stored.

Every trial's :class:`TrainConfig` is built by :meth:`SweepConfig.trial_train_config`; the config validator
builds it for every reference and every corner of the space, so a value training would reject fails here,
with the sweep field named (``space.lambda``, ``references[1]``, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from rpsft.core.config import ConfigError, Resources, TrainConfig, format_validation_error
from rpsft.core.config import read_yaml_mapping as read_config_mapping
from rpsft.core.method_table import method_spec
from rpsft.core.selection import LayerSpec
from rpsft.sweeps.config.errors import SweepConfigError, SweepName
from rpsft.sweeps.config.evaluation import EvaluationConfig
from rpsft.sweeps.config.sections import Failure, Keep, Objective, Scheduler, Search, Storage
from rpsft.sweeps.config.space import NumberRange, Reference, SearchSpace, layer_label
from rpsft.sweeps.trial.hooks import HookSpec

# TrainConfig fields a trial sets itself (from the search space, the reference, or the sweep)
TRIAL_FIELDS = (
    "model",
    "data",
    "method",
    "k",
    "lambda",
    "lam",
    "layers",
    "period",
    "penalty_mode",
    "seed",
    "output_dir",
    "resources",
)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: SweepName
    model: str = "smollm2-135m-instruct"
    data: str = "demo-math:256"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared by all trials")
    space: SearchSpace = Field(default_factory=SearchSpace)
    references: list[Reference] = Field(default_factory=lambda: [Reference(method="sft")])
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    objective: Objective = Field(default_factory=Objective)
    search: Search = Field(default_factory=Search)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    concurrency: int = Field(1, ge=1)
    reuse_workers: bool = Field(
        False,
        description="run each trial in the worker process of the one before (Ray Tune's reuse_actors): saves a "
        "process start, imports and model load per trial (about 25 s on 2 cores), but a worker's memory grows "
        "with every trial it runs; for short sweeps of small models",
    )
    resources: Resources = Field(default_factory=Resources)
    failure: Failure = Field(default_factory=Failure)
    hooks: list[HookSpec] = Field(
        default_factory=list,
        description="trial hooks (rpsft.sweeps.trial.hooks.TrialHook subclasses by module:Name) called before "
        "training, as Trainer callbacks during training, and at each trial's end",
    )
    keep: Keep = Field(default_factory=Keep)
    storage: Storage = Field(default_factory=Storage)
    seed: int = 0
    output_dir: str = Field(
        "runs/sweeps",
        description="where the sweeps' state lives (<output_dir>/<name>/); on a Ray cluster of several nodes, a "
        "path every node sees (the preflight checks it)",
    )
    cache_dir: str | None = None

    @field_validator("references", mode="before")
    @classmethod
    def _references(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            return value  # pydantic names the field: "Input should be a valid list"
        return [{"method": item} if isinstance(item, str) else item for item in value]

    @field_validator("train")
    @classmethod
    def _check_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(value) & set(TRIAL_FIELDS))
        if own:
            raise ValueError(
                f"{', '.join(own)} are set per trial. Fix: put model/data/seed/resources at the top level and "
                "the searched knobs under space:"
            )
        if value.get("stop_at_step") is not None:
            raise ValueError(
                "stop_at_step would stop every trial early. Fix: remove it; to score checkpoints along training use "
                "evaluation.every with evaluation.trajectory: true, and rpsft export --trial <trial id>@<step>"
            )
        return value

    @model_validator(mode="after")
    def _check_sweep(self) -> SweepConfig:
        if self.search.num_trials == 0 and not self.references:
            raise ValueError("search.num_trials is 0 and there are no references: nothing to run")
        if self.objective.mode == "pareto" and self.scheduler.type == "asha":
            raise ValueError(
                "scheduler.type: asha cannot stop multi-objective (pareto) trials (Optuna cannot prune them). "
                "Fix: scheduler.type: fifo, or objective.mode: phi"
            )
        if self.scheduler.type == "asha" and self.objective.metric == "accuracy":
            raise ValueError(
                "scheduler.type: asha needs a loss-based objective (intermediate evaluations are loss-based). "
                "Fix: objective.metric: nll or kl, or scheduler.type: fifo"
            )
        if self.scheduler.type == "asha" and self.max_steps is None:
            raise ValueError(
                "scheduler.type: asha needs the number of optimizer steps, but train.max_steps is null (training "
                "by epochs). Fix: train.max_steps: N, or scheduler.type: fifo"
            )
        if self.scheduler.type == "asha" and self.evaluation.every == 0:
            raise ValueError(
                "scheduler.type: asha needs intermediate evaluations. Fix: evaluation.every: N optimizer steps"
            )
        if self.evaluation.trajectory and self.evaluation.every == 0:
            raise ValueError(
                "evaluation.trajectory: true needs intermediate evaluations, but evaluation.every is 0. "
                "Fix: evaluation.every: N optimizer steps, or evaluation.trajectory: false"
            )
        if self.evaluation.trajectory and self.objective.metric in ("kl", "accuracy"):
            raise ValueError(
                f"evaluation.trajectory: true with objective.metric: {self.objective.metric}; intermediate "
                "evaluations score the NLL (and evaluation.mc) without the base model or the harness. "
                "Fix: objective.metric: nll or mc, or evaluation.trajectory: false"
            )
        if self.resources.distributed and self.evaluation.trajectory:
            raise ValueError(
                f"evaluation.trajectory: true with resources.workers: {self.resources.workers}; a trial over "
                "several workers is scored once, after training. Fix: evaluation.trajectory: false and "
                "evaluation.every: 0, or workers: 1"
            )
        if self.resources.distributed and self.evaluation.every:
            raise ValueError(
                f"evaluation.every: {self.evaluation.every} with resources.workers: {self.resources.workers}; "
                "a trial over several workers is scored once, after training. Fix: evaluation.every: 0 "
                "(and scheduler.type: fifo), or workers: 1"
            )
        if self.objective.metric == "accuracy" and self.evaluation.harness is None:
            raise ValueError(
                "objective.metric: accuracy needs the lm-eval harness. Fix: set evaluation.harness "
                "(e.g. {suite: 'id,ood', limit: 8}) or objective.metric: nll"
            )
        if self.objective.metric == "kl" and not self.evaluation.loss.kl:
            raise ValueError("objective.metric: kl needs evaluation.loss.kl: true")
        if self.objective.metric in ("nll", "kl") and self.evaluation.loss.ood_benchmarks == []:
            raise ValueError(
                f"objective.metric: {self.objective.metric} scores OOD forgetting on evaluation.loss.ood_benchmarks, "
                "which is empty. Fix: name OOD benchmarks there, or objective.metric: mc with evaluation.mc"
            )
        if self.objective.metric == "mc" and self.evaluation.mc is None:
            raise ValueError(
                "objective.metric: mc needs the multiple-choice scoring. Fix: set evaluation.mc "
                "(e.g. {n: 50}) or objective.metric: nll"
            )
        if self.search.algorithm == "grid":
            for name, dim in (("k", self.space.k), ("lambda", self.space.lam)):
                if isinstance(dim, NumberRange):
                    raise ValueError(
                        f"search.algorithm: grid needs a list of choices for space.{name}, got a range. "
                        f"Fix: space.{name}: [v1, v2, ...], or search.algorithm: qmc"
                    )
            if self.search.num_trials > self.grid_size():
                raise ValueError(
                    f"search.num_trials ({self.search.num_trials}) exceeds the grid's {self.grid_size()} points. "
                    f"Fix: search.num_trials <= {self.grid_size()}"
                )
        if self.search.algorithm == "nsga2" and self.objective.mode != "pareto":
            raise ValueError(
                "search.algorithm: nsga2 is multi-objective. Fix: objective.mode: pareto, or tpe"
            )
        self._check_trial_configs()
        return self

    # ------------------------------------------------------------------ trial configs

    @property
    def scheduler_type(self) -> str:
        if self.scheduler.type != "auto":
            return self.scheduler.type
        scalar = self.objective.mode == "phi" and self.objective.metric != "accuracy"
        return "asha" if scalar and self.evaluation.every > 0 else "fifo"

    @property
    def algorithm(self) -> str:
        if self.search.algorithm != "auto":
            return self.search.algorithm
        return "nsga2" if self.objective.mode == "pareto" else "tpe"

    def grid_size(self) -> int:
        """Points of the grid over the listed choices (a range counts as its two bounds)."""
        space = self.space
        return (
            len(space.k_choices())
            * len(space.lam_choices())
            * len(space.layers)
            * len(space.period)
            * len(space.penalty_mode)
        )

    @property
    def num_reference_trials(self) -> int:
        return len(self.reference_params())

    @property
    def max_steps(self) -> int | None:
        """The trials' optimizer steps; None when ``train.max_steps: null`` trains by ``train.epochs``."""
        if "max_steps" in self.train and self.train["max_steps"] is None:
            return None
        return int(self.train.get("max_steps") or TrainConfig.model_fields["max_steps"].default)

    def sweep_dir(self) -> Path:
        """``<output_dir>/<name>``, resolved: the sweep's directory (its layout: :class:`rpsft.sweeps.store.sweep_store.SweepStore`)."""
        return Path(self.output_dir).expanduser().resolve() / self.name

    def trial_train_config(self, params: dict[str, Any], output_dir: str | Path | None = None) -> TrainConfig:
        """The TrainConfig of one trial from its parameters (method, k, lambda, layers, period, penalty_mode;
        a reference's own optimizer and learning_rate over the ``train:`` section). ``output_dir``: the trial's
        directory; without it, the sweep's directory (a TrainConfig that only checks values trains nothing)."""
        raw: dict[str, Any] = {
            "model": self.model,
            "data": self.data,
            "seed": self.seed,
            "cache_dir": self.cache_dir,
            "save_model": self.keep.any,  # <trial dir>/model, kept or deleted (sweeps/checkpoints.py)
            "resources": self.resources.model_dump(),
            **self.train,
        }
        method = params.get("method", "rpsft")
        raw["method"] = method
        if params.get("seed") is not None:
            raw["seed"] = params["seed"]
        for key in ("k", "lambda", "period", "penalty_mode", "lora_r", "optimizer", "learning_rate"):
            if params.get(key) is not None:  # optimizer / learning_rate: a reference's own, over train:
                raw[key] = params[key]
        if params.get("layers") is not None:
            layers = params["layers"]
            if isinstance(layers, str) and layers in self.space.layer_labels():
                layers = self.space.layers_for(layers)
            elif isinstance(layers, str) and layers.startswith("{"):
                layers = LayerSpec.model_validate_json(layers)
            raw["layers"] = layers
        if method_spec(method).uses_lambda and "lambda" not in params:  # a penalized reference without lambda
            raw["lambda"] = self.space.lam_choices()[-1]
        if output_dir is None:
            output_dir = self.sweep_dir()
        raw["output_dir"] = str(output_dir)
        return TrainConfig.model_validate(raw)

    def reference_params(self) -> list[dict[str, Any]]:
        """One parameter set per reference trial (a reference with ``seeds`` runs once per seed)."""
        out = []
        for ref in self.references:
            label = ref.label_in(self.train)
            params: dict[str, Any] = {"method": ref.method, "reference": label}
            if ref.k is not None:
                params["k"] = ref.k
            if ref.lam is not None:
                params["lambda"] = ref.lam
            if ref.layers is not None:
                params["layers"] = (
                    layer_label(ref.layers) if isinstance(ref.layers, LayerSpec) else ref.layers
                )
            if ref.penalty_mode is not None:
                params["penalty_mode"] = ref.penalty_mode
            if ref.lora_r is not None:
                params["lora_r"] = ref.lora_r
            if ref.optimizer is not None:
                params["optimizer"] = ref.optimizer
            if ref.learning_rate is not None:
                params["learning_rate"] = ref.learning_rate
            for seed in ref.seeds or [None]:
                if seed is None:
                    out.append(params)
                else:
                    out.append({**params, "seed": seed, "reference": f"{label} seed={seed}"})
        return out

    def auto_k_specs(self) -> list[str]:
        """The ``auto`` / ``auto@x`` k specs of the space and of the references (resolved once per sweep)."""
        specs = [k for k in self.space.k_choices() if isinstance(k, str)]
        specs += [r.k for r in self.references if isinstance(r.k, str)]
        return list(dict.fromkeys(specs))

    def _check_trial_configs(self) -> None:
        for i, params in enumerate(self.reference_params()):
            if isinstance(params.get("k"), str):  # auto: resolved to a fraction before the trials
                params = {**params, "k": 0.05}
            self._try(f"references[{i}] ({params['reference']})", params)
        for k in self.space.k_choices():
            if isinstance(k, str):  # auto / auto@x: resolved to a fraction before the trials
                continue
            self._try("space.k", {"k": k, "lambda": self.space.lam_choices()[0]})
        for lam in self.space.lam_choices():
            self._try("space.lambda", {"lambda": lam, "k": self._a_numeric_k()})
        for label in self.space.layer_labels():
            self._try(
                "space.layers",
                {"layers": label, "k": self._a_numeric_k(), "lambda": self.space.lam_choices()[0]},
            )
        for period in self.space.period:
            self._try(
                "space.period",
                {"period": period, "k": self._a_numeric_k(), "lambda": self.space.lam_choices()[0]},
            )
        for mode in self.space.penalty_mode:
            self._try(
                "space.penalty_mode",
                {"penalty_mode": mode, "k": self._a_numeric_k(), "lambda": self.space.lam_choices()[0]},
            )

    def _a_numeric_k(self) -> int | float:
        numeric = [k for k in self.space.k_choices() if not isinstance(k, str)]
        return numeric[0] if numeric else 0.05

    def _try(self, where: str, params: dict[str, Any]) -> None:
        try:
            train_config = self.trial_train_config(params)
            if train_config.resources.distributed:  # what sharded training cannot run fails here too
                from rpsft.core.sharded_method import check_sharded_settings

                try:
                    check_sharded_settings(train_config)
                except ConfigError as exc:
                    raise ValueError(f"{where}: {exc}") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            if field and field not in TRIAL_FIELDS:
                where = f"train.{field}"  # a shared training setting, not the searched value
            message = err["msg"].removeprefix("Value error, ").removeprefix(f"{field}: ")
            raise ValueError(f"{where}: {message}") from None


def input_path_slots(data: dict[str, Any]) -> Iterator[tuple[str, dict | list, str | int]]:
    """The fields of a dumped sweep config (``model_dump(mode="json", by_alias=True)``) that may name a local path
    a trial reads, as ``(field name, container, key)`` so a caller can read or replace each value in place:
    ``model``, ``data``, ``evaluation.data_dir``, ``evaluation.auto_k_prompts`` and, with a harness, its data
    dir, benchmarks file, include paths and task files. A value may be a name (a hub id, a registry task), not
    a path; the caller decides."""
    yield "model", data, "model"
    yield "data", data, "data"
    evaluation = data["evaluation"]
    yield "evaluation.data_dir", evaluation, "data_dir"
    yield "evaluation.auto_k_prompts", evaluation, "auto_k_prompts"
    harness = evaluation.get("harness") or {}
    for key in ("data_dir", "benchmarks_file"):
        if key in harness:
            yield f"evaluation.harness.{key}", harness, key
    for i in range(len(harness.get("include_path") or [])):
        yield f"evaluation.harness.include_path[{i}]", harness["include_path"], i
    for i, entry in enumerate(harness.get("benchmarks") or []):
        if isinstance(entry, dict) and "task" in entry:
            yield f"evaluation.harness.benchmarks[{i}].task", entry, "task"


def read_yaml_mapping(path: str | Path, field: str = "config", what: str = "sweep YAML") -> dict[str, Any]:
    """The mapping a sweep-side YAML file holds (:func:`rpsft.core.config.read_yaml_mapping`)."""
    return read_config_mapping(path, field, what, error=SweepConfigError)


def read_config_with_sweep(path: str | Path, field: str, what: str) -> dict[str, Any]:
    """A config that holds a sweep (regression, study): its mapping, with ``sweep:`` given as a path (relative
    to the file) read in place; the inlined sweep is named after its file unless it names itself."""
    path = Path(path)
    raw = read_yaml_mapping(path, field, what)
    if isinstance(raw.get("sweep"), str):
        sweep_path = (path.parent / raw["sweep"]).resolve()
        raw["sweep"] = read_yaml_mapping(sweep_path, "sweep", f"sweep YAML (a path relative to {path})")
        raw["sweep"].setdefault("name", sweep_path.stem)
    return raw


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML (relative ``data_dir`` / ``output_dir`` stay relative to the cwd)."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    raw.setdefault("name", path.stem)
    raw.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return parse_sweep_config(raw, str(path))


def parse_sweep_config(raw: dict[str, Any], source: str = "sweep config") -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise SweepConfigError(format_validation_error(exc, source, "sweep configuration")) from None
