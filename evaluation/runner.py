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
from rpsft.evaluation.benchmarks import EvalConfigError
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
    avg_at_k: float
    pass_at_k: float
    extra: dict[str, float] = Field(default_factory=dict)


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

    def suite_scores(self, metric: str = "avg_at_k") -> dict[str, dict[str, float]]:
        """``{"id": {benchmark: score}, "ood": {...}}`` for ``metric`` (``avg_at_k`` or ``pass_at_k``)."""
        out: dict[str, dict[str, float]] = {"id": {}, "ood": {}}
        for name, score in self.benchmarks.items():
            out.setdefault(score.suite, {})[name] = float(getattr(score, metric))
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
    rows = [("benchmark", "suite", "items", "k", "avg@k", "pass@k")]
    for score in result.benchmarks.values():
        rows.append(
            (
                score.title,
                score.suite,
                str(score.n_items),
                str(score.n_samples),
                f"{score.avg_at_k:.4f}",
                f"{score.pass_at_k:.4f}",
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
                    f"{result.suites[suite]:.4f}",
                    f"{result.suites_pass[suite]:.4f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
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
    if settings.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise EvalConfigError(
                "backend: vllm is not installed. Fix: pip install vllm, or use --backend hf"
            )
        if not isinstance(model, (str, Path)):
            raise EvalConfigError(
                "backend: vllm loads the model from a path; an in-memory model needs --backend hf. "
                "Fix: pass a model name/path, or use the hf backend"
            )


def make_lm(model: Any, tokenizer: Any, settings: EvalSettings):
    """The lm-eval LM for a model: an lm-eval ``LM`` as is, a path/name loaded, an in-memory HF model wrapped."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    if isinstance(model, (str, Path)):
        if settings.backend == "vllm":
            from lm_eval.models.vllm_causallms import VLLM
            from rpsft.core.models import resolve_model_dir

            return VLLM(
                pretrained=resolve_model_dir(str(model)), batch_size=settings.batch_size, seed=settings.seed
            )
        from rpsft.core.models import load_model

        model, tokenizer = load_model(str(model), device=settings.device)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)


def parse_results(raw: dict[str, Any], plan: EvalPlan) -> dict[str, BenchmarkScore]:
    """Per-benchmark scores from ``simple_evaluate``'s output."""
    scores: dict[str, BenchmarkScore] = {}
    n_samples = raw.get("n-samples", {})
    for planned in plan.tasks:
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
            scorer=bench.scorer,
            task=bench.task_name,
            n_items=int(n_items),
            n_samples=planned.n_samples,
            pass_k=planned.pass_k,
            avg_at_k=float(res[f"{METRIC_AVG},{FILTER_NAME}"]),
            pass_at_k=float(res[f"{METRIC_PASS},{FILTER_NAME}"]),
            extra=extra,
        )
    return scores


def _samples(raw: dict[str, Any], plan: EvalPlan) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for planned in plan.tasks:
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
    model_label: str, scores: dict[str, BenchmarkScore], plan: EvalPlan, seconds: float
) -> EvalResult:
    suites = {
        suite: macro_average({n: s.avg_at_k for n, s in scores.items() if s.suite == suite})
        for suite in ("id", "ood")
    }
    suites_pass = {
        suite: macro_average({n: s.pass_at_k for n, s in scores.items() if s.suite == suite})
        for suite in ("id", "ood")
    }
    return EvalResult(
        model=model_label,
        benchmarks=scores,
        suites=suites,
        suites_pass=suites_pass,
        config_hash=plan_config_hash(plan),
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
    import lm_eval
    from lm_eval.tasks import TaskManager

    settings = plan.settings
    with contextlib.ExitStack() as stack:
        if tasks_dir is None:
            tasks_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rpsft-tasks-"))
        write_task_dir(plan, tasks_dir)
        stack.enter_context(_quiet_lm_eval(verbose))
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=plan.task_names,
            task_manager=manager,
            apply_chat_template=True,
            limit=settings.limit,
            log_samples=log_samples,
            bootstrap_iters=0,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not rank 0?)")
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
    # HFLM switches the model to eval mode when it wraps it: keep the caller's mode (and RNG states).
    with _preserved_state(model), _quiet_lm_eval(verbose):
        lm = make_lm(model, tokenizer, settings)
        raw = run_lm_eval(lm, plan, log_samples=log_samples, tasks_dir=tasks_dir, verbose=verbose)
    result = build_result(label, parse_results(raw, plan), plan, time.perf_counter() - start)
    if log_samples:
        result.samples = _samples(raw, plan)
    return result
