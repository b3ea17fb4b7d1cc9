"""The smaller sections of a sweep config: ``objective``, ``search``, ``scheduler``, ``failure``, ``keep``
and ``storage``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)
from rpsft.sweeps.config.errors import SweepName, non_empty


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
        if any(b < 0 for b in non_empty(value, "betas")):
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
