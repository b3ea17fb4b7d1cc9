"""lm-evaluation-harness task definitions built from the benchmark registry.

Every benchmark becomes one lm-eval YAML task, ``rpsft_<name>`` (tags ``rpsft``, ``rpsft_id``/``rpsft_ood``):

* ``custom_dataset: !function rpsft.evaluation.lm_eval_tasks.load_docs`` reads the benchmark's JSONL under the data
  dir (or its hub dataset) through :mod:`rpsft.evaluation.items`, the same validated items ``rpsft eval`` plans with;
* ``description: system`` / ``doc_to_text: user``: with ``apply_chat_template`` lm-eval renders exactly the
  item's system and user messages with the model's chat template (no few-shot);
* ``repeats: n`` samples per item, and a ``take_first_k`` filter with ``k = n`` that keeps **all** of them
  (lm-eval's default ``take_first`` filter would score only the first sample; lm-eval #1232, #3080);
* ``process_results: !function rpsft.evaluation.lm_eval_tasks.process_results`` scores every sample (math-verify,
  option letter, or lm-eval's loose IFEval checkers) and returns per-item ``avg@k`` and unbiased ``pass@k``
  (plus ``inst_loose@k`` for IFEval), averaged over items by ``mean``.

:func:`write_task_dir` writes these YAML files; ``rpsft eval`` loads them with a ``TaskManager`` and so does
``lm_eval --include_path DIR`` (or ``simple_evaluate(..., task_manager=TaskManager(include_path=DIR))``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from rpsft.evaluation.benchmarks import Benchmark
from rpsft.evaluation.settings import EvalPlan, EvalSettings, PlannedTask

TASK_FORMAT_VERSION = 1
FILTER_NAME = "all_repeats"
METRIC_AVG = "avg@k"
METRIC_PASS = "pass@k"
METRIC_INST = "inst_loose@k"


class FunctionRef(str):
    """A dotted function path written as a YAML ``!function`` tag."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_config(planned: PlannedTask, settings: EvalSettings, *, data_dir_key: bool = True) -> dict[str, Any]:
    """The lm-eval task config (YAML-ready) of one planned benchmark."""
    bench = planned.bench
    n = planned.n_samples
    metrics = [
        {"metric": METRIC_AVG, "aggregation": "mean", "higher_is_better": True},
        {"metric": METRIC_PASS, "aggregation": "mean", "higher_is_better": True},
    ]
    if bench.scorer == "ifeval":
        metrics.append(
            {
                "metric": METRIC_INST,
                "aggregation": FunctionRef("rpsft.evaluation.metrics.flatten_mean"),
                "higher_is_better": True,
            }
        )
    dataset_kwargs: dict[str, Any] = {
        "benchmark": json.loads(bench.model_dump_json()),
        "subset": settings.subset,
        "pass_k": planned.pass_k,
    }
    if data_dir_key:
        dataset_kwargs["data_dir"] = (
            str(Path(settings.data_dir).expanduser().resolve()) if settings.data_dir else None
        )
    return {
        "task": bench.task_name,
        "tag": ["rpsft", f"rpsft_{bench.suite}"],
        "custom_dataset": FunctionRef("rpsft.evaluation.lm_eval_tasks.load_docs"),
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "generate_until",
        "description": "system",
        "doc_to_text": "user",
        "doc_to_target": "target",
        "num_fewshot": 0,
        "repeats": n,
        "filter_list": [{"name": FILTER_NAME, "filter": [{"function": "take_first_k", "k": n}]}],
        "generation_kwargs": settings.generation_kwargs(n),
        "process_results": FunctionRef("rpsft.evaluation.lm_eval_tasks.process_results"),
        "metric_list": metrics,
        "metadata": {"version": 1, "rpsft_suite": bench.suite, "rpsft_scorer": bench.scorer, "rpsft_k": n},
    }


