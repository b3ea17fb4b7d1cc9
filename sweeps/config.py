"""Typed sweep configuration (``rpsft sweep sweep.yaml``), validated before Ray, a model or a trial starts.

A sweep is: a model and SFT data, a training budget shared by all trials, a search space over the RPSFT knobs
(k, lambda, layer subset, period, penalty mode), reference trials that always run once (sft, l2-init, ...),
how trials are scored (loss-based trade-off, optionally the lm-eval harness), the objective (max Phi at the first beta, or the
Pareto front of ID gain vs OOD forgetting), and where things run and are stored.

Every trial's :class:`TrainConfig` is built by :meth:`SweepConfig.trial_train_config`; the config validator
builds it for every reference and every corner of the space, so a value training would reject fails here,
with the sweep field named (``space.lambda``, ``references[1]``, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails
from rpsft.core.config import ConfigError, OptimizerName, Resources, TrainConfig, format_validation_error
from rpsft.core.config import read_yaml_mapping as read_config_mapping
from rpsft.core.method_table import Method, PenaltyMode, method_spec
from rpsft.core.selection import LayerSpec, resolve_spec
from rpsft.evaluation.loss_metrics import LossSettings
from rpsft.evaluation.multiple_choice import MCSettings
from rpsft.evaluation.settings import EvalSettings
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


class SweepConfigError(ConfigError):
    """A sweep that cannot run; raised before any trial starts, naming the field and the fix."""


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SWEEP_NAME_EXAMPLE = "demo-1"


def sweep_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a sweep (it names the sweep's folder under the runs dir), or ``None``."""
    if SWEEP_NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a sweep name: a sweep name names a folder, so it holds only letters, digits, '.', '_' "
        "and '-', and starts with a letter or a digit"
    )


def _check_sweep_name(name: str) -> str:
    problem = sweep_name_problem(name)
    if problem:
        raise ValueError(f"{problem}. Fix: e.g. {SWEEP_NAME_EXAMPLE}")
    return name


SweepName = Annotated[str, AfterValidator(_check_sweep_name)]


