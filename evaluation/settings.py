"""Evaluation settings (``rpsft eval`` options / ``configs/eval-*.yaml``) and the validated plan.

:func:`plan_evaluation` resolves the suites and benchmark names, finds every data file and reads and checks
every row (and the IFEval checkers' requirements) *before* any model is loaded, so a bad request fails in a
second with a message that names the field and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rpsft.core.config import format_validation_error, read_yaml_mapping
from rpsft.evaluation.benchmarks import (
    Benchmark,
    EvalConfigError,
    build_registry,
    load_benchmark_entries,
    resolve_benchmarks,
)
from rpsft.evaluation.items import Item, load_items, source_digest


def _split_names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        return value  # pydantic names the field: "Input should be a valid list"
    return [v.strip() if isinstance(v, str) else v for v in value if not isinstance(v, str) or v.strip()]


class EvalSettings(BaseModel):
    """What to evaluate and how. ``None`` for ``k`` / ``temperature`` means the per-benchmark paper default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    suite: list[str] = Field(default_factory=lambda: ["id", "ood"])
    exclude: list[str] = Field(default_factory=list)
    data_dir: str | None = None
    subset: Literal["full", "test"] = "full"
    k: int | None = Field(None, ge=1, description="samples per item for every benchmark (paper k if None)")
    pass_k: int | None = Field(None, ge=1, description="k of pass@k (default: the number of samples)")
    max_new_tokens: int = Field(1024, ge=1)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="first N items of each benchmark")
    temperature: float | None = Field(None, ge=0, description="None: greedy for k=1, else 0.6")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 1234
    betas: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    benchmarks: list[Benchmark] = Field(default_factory=list, description="extra, config-declared benchmarks")
    benchmarks_file: str | None = None
    cache_dir: str | None = None
    backend: Literal["hf", "vllm"] = "hf"
    device: str | None = None

    @field_validator("suite", "exclude", mode="before")
    @classmethod
    def _names(cls, value: Any) -> list[str]:
        return _split_names(value)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, value: Any) -> list[float]:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        return value  # pydantic checks the items are numbers

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        from rpsft.core.models import default_cache_dir

        return default_cache_dir() / "eval"

    def samples_for(self, bench: Benchmark) -> int:
        return self.k if self.k is not None else bench.k

    def generation_kwargs(self, n_samples: int) -> dict[str, Any]:
        temperature = self.temperature if self.temperature is not None else (0.0 if n_samples == 1 else 0.6)
        kwargs: dict[str, Any] = {"until": [], "max_gen_toks": self.max_new_tokens}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(self.top_p))
        else:
            kwargs.update(do_sample=False, temperature=0.0)
        return kwargs


def _pydantic_message(exc: ValidationError, where: str) -> str:
    return (
        format_validation_error(exc, where, "eval settings")
        + "\nFix: see `rpsft eval --help` for the accepted values"
    )


def load_eval_settings(
    config: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> EvalSettings:
    """Settings from a YAML file (optional) with non-``None`` overrides on top."""
    data: dict[str, Any] = {}
    where = "eval settings"
    if config is not None:
        path = Path(config)
        data.update(
            read_yaml_mapping(path, what="eval settings YAML (e.g. 'suite: id,ood')", error=EvalConfigError)
        )
        where = str(path)
        # relative paths in a config file are relative to the file
        for key in ("data_dir", "benchmarks_file"):
            if isinstance(data.get(key), str) and not Path(data[key]).expanduser().is_absolute():
                candidate = (path.parent / data[key]).resolve()
                if candidate.exists() or not Path(data[key]).exists():
                    data[key] = str(candidate)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return EvalSettings.model_validate(data)
    except ValidationError as exc:
        raise EvalConfigError(_pydantic_message(exc, where)) from None


@dataclass
class PlannedTask:
    bench: Benchmark
    n_samples: int
    pass_k: int
    items: list[Item]  # the items that will be scored (after limit)
    n_total: int
    source: str  # file sha256 or hub id


@dataclass
class EvalPlan:
    settings: EvalSettings
    tasks: list[PlannedTask]

    @property
    def benchmarks(self) -> list[Benchmark]:
        return [t.bench for t in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.bench.task_name for t in self.tasks]

    def task(self, name: str) -> PlannedTask:
        for t in self.tasks:
            if t.bench.name == name or t.bench.task_name == name:
                return t
        raise KeyError(name)


def registry_for(settings: EvalSettings) -> dict[str, Benchmark]:
    extra = list(settings.benchmarks)
    if settings.benchmarks_file:
        extra += load_benchmark_entries(settings.benchmarks_file)
    return build_registry(extra)


def plan_evaluation(settings: EvalSettings, *, check_ifeval: bool = True) -> EvalPlan:
    """Resolve and validate everything a run needs; no model is touched."""
    registry = registry_for(settings)
    benches = resolve_benchmarks(settings.suite, registry, settings.exclude)
    tasks: list[PlannedTask] = []
    for bench in benches:
        all_items = load_items(bench, settings.data_dir, settings.subset)
        items = all_items[: settings.limit] if settings.limit else all_items
        n = settings.samples_for(bench)
        pass_k = settings.pass_k or n
        if pass_k > n:
            raise EvalConfigError(
                f"pass_k: {pass_k} exceeds the {n} samples per item of {bench.name}. Fix: pass_k <= k"
            )
        source = source_digest(bench, settings.data_dir, settings.subset)
        tasks.append(PlannedTask(bench, n, pass_k, items, len(all_items), source))
    if check_ifeval:
        for t in tasks:
            if t.bench.scorer == "ifeval":
                from rpsft.evaluation.ifeval import check_ifeval_ready

                ids = {i for item in t.items for i in json.loads(item.instruction_ids)}
                check_ifeval_ready(ids, where=t.bench.name)
    return EvalPlan(settings=settings, tasks=tasks)
