"""Run the benchmark tasks through lm-evaluation-harness on an in-memory model (or a path, or any lm-eval LM).

``evaluate(model, tokenizer, settings)`` validates the request (:func:`plan_evaluation`), writes the task
YAML of :mod:`rpsft.evaluation.lm_eval_tasks` to a temporary directory, loads it with a ``TaskManager``, wraps the
model in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)`` (no save and reload) and
calls ``lm_eval.simple_evaluate(..., apply_chat_template=True)``. The model's train/eval mode and the global
random states (Python, NumPy, torch) are restored afterwards, so it can be called in the middle of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rpsft.evaluation.backends import resolve_backend, vllm_arguments
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.harness_tasks import seeded_evaluate
from rpsft.evaluation.lm_eval_tasks import (
    FILTER_NAME,
    METRIC_AVG,
    METRIC_INST,
    METRIC_PASS,
    plan_config_hash,
    write_task_dir,
)
from rpsft.evaluation.metrics import macro_average
from rpsft.evaluation.settings import EvalPlan, EvalSettings, plan_evaluation

logger = logging.getLogger(__name__)


class BenchmarkScore(BaseModel):
    name: str
    title: str
    suite: str
    scorer: str
    task: str
    n_items: int
    n_samples: int = Field(description="samples per item (the k of Avg@k)")
    pass_k: int
    avg_at_k: float = Field(
        description="the score: avg@k, or a task entry's primary metric as lm-eval reports it"
    )
    pass_at_k: float
    extra: dict[str, float] = Field(default_factory=dict)
    metric: str = Field("avg@k", description="what avg_at_k holds: avg@k, or a task entry's metric")
    higher_is_better: bool = True
    stderr: float | None = Field(None, description="lm-eval's standard error of the score (task entries)")

    def oriented(self, value: float) -> float:
        """``value`` with the sign that makes higher better."""
        return value if self.higher_is_better else -value


class EvalResult(BaseModel):
    """Scores of one model: per benchmark, and macro averages per suite."""

    model: str
    benchmarks: dict[str, BenchmarkScore]
    suites: dict[str, float | None] = Field(description="macro-averaged avg@k per suite")
    suites_pass: dict[str, float | None] = Field(description="macro-averaged pass@k per suite")
    config_hash: str
    settings: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    samples: dict[str, list[dict[str, Any]]] | None = None
    items: dict[str, list[float]] = Field(
        default_factory=dict,
        description="per benchmark, each item's score in document order (avg@k over its samples, or a task "
        "entry's metric), signed so that higher is better",
    )

    def suite_scores(self, metric: str = "avg_at_k") -> dict[str, dict[str, float]]:
        """``{"id": {benchmark: score}, "ood": {...}}`` for ``metric`` (``avg_at_k`` or ``pass_at_k``), signed so
        that higher is better."""
        out: dict[str, dict[str, float]] = {"id": {}, "ood": {}}
        for name, score in self.benchmarks.items():
            out.setdefault(score.suite, {})[name] = score.oriented(float(getattr(score, metric)))
        return out

    def item_scores(self) -> dict[str, dict[str, list[tuple[float, int]]]]:
        """``{suite: {benchmark: [(score, 1), ...]}}``, the per-item form of :mod:`rpsft.evaluation.intervals`."""
        out: dict[str, dict[str, list[tuple[float, int]]]] = {"id": {}, "ood": {}}
        for name, values in self.items.items():
            out.setdefault(self.benchmarks[name].suite, {})[name] = [(v, 1) for v in values]
        return out

    def table(self) -> str:
        return format_table(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.model_validate_json(Path(path).read_text())


def format_table(result: EvalResult) -> str:
    rows = [("benchmark", "suite", "items", "k", "metric", "score", "pass@k", "lm-eval stderr")]
    for score in result.benchmarks.values():
        rows.append(
            (
                score.title,
                score.suite,
                str(score.n_items),
                str(score.n_samples),
                score.metric + ("" if score.higher_is_better else " (lower is better)"),
                f"{score.avg_at_k:.4f}",
                f"{score.pass_at_k:.4f}" if score.metric == "avg@k" else "",
                "" if score.stderr is None else f"{score.stderr:.4f}",
            )
        )
    for suite in ("id", "ood"):
        if result.suites.get(suite) is not None:
            rows.append(
                (
                    f"{suite.upper()} (macro)",
                    suite,
                    "",
                    "",
                    "",
                    f"{result.suites[suite]:.4f}",
                    f"{result.suites_pass[suite]:.4f}",
                    "",
                )
            )
    # columns only task entries fill (their metric, lm-eval's stderr) are left out when none is scored
    keep = [
        i for i in range(len(rows[0])) if i not in (4, 7) or any(r[i] not in ("", "avg@k") for r in rows[1:])
    ]
    if 4 not in keep:  # every score is an avg@k
        rows[0] = (*rows[0][:5], "avg@k", *rows[0][6:])
    rows = [tuple(row[i] for i in keep) for row in rows]
    left = {keep.index(i) for i in (0, 1, 4) if i in keep}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _preserved_state(model: Any):
    """Restore the model's training flag and the Python / NumPy / torch random states on exit."""
    import numpy as np
    import torch

    training = getattr(model, "training", None)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if training is not None and hasattr(model, "train"):
            model.train(training)


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool):
    if verbose:
        yield
        return
    names = ["lm_eval", "lm-eval"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_model(settings: EvalSettings, model: Any, tokenizer: Any) -> None:
    from lm_eval.api.model import LM

    if not isinstance(model, (str, Path, LM)) and tokenizer is None:
        raise EvalConfigError(
            "tokenizer: an in-memory model needs its tokenizer. Fix: evaluate(model, tokenizer, settings)"
        )
    resolve_backend(settings.backend, model)  # refuses vllm without vLLM, or with an in-memory model


def make_lm(model: Any, tokenizer: Any, settings: EvalSettings):
    """The lm-eval LM for a model: an lm-eval ``LM`` as is, a path/name loaded, an in-memory HF model wrapped."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    if isinstance(model, (str, Path)):
        if resolve_backend(settings.backend, model) == "vllm":
            from lm_eval.models.vllm_causallms import VLLM
            from rpsft.core.models import resolve_model_dir

            return VLLM(**vllm_arguments(resolve_model_dir(str(model)), settings))
        from rpsft.core.models import load_model

        model, tokenizer = load_model(str(model), device=settings.device)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)


def parse_results(raw: dict[str, Any], plan: EvalPlan) -> dict[str, BenchmarkScore]:
    """Per-benchmark scores of rpsft's own tasks from ``simple_evaluate``'s output."""
    scores: dict[str, BenchmarkScore] = {}
    n_samples = raw.get("n-samples", {})
    for planned in plan.own_tasks:
        bench = planned.bench
        res = raw["results"][bench.task_name]
        extra = {}
        if f"{METRIC_INST},{FILTER_NAME}" in res:
            extra[METRIC_INST] = float(res[f"{METRIC_INST},{FILTER_NAME}"])
        n_items = n_samples.get(bench.task_name, {}).get("effective", len(planned.items))
        scores[bench.name] = BenchmarkScore(
            name=bench.name,
            title=bench.display,
            suite=bench.suite,
            scorer=str(bench.scorer),
            task=bench.task_name,
            n_items=int(n_items),
            n_samples=planned.n_samples,
            pass_k=planned.pass_k,
            avg_at_k=float(res[f"{METRIC_AVG},{FILTER_NAME}"]),
            pass_at_k=float(res[f"{METRIC_PASS},{FILTER_NAME}"]),
            extra=extra,
        )
    return scores


def parse_task_results(
    raw: dict[str, Any], plan: EvalPlan
) -> tuple[dict[str, BenchmarkScore], dict[str, list[float]]]:
    """Scores and per-item scores of the task entries, from :func:`rpsft.evaluation.harness_tasks.run_tasks`."""
    from rpsft.evaluation.harness_tasks import item_values, task_result

    scores: dict[str, BenchmarkScore] = {}
    items: dict[str, list[float]] = {}
    for planned in plan.tasks:
        task = planned.harness
        if task is None:
            continue
        score, stderr = task_result(raw, task)
        items[planned.bench.name] = item_values(raw, task)
        scores[planned.bench.name] = BenchmarkScore(
            name=planned.bench.name,
            title=planned.bench.title or task.name,
            suite=planned.bench.suite,
            scorer="lm-eval",
            task=task.name,
            n_items=len(items[planned.bench.name]),
            n_samples=1,
            pass_k=1,
            avg_at_k=score,
            pass_at_k=score,
            metric=task.metric,
            higher_is_better=task.higher_is_better,
            stderr=stderr,
        )
    return scores, items


def _own_items(raw: dict[str, Any], plan: EvalPlan) -> dict[str, list[float]]:
    """Each item's avg@k over its samples, per own benchmark, in item order."""
    out: dict[str, list[float]] = {}
    for planned in plan.own_tasks:
        rows = sorted(
            raw.get("samples", {}).get(planned.bench.task_name, []), key=lambda r: r["doc"]["index"]
        )
        out[planned.bench.name] = [float(r[METRIC_AVG]) for r in rows]
    return out


def _samples(raw: dict[str, Any], plan: EvalPlan) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for planned in plan.own_tasks:
        rows = []
        for s in raw.get("samples", {}).get(planned.bench.task_name, []):
            resps = s.get("filtered_resps", [[]])
            rows.append(
                {
                    "index": s["doc"]["index"],
                    "target": s["target"],
                    "responses": resps[0] if resps and isinstance(resps[0], list) else resps,
                    METRIC_AVG: s.get(METRIC_AVG),
                    METRIC_PASS: s.get(METRIC_PASS),
                }
            )
        out[planned.bench.name] = rows
    return out


def build_result(
    model_label: str, scores: dict[str, BenchmarkScore], plan: EvalPlan, seconds: float, backend: str = "hf"
) -> EvalResult:
    suites = {
        suite: macro_average({n: s.oriented(s.avg_at_k) for n, s in scores.items() if s.suite == suite})
        for suite in ("id", "ood")
    }
    suites_pass = {
        suite: macro_average({n: s.oriented(s.pass_at_k) for n, s in scores.items() if s.suite == suite})
        for suite in ("id", "ood")
    }
    return EvalResult(
        model=model_label,
        benchmarks=scores,
        suites=suites,
        suites_pass=suites_pass,
        config_hash=plan_config_hash(plan, backend),
        settings=json.loads(plan.settings.model_dump_json()),
        seconds=seconds,
    )


def run_lm_eval(
    lm: Any,
    plan: EvalPlan,
    *,
    log_samples: bool = False,
    tasks_dir: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """``simple_evaluate`` on the plan's tasks (YAML written to ``tasks_dir`` or a temporary directory)."""
    from lm_eval.tasks import TaskManager

    settings = plan.settings
    with contextlib.ExitStack() as stack:
        if tasks_dir is None:
            tasks_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rpsft-tasks-"))
        write_task_dir(plan, tasks_dir)
        stack.enter_context(_quiet_lm_eval(verbose))
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        raw = seeded_evaluate(
            lm,
            plan.task_names,
            manager,
            settings,
            apply_chat_template=True,
            log_samples=log_samples,
            bootstrap_iters=0,
        )
    return raw


def evaluate(
    model: Any,
    tokenizer: Any = None,
    settings: EvalSettings | None = None,
    *,
    plan: EvalPlan | None = None,
    model_label: str | None = None,
    log_samples: bool = False,
    tasks_dir: str | Path | None = None,
    verbose: bool = False,
) -> EvalResult:
    """Score a model on the selected benchmarks.

    ``model``: an in-memory ``transformers`` model (with ``tokenizer``), a model name/path for
    :func:`rpsft.core.models.load_model`, or an ``lm_eval.api.model.LM``. Everything is validated before a
    model is loaded (an ``EvalConfigError`` names the field and the fix).
    """
    settings = settings or EvalSettings()
    plan = plan or plan_evaluation(settings)
    _check_model(settings, model, tokenizer)
    label = model_label or (str(model) if isinstance(model, (str, Path)) else type(model).__name__)
    start = time.perf_counter()
    scores: dict[str, BenchmarkScore] = {}
    items: dict[str, list[float]] = {}
    raw = None
    # HFLM switches the model to eval mode when it wraps it: keep the caller's mode (and RNG states).
    with _preserved_state(model), _quiet_lm_eval(verbose):
        lm = make_lm(model, tokenizer, settings)
        if plan.own_tasks:
            raw = run_lm_eval(lm, plan, log_samples=True, tasks_dir=tasks_dir, verbose=verbose)
            scores.update(parse_results(raw, plan))
            items.update(_own_items(raw, plan))
        if len(plan.own_tasks) < len(plan.tasks):
            from rpsft.evaluation.harness_tasks import run_tasks

            task_scores, task_items = parse_task_results(
                run_tasks(lm, [t.harness for t in plan.tasks if t.harness is not None], settings), plan
            )
            scores.update(task_scores)
            items.update(task_items)
    scores = {t.bench.name: scores[t.bench.name] for t in plan.tasks}  # in plan order
    backend = resolve_backend(settings.backend, model)
    result = build_result(label, scores, plan, time.perf_counter() - start, backend)
    result.items = {name: items[name] for name in scores}
    if log_samples and raw is not None:
        result.samples = _samples(raw, plan)
    return result