def plan_config_hash(plan: EvalPlan, backend: str = "hf") -> str:
    """Identifies everything that determines a plan's scores except the model (for the base-score cache): the
    task configs, the data sources, the limit, the batch size, the backend that runs it (``hf`` or ``vllm``, as
    :func:`rpsft.evaluation.backends.resolve_backend` chose it), the seed and the lm-eval version."""
    import lm_eval

    settings = plan.settings
    payload = {
        "format": TASK_FORMAT_VERSION,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "backend": backend,
        "seed": settings.seed,
        "tasks": [
            {"config": task_config(t, settings, data_dir_key=False), "source": t.source}
            for t in plan.own_tasks
        ],
        "lm_eval_tasks": [{"source": t.source} for t in plan.tasks if t.harness is not None],
        "task_chat_template": settings.task_chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def task_yaml(planned: PlannedTask, settings: EvalSettings) -> str:
    return yaml.dump(task_config(planned, settings), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def write_task_dir(plan: EvalPlan, directory: str | Path) -> Path:
    """Write one ``<task>.yaml`` per planned benchmark into ``directory`` (replacing older rpsft_*.yaml); task
    entries are lm-eval's own tasks and get none."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("rpsft_*.yaml"):
        old.unlink()
    for planned in plan.own_tasks:
        (directory / f"{planned.bench.task_name}.yaml").write_text(task_yaml(planned, plan.settings))
    return directory


# ------------------------------------------------------------------------------ functions the YAML names


def load_docs(
    benchmark: dict[str, Any] | None = None,
    data_dir: str | None = None,
    subset: str = "full",
    pass_k: int = 0,
    **_ignored: Any,
):
    """``custom_dataset`` of the tasks: the validated items of one benchmark as a ``DatasetDict``."""
    import datasets
    from rpsft.evaluation.items import load_items

    if benchmark is None:
        raise ValueError("load_docs: dataset_kwargs.benchmark is missing. Fix: regenerate the task YAML")
    bench = Benchmark.model_validate(benchmark)
    docs = []
    for item in load_items(bench, data_dir, subset):
        doc = item.doc()
        doc["pass_k"] = int(pass_k or 0)
        docs.append(doc)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def score_response(doc: dict[str, Any], response: str) -> tuple[bool, list[bool]]:
    """Score one sample: (correct, per-instruction results for IFEval else [])."""
    scorer = doc["scorer"]
    if scorer == "math":
        from rpsft.evaluation.answers import score_math

        return score_math(
            response,
            json.loads(doc["ground_truth"]),
            unit=doc.get("unit") or None,
            multiple=bool(doc.get("multiple")) or None,
        ), []
    if scorer == "mc":
        from rpsft.evaluation.answers import score_mc

        return score_mc(response, doc["target"], json.loads(doc.get("choices") or "{}")), []
    if scorer == "ifeval":
        from rpsft.evaluation.ifeval import ifeval_loose

        out = ifeval_loose(
            response, json.loads(doc["instruction_ids"]), json.loads(doc["instruction_kwargs"]), doc["user"]
        )
        return out.follow_all, out.follow_list
    raise ValueError(f"unknown scorer {scorer!r}")


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """Score every sample of one item; ``results[0]`` is the list of all its samples (``take_first_k``)."""
    from rpsft.evaluation.metrics import avg_at_k, pass_at_k

    samples = results[0] if results else []
    if isinstance(samples, str):  # a task run with lm-eval's default take_first filter: one sample
        samples = [samples]
    samples = list(samples)
    scored = [score_response(doc, s) for s in samples]
    correct = [c for c, _ in scored]
    n, c = len(correct), sum(correct)
    k = int(doc.get("pass_k") or 0) or n
    out: dict[str, Any] = {METRIC_AVG: avg_at_k(correct), METRIC_PASS: pass_at_k(n, c, min(k, n))}
    if doc["scorer"] == "ifeval":
        out[METRIC_INST] = [x for _, per in scored for x in per]
    return out