class NumberRange(BaseModel):
    """A continuous (or integer) range ``[low, high]``, sampled uniformly or log-uniformly."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> NumberRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high}). Fix: low <= high")
        if self.log and self.low <= 0:
            raise ValueError(
                f"a log-scale range needs low > 0, got low={self.low}. Fix: e.g. low: 1.0e-3, or log: false"
            )
        return self

    def corners(self) -> list[float]:
        return [self.low, self.high]


def _non_empty(values: list[Any], what: str) -> list[Any]:
    if not values:
        raise ValueError(f"the list of {what} is empty. Fix: give at least one value")
    return values


class SearchSpace(BaseModel):
    """The RPSFT knobs searched: each is a list of choices or a ``{low, high, log}`` range."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    k: list[int | float | str] | NumberRange = Field(default_factory=lambda: [16, 64])
    lam: list[float] | NumberRange = Field(
        default_factory=lambda: NumberRange(low=1e-2, high=10.0, log=True), alias="lambda"
    )
    layers: list[str | LayerSpec] = Field(default_factory=lambda: ["all"])
    period: list[int] = Field(default_factory=lambda: [1])
    penalty_mode: list[PenaltyMode] = Field(
        default_factory=lambda: ["loss"],
        description="how the penalty is applied (TrainConfig.penalty_mode): [loss], [decoupled], or both to "
        "compare them in one sweep",
    )

    @field_validator("k", mode="before")
    @classmethod
    def _k_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float, str)) else value

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: list[int | float | str] | NumberRange) -> list[int | float | str] | NumberRange:
        from rpsft.core.k_spec import k_spec_value

        if isinstance(value, NumberRange):
            if value.low < 0:
                raise ValueError(f"k range: low must be >= 0, got {value.low}")
            return value
        return [k_spec_value(item) for item in _non_empty(value, "k values")]

    @field_validator("lam", mode="before")
    @classmethod
    def _lam_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("lam")
    @classmethod
    def _check_lam(cls, value: list[float] | NumberRange) -> list[float] | NumberRange:
        values = value.corners() if isinstance(value, NumberRange) else _non_empty(value, "lambda values")
        if any(v <= 0 for v in values):
            raise ValueError(
                f"lambda must be > 0 for a penalized trial, got {min(values)}. "
                "Fix: positive values (the 'sft' reference covers lambda = 0)"
            )
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[str | LayerSpec]) -> list[str | LayerSpec]:
        for item in _non_empty(value, "layer subsets"):
            resolve_spec(item)
        return value

    @field_validator("period", mode="before")
    @classmethod
    def _period_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("period")
    @classmethod
    def _check_period(cls, value: list[int]) -> list[int]:
        if any(p < 1 for p in _non_empty(value, "periods")):
            raise ValueError(f"period must be >= 1, got {min(value)}. Fix: 1 = every optimizer step")
        return value

    @field_validator("penalty_mode", mode="before")
    @classmethod
    def _penalty_mode_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("penalty_mode")
    @classmethod
    def _check_penalty_mode(cls, value: list[str]) -> list[str]:
        if len(set(_non_empty(value, "penalty modes"))) != len(value):
            raise ValueError(f"{value} repeats a mode. Fix: each of loss, decoupled at most once")
        return value

    @property
    def searches_penalty_mode(self) -> bool:
        """Whether the trials choose a penalty mode (a space of only ``loss``, the default, does not: its trials
        keep the parameters, labels and seeded draws of a sweep without the knob)."""
        return self.penalty_mode != ["loss"]

    def layer_labels(self) -> list[str]:
        """One string per layer choice: the preset name, or the spec as compact JSON."""
        return [layer_label(item) for item in self.layers]

    def layers_for(self, label: str) -> str | LayerSpec:
        for item in self.layers:
            if layer_label(item) == label:
                return item
        raise KeyError(f"layers: {label!r} is not in the search space")

    def k_choices(self) -> list[int | float | str]:
        """The k values of the space (a range gives its bounds: whole ranks, or rank fractions when below 1)."""
        if isinstance(self.k, NumberRange):
            whole = self.k.low.is_integer() and self.k.high.is_integer() and self.k.high > 1
            return [int(self.k.low), int(self.k.high)] if whole else [float(self.k.low), float(self.k.high)]
        return list(self.k)

    def lam_choices(self) -> list[float]:
        return self.lam.corners() if isinstance(self.lam, NumberRange) else list(self.lam)


