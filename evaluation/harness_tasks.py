"""Benchmarks that name an lm-eval task (``{suite: ood, task: arc_challenge}``), scored as lm-eval scores them.

A task entry names a task of lm-eval's registry, a task YAML file, or a directory of task YAML (the
``--include_path`` of lm-eval's CLI; :attr:`EvalSettings.include_path` adds more). :func:`resolve_task` finds
it and loads it once while planning, so an unknown name, a group, a metric that is not a mean of per-item scores,
or a dataset that cannot be read (offline, no local copy) fails before any model is loaded, with the fix.

Scoring (:func:`run_tasks`, :func:`task_result`, :func:`item_values`) runs ``lm_eval.simple_evaluate`` on the task with
``log_samples``. The score is the task's primary metric (the first of its ``metric_list``) under its first
filter; the per-item values of that metric are the items the paired bootstrap resamples. A metric where lower is
better (``higher_is_better: false``) is negated in the item scores and the suite scores, so a gain is positive
for every benchmark. lm-eval's own standard error is kept beside.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from rpsft.evaluation.benchmarks import Benchmark, EvalConfigError, read_task_yaml

LOCAL_OVERRIDE = (
    "a task YAML that includes the registry file and reads local files in the same schema, e.g.\n"
    "  include: {source}\n"
    "  task: {name}_local\n"
    "  dataset_path: json\n"
    "  dataset_name: null\n"
    "  dataset_kwargs: {{data_files: {{test: /path/to/test.jsonl}}}}\n"
    "and give its path as the entry's task"
)


@dataclass(frozen=True)
class ResolvedTask:
    """One task entry, resolved: what lm-eval loads (``spec``), its task name, primary metric and filter."""

    bench: Benchmark
    spec: str  # a registry / include-path name, or the absolute path of a task YAML
    name: str  # lm-eval's task name: the key of its results
    metric: str
    higher_is_better: bool
    filter: str
    n_docs: int
    include_path: tuple[str, ...]
    output_type: str
    config_digest: str  # sha256 of lm-eval's resolved task config and the local data files it names


def _include_paths(bench: Benchmark, include_path: list[str]) -> tuple[str, ...]:
    paths = [str(Path(p).expanduser().resolve()) for p in include_path]
    task = Path(str(bench.task)).expanduser()
    if task.is_dir():
        paths.append(str(task.resolve()))
    return tuple(dict.fromkeys(paths))


@lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...] = ()) -> Any:
    """lm-eval's ``TaskManager`` over its own registry and ``include_path`` (indexed once per process)."""
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not Path(path).is_dir():
            raise EvalConfigError(
                f"include_path: {path} is not a directory. Fix: give a directory of lm-eval task YAML files"
            )
    return TaskManager(include_path=list(include_path) or None, include_defaults=True)


