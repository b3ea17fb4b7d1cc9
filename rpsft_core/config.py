"""Typed training configuration (``rpsft train --config train.yaml``), validated before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rpsft.core.bases import BASIS_METHODS
from rpsft.core.errors import ConfigError
from rpsft.core.k_spec import KSpecValue, is_auto_k, k_spec_value
from rpsft.core.method_table import Method, MethodSpec, PenaltyMode, method_spec
from rpsft.core.precision import MixedPrecisionSetting
from rpsft.core.selection import LayerSpec, resolve_spec

DEFAULT_AUTO_K_PROMPTS = "../shared/paper-data/ood/gpqa_test.jsonl"  # the sweep's default too

Strategy = Literal["fsdp2", "ddp"]
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"]  # TrainConfig.optimizer


class Resources(BaseModel):
    """Where one training run executes: one process (``workers: 1``, with ``gpus``, fractions sharing a GPU),
    or ``workers`` processes joined by one process group (Ray Train), each with ``cpus`` and
    ``gpus_per_worker``, under ``strategy``: ``fsdp2`` shards parameters, gradients and optimizer states by
    rows; ``ddp`` replicates them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cpus: float = Field(1.0, gt=0, description="CPUs of the trial (workers: 1) or of each worker")
    gpus: float = Field(0.0, ge=0, description="GPUs of a one-process trial; fractions share a GPU")
    workers: int = Field(1, ge=1, description="training processes per trial (Ray Train workers)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs of each worker when workers > 1")
    strategy: Strategy = Field("fsdp2", description="how workers > 1 share the model: fsdp2 or ddp")

    @model_validator(mode="after")
    def _check(self) -> Resources:
        if self.workers > 1 and self.gpus > 0:
            raise ValueError(
                f"gpus: {self.gpus:g} with workers: {self.workers}; gpus is for a one-process trial. "
                f"Fix: gpus_per_worker: {max(1.0, self.gpus / self.workers):g} and gpus: 0"
            )
        if self.workers == 1 and self.gpus_per_worker > 0:
            raise ValueError(
                f"gpus_per_worker: {self.gpus_per_worker:g} with workers: 1. Fix: gpus: {self.gpus_per_worker:g}, "
                "or workers >= 2"
            )
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError(
                f"gpus_per_worker: {self.gpus_per_worker:g}; workers of one process group need whole GPUs. "
                "Fix: 1 (or more), or 0 for CPU workers"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Whether the run spans several processes (Ray Train workers)."""
        return self.workers > 1

    @property
    def gpus_per_process(self) -> float:
        return self.gpus_per_worker if self.distributed else self.gpus


class TrainConfig(BaseModel):
    """One training run: model, data, method and its knobs, optimization, output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    model: str = "smollm2-135m-instruct"
    data: str = "demo-math:256"
    max_length: int = Field(256, gt=8)
    data_limit: int | None = Field(None, gt=0)

    method: Method = "rpsft"
    k: KSpecValue = Field(
        64,
        description="protected rank: an int rank, a fraction of each matrix's rank, or auto / auto@<energy "
        "target> (resolved on the base model by the energy rule before training)",
    )
    auto_k_prompts: str = Field(
        DEFAULT_AUTO_K_PROMPTS,
        description="OOD prompts the energy rule of k: auto reads (a JSONL path, demo-math:N or hf:<id>)",
    )
    lam: float = Field(1.0, alias="lambda")
    period: int = Field(1, ge=1)
    penalty_mode: PenaltyMode = Field(
        "loss",
        description="how the penalty is applied: loss (the paper's: its gradient joins the task gradient before "
        "clipping and the optimizer step) or decoupled (the exact proximal step of the penalty after each "
        "optimizer step, at that step's learning rate, outside clipping and the optimizer's moments); rpsft and "
        "l2-init (rpsft-lora: loss only; the unpenalized methods ignore it)",
    )
    layers: str | LayerSpec = "all"
    basis_method: str = "exact"
    lora_r: int = Field(32, gt=0)
    lora_alpha: float = Field(64.0, gt=0)
    iw_tau: float = Field(1.0, gt=0)
    iw_clamp: float = Field(16.0, gt=0)

    optimizer: OptimizerName = "adamw_torch"
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(20, gt=0)
    epochs: float = Field(1.0, gt=0)
    stop_at_step: int | None = Field(
        None,
        gt=0,
        description="stop after this optimizer step, everything else as the full run (learning-rate schedule "
        "over max_steps, data order): the weights the full run has at that step (a sweep's trajectory point)",
    )
    max_grad_norm: float = Field(1.0, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_precision: MixedPrecisionSetting = Field(
        "no",
        description="autocast the forward/backward (weights and optimizer stay in dtype): bf16 is fast on GPUs and "
        "on CPUs with AMX/AVX512-BF16 (emulated, about 20x slower, elsewhere); auto is bf16 where it is native, "
        "else no; the penalty is computed outside autocast",
    )
    seed: int = 0

    output_dir: str = "runs/train"
    save_model: bool = True
    checkpoint_every: int | None = Field(
        None,
        gt=0,
        description="save a resumable checkpoint (weights, optimizer, scheduler, RNG) every N optimizer steps "
        "under output_dir; a rerun with the same output_dir resumes from the latest one",
    )
    logging_steps: int = Field(1, gt=0)
    cache_dir: str | None = None
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder block's activations in the backward pass (less memory)"
    )
    resources: Resources = Field(default_factory=Resources)

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: KSpecValue) -> KSpecValue:
        return k_spec_value(value)

    @field_validator("lam")
    @classmethod
    def _check_lam(cls, value: float) -> float:
        if value < 0:
            raise ValueError(
                f"lambda must be >= 0, got {value}. Fix: a non-negative penalty strength, e.g. 1.0"
            )
        return value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | LayerSpec) -> str | LayerSpec:
        resolve_spec(value)
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _check_scheduler(cls, value: str) -> str:
        from transformers import SchedulerType

        names = [item.value for item in SchedulerType]
        if value not in names:
            raise ValueError(f"unknown scheduler {value!r}. Fix: one of {', '.join(names)}")
        return value

    @field_validator("basis_method")
    @classmethod
    def _check_basis_method(cls, value: str) -> str:
        if value not in BASIS_METHODS:
            raise ValueError(f"unknown basis method {value!r}. Fix: one of {', '.join(BASIS_METHODS)}")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> TrainConfig:
        spec = self.spec
        if spec.uses_k and not spec.uses_lambda and self.k == 0:
            raise ValueError(
                f"k: {self.method} freezes the top-k subspace and needs k > 0. Fix: a positive rank or fraction"
            )
        if self.auto_k:
            source = Path(self.auto_k_prompts).expanduser()
            if source.suffix == ".jsonl" and not source.is_file():
                raise ValueError(
                    f"auto_k_prompts: file {source} does not exist; k: {self.k} reads OOD prompts from it. "
                    "Fix: a JSONL of OOD prompts, demo-math:N or hf:<dataset>, or a numeric k"
                )
        if self.penalty_mode == "decoupled" and spec.uses_lambda and spec.adapter is not None:
            raise ValueError(
                f"penalty_mode: decoupled is not defined for method {self.method!r} (its penalty acts on the "
                "adapters' product s B A, which has no exact proximal step). Fix: penalty_mode: loss, or "
                "method: rpsft"
            )
        if spec.uses_lambda and self.lam == 0:
            raise ValueError(
                f"lambda is 0 for method {self.method!r}, which is plain training. Fix: lambda > 0"
            )
        if self.stop_at_step is not None and self.max_steps is not None and self.stop_at_step > self.max_steps:
            raise ValueError(
                f"stop_at_step: {self.stop_at_step} is past max_steps: {self.max_steps}. Fix: stop_at_step <= "
                "max_steps (the run's schedule stays that of max_steps), or no stop_at_step"
            )
        return self

    @property
    def spec(self) -> MethodSpec:
        """The method's row of :data:`rpsft.core.method_table.METHODS`."""
        return method_spec(self.method)

    @property
    def effective_k(self) -> int | float:
        """The rank the penalty uses: full rank (1.0) for ``l2-init``, 0 for unpenalized methods."""
        return self.spec.effective_k(self.k)

    @property
    def auto_k(self) -> bool:
        """Whether the penalty's k is an ``auto`` spec, to resolve on the base model before training."""
        return is_auto_k(self.effective_k)

    def knob_values(self) -> dict[str, Any]:
        """The method's own knobs and their values (what a trial logs; see :meth:`MethodSpec.logged_knobs`)."""
        values = self.model_dump(by_alias=True)
        return self.spec.logged_knobs(values)