def layer_label(item: str | LayerSpec) -> str:
    if isinstance(item, str):
        return item
    return json.dumps(item.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


class Reference(BaseModel):
    """A baseline trial run once: a method, with optional k / lambda / layers for the penalized ones, and
    optional ``optimizer`` / ``learning_rate`` overriding the sweep's ``train:`` section for this trial alone
    (e.g. plain SGD, which needs a much larger learning rate than AdamW)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    method: Method
    k: int | float | str | None = None
    lam: float | None = Field(None, alias="lambda")
    layers: str | LayerSpec | None = None
    penalty_mode: PenaltyMode | None = Field(
        None, description="how a penalized reference applies its penalty (default: loss)"
    )
    lora_r: int | None = Field(None, gt=0, description="the adapter rank of a lora or rpsft-lora reference")
    optimizer: OptimizerName | None = Field(
        None,
        description="this trial's optimizer (TrainConfig.optimizer); default: the sweep's train.optimizer",
    )
    learning_rate: float | None = Field(
        None, gt=0, description="this trial's learning rate; default: the sweep's train.learning_rate"
    )
    seeds: list[int] | None = Field(
        None,
        description="run this trial once per seed (seed variance enters the intervals); default: the sweep's seed",
    )

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: int | float | str | None) -> int | float | str | None:
        if value is None:
            return None
        from rpsft.core.k_spec import k_spec_value

        return k_spec_value(value)

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            _non_empty(value, "seeds")
            if len(set(value)) != len(value):
                raise ValueError(f"seeds {value} repeat a seed. Fix: distinct seeds, e.g. [0, 1, 2]")
        return value

    @model_validator(mode="after")
    def _check_method_knobs(self) -> Reference:
        knobs = method_spec(self.method).knobs
        if self.lora_r is not None and "lora_r" not in knobs:
            raise ValueError(
                f"lora_r: method {self.method} has no adapters. Fix: drop lora_r, or method: lora or rpsft-lora"
            )
        if self.penalty_mode is not None and not method_spec(self.method).uses_lambda:
            raise ValueError(
                f"penalty_mode: method {self.method} has no penalty to decouple. Fix: drop penalty_mode, or "
                "method: rpsft or l2-init"
            )
        return self

    @property
    def label(self) -> str:
        return self.label_in({})

    def label_in(self, train: dict[str, Any]) -> str:
        """The reference's name in a sweep whose ``train:`` section is ``train``: ``optimizer`` and
        ``learning_rate`` are named only where they differ from the sweep's (or TrainConfig's default)."""
        parts = [self.method]
        if self.k is not None:
            parts.append(f"k={self.k}")
        if self.lam is not None:
            parts.append(f"lambda={self.lam:g}")
        if self.layers is not None:
            parts.append(f"layers={layer_label(self.layers)}")
        if self.penalty_mode is not None:
            parts.append(f"penalty_mode={self.penalty_mode}")
        if self.lora_r is not None:
            parts.append(f"lora_r={self.lora_r}")
        if self.optimizer is not None and self.optimizer != _train_value(train, "optimizer"):
            parts.append(f"optimizer={self.optimizer}")
        if self.learning_rate is not None and self.learning_rate != _train_value(train, "learning_rate"):
            parts.append(f"lr={self.learning_rate:g}")
        return " ".join(parts)


def _train_value(train: dict[str, Any], name: str) -> Any:
    """A sweep's ``train.<name>``, or TrainConfig's default."""
    return train[name] if train.get(name) is not None else TrainConfig.model_fields[name].default


class Intervals(BaseModel):
    """Paired bootstrap intervals of G_id, F_ood and Phi (see :mod:`rpsft.evaluation.intervals`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    draws: int = Field(2000, ge=100)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class ItemSplitSettings(BaseModel):
    """The split of the scored items into the part the operating point is chosen on and the part it is reported
    on (see :mod:`rpsft.evaluation.item_split`); ``report_fraction: 0`` chooses and reports on the same items."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    report_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="share of each benchmark's items held out from the choice to report the operating point on "
        "(0: no split, choose and report on all items, biased upwards)",
    )
    seed: int = Field(0, ge=0, description="seed of the per-benchmark permutation of the items")

    def item_split(self) -> Any:
        from rpsft.evaluation.item_split import ItemSplit

        return ItemSplit(self.report_fraction, self.seed)


# evaluation.loss of a sweep: cheaper than `rpsft eval --loss` (LossSettings' own defaults), since every trial
# is scored with it
SWEEP_LOSS_DEFAULTS: dict[str, Any] = {
    "n_id": 8,
    "n_ood": 8,
    "max_new_tokens": 64,
    "max_length": 512,
    "kl": False,
}
# LossSettings fields a sweep sets itself: evaluation.data_dir / evaluation.subset, and the sweep's cache
SECTION_LOSS_FIELDS = ("data_dir", "subset", "cache_dir")
# EvalSettings fields a sweep sets itself (objective.betas, the sweep's cache)
SWEEP_HARNESS_FIELDS = ("betas", "cache_dir")


def _sweep_loss_fields(value: Any) -> Any:
    """The given ``evaluation.loss`` fields over :data:`SWEEP_LOSS_DEFAULTS`, for pydantic to validate."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return value  # a LossSettings is kept; pydantic names anything else
    own = [key for key in SECTION_LOSS_FIELDS if key in value]
    if own:
        raise ValueError(
            f"{', '.join(own)} cannot be set for the loss metrics alone. Fix: evaluation.data_dir / "
            "evaluation.subset (cache_dir: the sweep's top-level cache_dir)"
        )
    # id_benchmarks / ood_benchmarks: null means the default benchmarks
    given = {k: v for k, v in value.items() if not (k in ("id_benchmarks", "ood_benchmarks") and v is None)}
    return {**SWEEP_LOSS_DEFAULTS, **given}


def sweep_loss_settings(fields: dict[str, Any] | None = None) -> LossSettings:
    """``evaluation.loss`` as :class:`LossSettings`: the given fields over :data:`SWEEP_LOSS_DEFAULTS`."""
    return LossSettings.model_validate(_sweep_loss_fields(fields))


class EvaluationConfig(BaseModel):
    """How trials are scored. ``every`` > 0 adds intermediate loss evaluations (the rungs of ASHA).

    ``loss``, ``mc`` and ``harness`` are the evaluation's own settings (:class:`LossSettings`,
    :class:`MCSettings`, :class:`EvalSettings`); ``data_dir`` and ``subset`` of this section apply to all of
    them (the harness may set its own). :meth:`loss_settings`, :meth:`mc_settings` and
    :meth:`harness_settings` give the settings a trial is scored with.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data_dir: str = "../shared/paper-data"
    subset: Literal["full", "test"] = "full"
    loss: LossSettings = Field(
        default_factory=sweep_loss_settings,
        description="loss-based trade-off (rpsft.evaluation.loss_metrics): forward passes, cheap, moves on small "
        "models; unset fields take SWEEP_LOSS_DEFAULTS; ood_benchmarks: [] turns the OOD NLL/KL off (no base "
        "generations); data_dir and subset come from this section",
    )
    mc: MCSettings | None = Field(
        None,
        description="log-likelihood multiple-choice scoring of OOD items (needed by objective.metric: mc); "
        "data_dir and subset come from this section",
    )
    intervals: Intervals = Field(default_factory=Intervals)
    split: ItemSplitSettings = Field(default_factory=ItemSplitSettings)
    harness: EvalSettings | None = Field(
        None,
        description="lm-eval settings (as `rpsft eval`) scored at the end of each trial; data_dir and subset "
        "default to this section's, betas are objective.betas",
    )
    every: int = Field(0, ge=0, description="intermediate evaluation every N optimizer steps (0: at the end)")
    trajectory: bool = Field(
        False,
        description="each trial's intermediate evaluations (evaluation.every) become points of the trade-off "
        "too: trial@step, from the eval/ metrics and the per-item scores stored at that step "
        "(trajectory/step-<step>.json); `rpsft export --trial <id>@<step>` retrains one up to that step",
    )
    auto_k_prompts: str | None = Field(
        None, description="OOD prompts for k: auto (JSONL); default <data_dir>/ood/gpqa_test.jsonl"
    )
    rotation: bool = Field(
        False,
        description="log each trial's rotation (mean principal angle of the top-K left singular subspaces "
        "against the base, per layer and type) to MLflow; costs one SVD per matrix per trial",
    )
    rotation_top_k: int = Field(
        512, ge=1, description="K of the rotation diagnostic (min(K, m, n) per matrix)"
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> Any:
        return _sweep_loss_fields(value)

    @field_validator("harness", mode="before")
    @classmethod
    def _harness(cls, value: Any) -> Any:
        """The harness scores at objective.betas and caches under the sweep's cache_dir: its own ``betas`` and
        ``cache_dir`` are unknown keys here, refused like any other."""
        if isinstance(value, dict):
            unknown = [key for key in SWEEP_HARNESS_FIELDS if key in value]
            if unknown:
                raise ValidationError.from_exception_data(
                    "EvalSettings",
                    [InitErrorDetails(type="extra_forbidden", loc=(key,), input=value[key]) for key in unknown],
                )
        return value

    @field_serializer("loss")
    def _dump_loss(self, value: LossSettings, info: SerializationInfo) -> dict[str, Any]:
        return value.model_dump(mode=info.mode, exclude=set(SECTION_LOSS_FIELDS))

    @field_serializer("harness")
    def _dump_harness(self, value: EvalSettings | None, info: SerializationInfo) -> dict[str, Any] | None:
        # the fields given, so that data_dir / subset left out keep following this section's
        return None if value is None else value.model_dump(mode=info.mode, exclude_unset=True)

    def auto_k_source(self) -> str:
        return self.auto_k_prompts or str(Path(self.data_dir) / "ood" / "gpqa_test.jsonl")

    def loss_settings(self, cache_dir: str | None = None) -> LossSettings:
        """The loss metrics' settings: ``loss`` reading this section's data."""
        return self.loss.model_copy(
            update={"data_dir": self.data_dir, "subset": self.subset, "cache_dir": cache_dir}
        )

    def mc_settings(self) -> MCSettings | None:
        """The multiple-choice settings: ``mc`` reading this section's data (``None`` without ``mc``)."""
        if self.mc is None:
            return None
        return self.mc.model_copy(update={"data_dir": self.data_dir, "subset": self.subset})

    def harness_settings(self, betas: list[float], cache_dir: str | None = None) -> EvalSettings | None:
        """The lm-eval settings: ``harness`` with this section's data unless it names its own, the objective's
        betas and the sweep's cache (``None`` without ``harness``)."""
        if self.harness is None:
            return None
        update: dict[str, Any] = {"betas": list(betas), "cache_dir": cache_dir}
        for key in ("data_dir", "subset"):
            if key not in self.harness.model_fields_set:
                update[key] = getattr(self, key)
        return self.harness.model_copy(update=update)



class Objective(BaseModel):
    """``phi``: maximize Phi = G_id - beta * F_ood at ``betas[0]``; ``pareto``: G_id up, F_ood down (NSGA-II)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["phi", "pareto"] = "phi"
    metric: Literal["nll", "kl", "mc", "accuracy"] = Field(
        "nll",
        description="nll: G_id and F_ood by token NLL; kl: F_ood by KL(base || tuned); mc: G_id by NLL and F_ood "
        "by the multiple-choice accuracy drop; accuracy: lm-eval harness avg@k",
    )
    betas: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, value: list[float]) -> list[float]:
        if any(b < 0 for b in _non_empty(value, "betas")):
            raise ValueError(f"beta must be >= 0, got {min(value)}")
        return value

    @property
    def beta(self) -> float:
        return self.betas[0]


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    algorithm: Literal["tpe", "nsga2", "random", "grid", "qmc", "auto"] = Field(
        "auto",
        description="grid: every combination of the listed choices once (Optuna GridSampler); qmc: a scrambled "
        "Sobol sequence (QMCSampler), which spreads a small budget evenly; auto: tpe (nsga2 for pareto) after a "
        "space-filling start that shows every k choice (sweeps/initial_design.py)",
    )
    num_trials: int = Field(4, ge=0, description="searched trials (the references come on top)")
    seed: int = 0
    warm_start: list[SweepName] = Field(
        default_factory=list,
        description="earlier sweeps (same output_dir, model, data and objective.metric) whose finished searched "
        "trials start this sweep's Optuna study (sweeps/warm_start.py)",
    )


class Scheduler(BaseModel):
    """Early stopping. ``auto``: ASHA when there are intermediate evaluations and a scalar objective."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["auto", "asha", "fifo"] = "auto"
    grace_steps: int = Field(1, ge=1, description="optimizer steps before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)


class Failure(BaseModel):
    """What the sweep does when a trial raises (an error, a non-finite loss, a lost worker)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_retries: int = Field(
        0, ge=0, description="rerun a failed trial up to this many times (same trial id and MLflow run)"
    )


class Keep(BaseModel):
    """Which trials keep their weights (safetensors + tokenizer): logged to the trial's MLflow run and
    registered as versions of the model ``rpsft-<sweep>``. Every other trial's weights are deleted as soon as
    they can no longer be kept, so a sweep holds at most the kept checkpoints plus the running trials'."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    operating_point: bool = Field(False, description="the chosen trial (max Phi at the sweep's beta)")
    top: int = Field(0, ge=0, description="the N best configurations by Phi at the sweep's beta")
    references: bool = Field(False, description="every reference configuration (sft, l2-init, ...)")

    @property
    def any(self) -> bool:
        return self.operating_point or self.top > 0 or self.references


class Storage(BaseModel):
    """Optuna study storage and MLflow tracking. ``None``: SQLite files under the sweep's directory."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    optuna: str | None = Field(None, description="sqlite:///..., postgresql://..., or journal:<file>")
    mlflow: str | None = Field(None, description="sqlite:///..., postgresql://..., or http(s)://server")
    experiment: str = "rpsft-sweeps"
    ray_address: str | None = Field(None, description="None: a local Ray; 'auto' or host:port: a cluster")


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
    output_dir: str = "runs/sweeps"
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
