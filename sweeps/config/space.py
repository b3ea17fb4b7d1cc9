"""The searched space of a sweep (``space:``) and its reference trials (``references:``)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from rpsft.core.config import OptimizerName, TrainConfig
from rpsft.core.method_table import Method, PenaltyMode, method_spec
from rpsft.core.selection import LayerSpec, resolve_spec
from rpsft.sweeps.config.errors import non_empty


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
        return [k_spec_value(item) for item in non_empty(value, "k values")]

    @field_validator("lam", mode="before")
    @classmethod
    def _lam_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("lam")
    @classmethod
    def _check_lam(cls, value: list[float] | NumberRange) -> list[float] | NumberRange:
        values = value.corners() if isinstance(value, NumberRange) else non_empty(value, "lambda values")
        if any(v <= 0 for v in values):
            raise ValueError(
                f"lambda must be > 0 for a penalized trial, got {min(values)}. "
                "Fix: positive values (the 'sft' reference covers lambda = 0)"
            )
        return value

    @field_validator("layers", "period", "penalty_mode", mode="before")
    @classmethod
    def _one_choice_as_list(cls, value: Any) -> Any:
        """A single choice (``layers: attn``, ``period: 4``, ``penalty_mode: decoupled``) is a list of one."""
        return [value] if isinstance(value, (str, dict, int)) else value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[str | LayerSpec]) -> list[str | LayerSpec]:
        for item in non_empty(value, "layer subsets"):
            resolve_spec(item)
        return value

    @field_validator("period")
    @classmethod
    def _check_period(cls, value: list[int]) -> list[int]:
        if any(p < 1 for p in non_empty(value, "periods")):
            raise ValueError(f"period must be >= 1, got {min(value)}. Fix: 1 = every optimizer step")
        return value

    @field_validator("penalty_mode")
    @classmethod
    def _check_penalty_mode(cls, value: list[str]) -> list[str]:
        if len(set(non_empty(value, "penalty modes"))) != len(value):
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
            non_empty(value, "seeds")
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