def _spec(bench: Benchmark, manager: Any) -> str:
    """What lm-eval loads for the entry: a task name, or a YAML path. Groups and tags are refused."""
    task = str(bench.task)
    path = Path(task).expanduser()
    where = f"benchmarks[{bench.name}].task"
    if path.is_file():
        return str(path.resolve())
    if path.is_dir():
        from lm_eval.tasks import TaskManager

        names = TaskManager(include_path=str(path), include_defaults=False).all_subtasks
        if len(names) != 1:
            raise EvalConfigError(
                f"{where}: directory {path} defines {len(names)} tasks ({', '.join(names[:8]) or 'none'}). Fix: "
                "name one of them as the task and give the directory as include_path"
            )
        return names[0]
    if task.endswith((".yaml", ".yml")) or "/" in task:
        raise EvalConfigError(f"{where}: {task} does not exist. Fix: give an existing task YAML or directory")
    if task in manager.all_groups or task in manager.all_tags:
        raise EvalConfigError(
            f"{where}: {task!r} is an lm-eval group or tag, not one task; its subtasks are scored with different "
            "items and metrics. Fix: one entry per subtask (`lm_eval ls groups` lists a group's subtasks)"
        )
    if task not in manager.all_subtasks:
        close = difflib.get_close_matches(task, manager.all_subtasks, n=5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise EvalConfigError(
            f"{where}: {task!r} is not an lm-eval task.{hint} Fix: a name from lm-eval's registry "
            "(`lm_eval ls tasks`), a task YAML path, or a directory given as include_path"
        )
    return task


def _registry_file(manager: Any, name: str) -> str:
    entry = manager.task_index.get(name)
    return str(getattr(entry, "yaml_path", None) or getattr(entry, "path", None) or f"<{name}.yaml>")


def resolve_task(bench: Benchmark, include_path: list[str] | None = None) -> ResolvedTask:
    """Find and load the entry's task (its dataset included); refuse what cannot be scored per item. Resolved
    once per process for each entry and include path (a sweep plans its evaluation for every trial)."""
    return _resolve(bench.model_dump_json(), tuple(include_path or ()), _mtimes(bench, include_path or []))


def _mtimes(bench: Benchmark, include_path: list[str]) -> tuple[int, ...]:
    """Modification times of the files an entry may read (its task YAML and the local data files they name), so
    an edited task or changed data is resolved again."""
    roots = [Path(str(bench.task)).expanduser(), *(Path(p).expanduser() for p in include_path)]
    files = [f for root in roots if root.exists() for f in ([root] if root.is_file() else root.rglob("*.y*ml"))]
    files += [data for f in files for data in _data_files(read_task_yaml(f))]
    return tuple(f.stat().st_mtime_ns for f in files)


@lru_cache(maxsize=64)
def _resolve(bench_json: str, include_path: tuple[str, ...], mtimes: tuple[int, ...]) -> ResolvedTask:
    from lm_eval.api.metrics import mean

    bench = Benchmark.model_validate_json(bench_json)
    paths = _include_paths(bench, list(include_path))
    manager = task_manager(paths)
    spec = _spec(bench, manager)
    where = f"benchmarks[{bench.name}].task"
    try:
        loaded = manager.load([spec])
    except Exception as exc:  # noqa: BLE001  # the dataset loader raises many types (offline, missing, schema)
        source = spec if Path(spec).is_file() else _registry_file(manager, spec)
        raise EvalConfigError(
            f"{where}: lm-eval could not load task {bench.task!r} ({type(exc).__name__}: {str(exc)[:240]}). "
            "Fix: correct the task YAML if it is at fault; where its dataset is out of reach (offline, "
            "HF_DATASETS_OFFLINE), point the task at local files: "
            + LOCAL_OVERRIDE.format(source=source, name=Path(spec).stem if Path(spec).is_file() else spec)
        ) from None
    tasks = loaded["tasks"]
    if len(tasks) != 1 or loaded["groups"]:
        raise EvalConfigError(
            f"{where}: {bench.task!r} loads {len(tasks)} tasks ({', '.join(list(tasks)[:8])}). Fix: one entry per "
            "task"
        )
    ((name, task),) = tasks.items()
    config = task.config
    metric_list = list(getattr(config, "metric_list", None) or [])
    if not metric_list:
        raise EvalConfigError(f"{where}: task {name} has no metric_list. Fix: give the task a metric_list")
    metric = metric_list[0]["metric"]
    metric = metric if isinstance(metric, str) else getattr(metric, "__name__", str(metric))
    if task.aggregation().get(metric) is not mean:
        raise EvalConfigError(
            f"{where}: task {name}'s primary metric {metric!r} is not a mean of per-item scores, so its items "
            "cannot be resampled for intervals. Fix: a task whose first metric aggregates by mean"
        )
    filters = [f["name"] for f in (getattr(config, "filter_list", None) or []) if isinstance(f, dict)]
    dumped = task.dump_config()
    digest = hashlib.sha256(json.dumps(dumped, sort_keys=True, default=_stable).encode())
    for file in _data_files(dumped):
        digest.update(file.read_bytes())
    return ResolvedTask(
        bench=bench,
        spec=spec,
        name=name,
        metric=metric,
        higher_is_better=bool(task.higher_is_better().get(metric, True)),
        filter=filters[0] if filters else "none",
        n_docs=len(task.eval_docs),
        include_path=paths,
        output_type=str(config.output_type),
        config_digest=digest.hexdigest(),
    )


def _stable(value: Any) -> str:
    """A JSON stand-in for what a task config holds besides data: a function by its dotted name (its repr holds
    an address that differs between processes), anything else by its type and ``str``."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return f"{type(value).__name__}:{value}"


def _data_files(config: dict[str, Any]) -> list[Path]:
    """The local files a task config's ``dataset_kwargs.data_files`` names."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = list(files.values())
    names = [
        f
        for entry in (files if isinstance(files, list) else [files])
        for f in (entry if isinstance(entry, list) else [entry])
    ]
    return [Path(n).expanduser() for n in names if isinstance(n, str) and Path(n).expanduser().is_file()]


def task_source(task: ResolvedTask) -> str:
    """What identifies a task entry's scores in the base-score cache: the entry (name and suite), where lm-eval
    looked (spec and include path), and lm-eval's resolved task config with the local data files it names (so
    an edited task YAML, an ``include:``d file or changed data gives another key)."""
    entry = [task.bench.name, task.bench.suite, task.spec, list(task.include_path), task.config_digest]
    return "lm-eval:" + hashlib.sha256(json.dumps(entry).encode()).hexdigest()


def run_tasks(lm: Any, resolved: list[ResolvedTask], settings: Any) -> dict[str, Any]:
    """``simple_evaluate`` on the resolved tasks, as lm-eval runs them (their own prompts, few-shot and
    generation settings), with per-sample logging; ``settings`` gives the limit, the seed and whether to apply
    the chat template (:attr:`EvalSettings.task_chat_template`)."""
    by_paths: dict[tuple[str, ...], list[ResolvedTask]] = {}
    for task in resolved:
        by_paths.setdefault(task.include_path, []).append(task)
    raw: dict[str, Any] = {
        "results": {},
        "samples": {},
        "configs": {},
        "higher_is_better": {},
        "n-samples": {},
    }
    for paths, tasks in by_paths.items():
        out = seeded_evaluate(
            lm,
            list(dict.fromkeys(t.spec for t in tasks)),  # two entries may score one task
            task_manager(paths),
            settings,
            log_samples=True,
            apply_chat_template=settings.task_chat_template,
        )
        for key in raw:
            raw[key].update(out.get(key) or {})
    return raw


def seeded_evaluate(lm: Any, tasks: list[str], manager: Any, settings: Any, **kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with the settings' limit and seed (as every seed lm-eval takes)."""
    import lm_eval

    seed = settings.seed
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=settings.limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        **kwargs,
    )
    if out is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not rank 0?)")
    return out


def item_values(raw: dict[str, Any], task: ResolvedTask) -> list[float]:
    """The task's per-item values of its primary metric under its first filter, in document order, oriented so
    that higher is better."""
    rows = sorted(
        (s for s in raw["samples"].get(task.name, []) if s.get("filter") == task.filter),
        key=lambda s: s["doc_id"],
    )
    sign = 1.0 if task.higher_is_better else -1.0
    return [sign * float(row[task.metric]) for row in rows]


def task_result(raw: dict[str, Any], task: ResolvedTask) -> tuple[float, float | None]:
    """``(score, lm-eval's standard error)`` of the task's primary metric as lm-eval reports it."""
    results = raw["results"][task.name]
    score = float(results[f"{task.metric},{task.filter}"])
    stderr = results.get(f"{task.metric}_stderr,{task.filter}")
    try:
        return score, float(stderr)
    except (TypeError, ValueError):  # "N/A"
        return score, None