def format_validation_error(exc: ValidationError, source: str, what: str = "configuration") -> str:
    """The one formatter of pydantic errors: ``<source>: invalid <what>``, then one line per field (its dotted
    path, list positions in brackets) with the reason; a union's "Input should be a valid ..." noise is dropped
    when a real reason exists."""
    wrappers = ("NumberRange", "int", "float", "str", "bool", "LayerSpec", "Reference", "Benchmark")
    found: dict[str, list[str]] = {}
    for err in exc.errors():
        field = ""
        for part in err["loc"]:
            name = str(part)
            if name.startswith(("list[", "function-", "literal[", "dict[")) or name in wrappers:
                continue
            field += f"[{part}]" if isinstance(part, int) else f".{name}"
        field = field.lstrip(".")
        message = err["msg"].removeprefix("Value error, ").removeprefix(f"{field}: ")
        found.setdefault(field, []).append(message)
    lines = [f"{source}: invalid {what}"]
    for field, messages in found.items():
        real = [m for m in messages if not m.startswith("Input should be a valid")] or messages
        for message in dict.fromkeys(real):
            lines.append(f"  - {field}: {message}" if field else f"  - {message}")
    return "\n".join(lines)


def read_yaml_mapping(
    path: str | Path, field: str = "config", what: str = "YAML file", error: type[ValueError] = ConfigError
) -> dict[str, Any]:
    """The mapping a YAML file holds: the one config reader. A missing file, bad YAML or a non-mapping raises
    ``error`` naming ``field`` and the fix."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{field}: file {path} does not exist. Fix: pass an existing {what}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{field}: {path} is not valid YAML: {exc}. Fix: correct the YAML syntax") from None
    if not isinstance(raw, dict):
        raise error(f"{field}: {path} must hold a mapping of fields, got {type(raw).__name__}")
    return raw


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (optional) plus overrides into a validated :class:`TrainConfig` (or raise ConfigError).
    An override that is a mapping updates the file's mapping of that field (``{"resources": {"workers": 2}}``
    keeps the file's other ``resources``)."""
    raw = read_yaml_mapping(path, what="training YAML (see configs/)") if path is not None else {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        elif value is not None:
            raw[key] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path or "config"))) from None
