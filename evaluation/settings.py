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
    DEFAULT_SAMPLES,
    Benchmark,
    EvalConfigError,
    build_registry,
    load_benchmark_entries,
    resolve_benchmarks,
)
from rpsft.evaluation.harness_tasks import ResolvedTask, resolve_task, task_source
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
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM where installed, with a GPU, for a model named by path; else hf"
    )
    device: str | None = None
    include_path: list[str] = Field(
        default_factory=list,
        description="directories of lm-eval task YAML for task entries (lm-eval's include_path)",
    )
    task_chat_template: bool = Field(
        False, description="apply the model's chat template to the lm-eval tasks of task entries"
    )

    @field_validator("suite", "exclude", "include_path", mode="before")
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

    def samples_for(self, bench: Benchmark, repeats: set[int] | None = None) -> int:
        """Samples per item of ``bench``: ``k`` (``--samples``), else the entry's ``k``, else the default. A file
        in the avg@n form (every prompt in exactly n > 1 identical rows; ``repeats``: the row counts seen) fixes
        the number at n, and a ``k`` that differs is refused. Uneven counts are duplicates, scored once."""
        repeats = repeats or {1}
        if len(repeats) > 1 or repeats == {1}:
            return self.k or bench.k or DEFAULT_SAMPLES
        (rows,) = repeats
        for name, value in (("k (--samples)", self.k), (f"benchmarks[{bench.name}].k", bench.k)):
            if value is not None and value != rows:
                raise EvalConfigError(
                    f"{name}: {value} samples per item conflicts with {bench.name}'s file, which repeats each "
                    f"prompt {rows} times (read as one item sampled {rows} times, avg@{rows}). Fix: leave {name} "
                    "unset, or give a file with each prompt once"
                )
        return rows

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
        def relative_to_file(value: Any) -> Any:
            if not isinstance(value, str) or Path(value).expanduser().is_absolute():
                return value
            candidate = (path.parent / value).resolve()
            return str(candidate) if candidate.exists() or not Path(value).exists() else value

        for key in ("data_dir", "benchmarks_file"):
            data[key] = relative_to_file(data.get(key))
        if isinstance(data.get("include_path"), list):
            data["include_path"] = [relative_to_file(p) for p in data["include_path"]]
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
    items: list[Item]  # the items that will be scored (after limit); none for a task entry
    n_total: int
    source: str  # file sha256 or hub id; for a task entry its lm-eval spec and task file's sha256
    harness: ResolvedTask | None = None  # a task entry, resolved
    harness_limit: int | None = None  # the limit lm-eval applies to a task entry's documents
    n_rows: int = 0  # rows of the file (more than n_total where rows repeat)

    def repeats_note(self) -> str | None:
        """A line on rows read as repeats of others, if any."""
        if self.n_rows <= self.n_total:
            return None
        if self.n_rows == self.n_total * self.n_samples:
            return (
                f"{self.bench.name}: {self.n_rows} rows are {self.n_total} prompts x {self.n_samples} identical "
                f"rows, scored as {self.n_total} items with {self.n_samples} samples each (avg@{self.n_samples})"
            )
        return (
            f"{self.bench.name}: {self.n_rows - self.n_total} of {self.n_rows} rows repeat an earlier row and are "
            f"scored once: {self.n_total} items"
        )

    @property
    def n_items(self) -> int:
        """Items scored (after ``limit``)."""
        if self.harness is None:
            return len(self.items)
        return min(self.n_total, self.harness_limit) if self.harness_limit else self.n_total


@dataclass
class EvalPlan:
    settings: EvalSettings
    tasks: list[PlannedTask]

    @property
    def benchmarks(self) -> list[Benchmark]:
        return [t.bench for t in self.tasks]

    @property
    def own_tasks(self) -> list[PlannedTask]:
        """The benchmarks rpsft writes lm-eval tasks for (all but the task entries)."""
        return [t for t in self.tasks if t.harness is None]

    @property
    def task_names(self) -> list[str]:
        """The lm-eval names of rpsft's own tasks."""
        return [t.bench.task_name for t in self.own_tasks]

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
        if bench.is_task:
            resolved = resolve_task(bench, settings.include_path)
            tasks.append(
                PlannedTask(
                    bench,
                    1,
                    1,
                    [],
                    resolved.n_docs,
                    task_source(resolved),
                    resolved,
                    harness_limit=settings.limit,
                )
            )
            continue
        all_items = load_items(bench, settings.data_dir, settings.subset)
        items = all_items[: settings.limit] if settings.limit else all_items
        n = settings.samples_for(bench, {item.repeats for item in all_items})
        pass_k = settings.pass_k or n
        if pass_k > n:
            raise EvalConfigError(
                f"pass_k: {pass_k} exceeds the {n} samples per item of {bench.name}. Fix: pass_k <= k"
            )
        source = source_digest(bench, settings.data_dir, settings.subset)
        rows = sum(item.repeats for item in all_items)
        tasks.append(PlannedTask(bench, n, pass_k, items, len(all_items), source, n_rows=rows))
    if check_ifeval:
        for t in tasks:
            if t.bench.scorer == "ifeval":
                from rpsft.evaluation.ifeval import check_ifeval_ready

                ids = {i for item in t.items for i in json.loads(item.instruction_ids)}
                check_ifeval_ready(ids, where=t.bench.name)
    return EvalPlan(settings=settings, tasks=tasks)
