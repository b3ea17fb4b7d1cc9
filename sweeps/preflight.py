"""Checks that run before any trial: config-level storage rules, storage and tracking reachability, data,
evaluation items, model, the Ray cluster's resources and the memory of one trial's workers. Each failure is
a :class:`SweepConfigError` that names the config field and the fix.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.config.sweep import SweepConfig
from rpsft.sweeps.store.optuna_storage import optuna_storage

if TYPE_CHECKING:
    from rpsft.core.config import TrainConfig
    from rpsft.core.memory.dims import ModelDims
    from rpsft.core.memory.report import MemoryEstimate


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def check_storage_rules(config: SweepConfig, optuna_url: str, mlflow_uri: str) -> None:
    """SQLite takes one writer at a time; two services in one database clash on their migration tables."""
    if config.concurrency > 1:
        if _is_sqlite(optuna_url):
            raise SweepConfigError(
                f"storage.optuna: {optuna_url} is SQLite, which is unsafe for concurrent writers "
                f"(concurrency: {config.concurrency}). Fix: a postgresql:// URL or journal:<file>, or concurrency: 1"
            )
        if _is_sqlite(mlflow_uri):
            raise SweepConfigError(
                f"storage.mlflow: {mlflow_uri} is SQLite; concurrent trials fail with 'database is locked' "
                f"(concurrency: {config.concurrency}). Fix: a postgresql:// URL or an http:// tracking server, "
                "or concurrency: 1"
            )
    if optuna_url == mlflow_uri:
        raise SweepConfigError(
            f"storage: Optuna and MLflow both point at {optuna_url}; both keep an 'alembic_version' table. "
            "Fix: separate databases (or PostgreSQL schemas, e.g. ?options=-csearch_path%3Dmlflow)"
        )


def check_optuna_storage(url: str) -> Any:
    try:
        return optuna_storage(url)
    except Exception as exc:
        raise SweepConfigError(
            f"storage.optuna: cannot open {url}: {_first_line(exc)}. "
            "Fix: a reachable database URL (sqlite:///path.db, postgresql://user@host:5432/db) or journal:<file>"
        ) from None


def check_mlflow(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            raise SweepConfigError(
                f"storage.mlflow: the tracking server {uri} does not answer ({_first_line(exc)}). "
                "Fix: start it (`mlflow server --backend-store-uri ...`) or use a sqlite:/// URL"
            ) from None
        return
    if uri.startswith("file:") or "://" not in uri:
        return
    import sqlalchemy

    if _is_sqlite(uri):
        Path(uri.split(":///", 1)[-1]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"connect_timeout": 5}} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, **kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        raise SweepConfigError(
            f"storage.mlflow: cannot connect to {uri}: {_first_line(exc)}. "
            "Fix: a reachable database URL or tracking server"
        ) from None


def check_inputs(config: SweepConfig, scorer: Any) -> None:
    """A model given as a local path exists; training data and every evaluation item load and parse (no model
    loaded)."""
    from rpsft.core.data import DataError, load_examples
    from rpsft.core.memory.dims import refuse_missing_local_model

    refuse_missing_local_model(config.model)  # "model: no such directory or file", not a skipped preflight
    from rpsft.evaluation.benchmarks import EvalConfigError
    from rpsft.evaluation.items import EvalDataError

    limit = config.train.get("data_limit")
    try:
        examples = load_examples(config.data, limit=limit, seed=config.seed)
    except (DataError, OSError, ValueError) as exc:
        raise SweepConfigError(f"data: {exc}") from None
    if not examples:
        raise SweepConfigError(f"data: {config.data} holds no examples. Fix: a non-empty dataset")
    try:
        prompts = scorer.check()
    except (EvalConfigError, EvalDataError, OSError, ValueError) as exc:
        raise SweepConfigError(f"evaluation: {exc}") from None
    check_no_overlap(config.data, examples, prompts)
    check_item_split(config, scorer)
    if config.auto_k_specs():
        source = config.evaluation.auto_k_source()
        if not Path(source).is_file():
            raise SweepConfigError(
                f"evaluation.auto_k_prompts: {source} does not exist; k: auto needs OOD prompts. "
                "Fix: point it at a JSONL of prompts, or drop 'auto' from space.k"
            )


def check_item_split(config: SweepConfig, scorer: Any) -> None:
    """Every benchmark the objective scores per item can be split into selection and report items
    (``evaluation.split``; at least 2 items each), so the split fails here, before any trial, not at the end."""
    from rpsft.evaluation.item_split import ItemSplitError
    from rpsft.evaluation.loss_metrics import loss_items

    split = config.evaluation.split.item_split()
    metric = config.objective.metric
    if not split.active or metric not in ("nll", "kl", "mc"):
        return
    items = loss_items(scorer.loss_settings)
    counts = {"id": {b: len(c) for b, c in items.id_conversations.items()}}
    if metric == "mc" and scorer.mc_settings is not None:
        from rpsft.evaluation.multiple_choice import mc_benchmark_docs

        counts["ood"] = {b: len(d) for b, d in mc_benchmark_docs(scorer.mc_settings).items()}
    else:
        counts["ood"] = {b: len(p) for b, p in items.ood_prompts.items()}
    try:
        split.counts(
            {suite: {b: [None] * n for b, n in benches.items()} for suite, benches in counts.items()}
        )
    except ItemSplitError as exc:
        raise SweepConfigError(str(exc)) from None


def check_no_overlap(source: str, examples: list[Any], prompts: list[str]) -> None:
    """No training example repeats a scored item (exact or near-duplicate user text)."""
    from rpsft.core.math_data import find_overlap

    pairs = find_overlap(examples, prompts)
    if pairs:
        train_index, eval_index = pairs[0]
        raise SweepConfigError(
            f"data: {len(pairs)} training example(s) of {source} overlap the items the sweep scores "
            f"(first: example #{train_index} and the scored prompt {prompts[eval_index][:80]!r}). "
            "Fix: remove them from the training data, or score other items"
        )


def check_resources(config: SweepConfig, cluster: dict[str, float]) -> None:
    """The Ray cluster can hold at least one trial (all of its workers when ``resources.workers > 1``)."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    resources = config.resources
    if resources.distributed:
        workers = resources.workers
        need_gpus, need_cpus = workers * resources.gpus_per_worker, workers * resources.cpus
        if need_gpus > gpus:
            fits = int(gpus // resources.gpus_per_worker)
            raise SweepConfigError(
                f"resources.workers: each trial runs {workers} workers with {resources.gpus_per_worker:g} GPU(s) "
                f"each ({need_gpus:g} GPUs) but the Ray cluster has {gpus:g}. Fix: resources.workers <= "
                f"{fits}"
                + (" (at least 2)" if fits < 2 else "")
                + ", or a cluster with more GPUs (--address)"
            )
        if need_cpus > cpus:
            raise SweepConfigError(
                f"resources.cpus: each trial runs {workers} workers with {resources.cpus:g} CPUs each "
                f"({need_cpus:g} CPUs) but the Ray cluster has {cpus:g}. Fix: resources.cpus <= "
                f"{cpus / workers:g}, or fewer resources.workers"
            )
        return
    if resources.gpus > gpus:
        raise SweepConfigError(
            f"resources.gpus: each trial asks for {resources.gpus:g} GPU(s) but the Ray cluster has "
            f"{gpus:g}. Fix: resources.gpus <= {gpus:g} (fractions share a GPU), or a cluster with GPUs (--address)"
        )
    if resources.cpus > cpus:
        raise SweepConfigError(
            f"resources.cpus: each trial asks for {resources.cpus:g} CPUs but the Ray cluster has "
            f"{cpus:g}. Fix: resources.cpus <= {cpus:g}"
        )


# ---------------------------------------------------------------------------------------------- memory

GPU_QUERY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MemoryCheck:
    """What :func:`check_memory` compared: the trial config with the largest estimate (``where``, named as
    the sweep config names it), its per-worker estimate, and the memory of one worker's device."""

    where: str
    estimate: MemoryEstimate
    device_bytes: int
    device: str
    budget: int


def _trial_candidates(config: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every trial config whose memory can differ: each reference, and each (k, layers) of the space (the
    method, k and layers set the bases and the trained parameters; lambda and period do not). A ``k: auto``
    counts as :data:`rpsft.core.memory.preflight.AUTO_K_FRACTION`."""
    from rpsft.core.memory.preflight import AUTO_K_FRACTION

    out: list[tuple[str, dict[str, Any]]] = []
    for i, params in enumerate(config.reference_params()):
        if isinstance(params.get("k"), str):
            params = {**params, "k": AUTO_K_FRACTION}
        out.append((f"references[{i}] ({params['reference']})", params))
    if config.search.num_trials:
        lam = config.space.lam_choices()[0]
        for k in config.space.k_choices():
            for label in config.space.layer_labels():
                params = {"k": AUTO_K_FRACTION if isinstance(k, str) else k, "lambda": lam, "layers": label}
                out.append((f"space.k {k}, space.layers {label}", params))
    return out


def largest_trial_memory(config: SweepConfig, dims: ModelDims) -> tuple[str, MemoryEstimate, TrainConfig]:
    """The trial config of the sweep with the largest per-worker estimate: ``(where, estimate, config)``."""
    from pydantic import ValidationError
    from rpsft.core.memory.preflight import estimate_train_memory

    best: tuple[str, MemoryEstimate, TrainConfig] | None = None
    for where, params in _trial_candidates(config):
        try:
            train_config = config.trial_train_config(params, output_dir="memory-preflight")
        except ValidationError:  # the config validator names these; they never become trials
            continue
        estimate = estimate_train_memory(train_config, dims)
        if best is None or estimate.total > best[1].total:
            best = (where, estimate, train_config)
    if best is None:
        raise SweepConfigError("memory preflight: the sweep has no trial config to estimate")
    return best


def gpu_memory_bytes(gpus: float = 1.0, timeout_s: float = GPU_QUERY_TIMEOUT_S) -> int:
    """The total memory of a GPU as a Ray worker sees it: a task with ``num_gpus=gpus`` (at most 1) reads
    ``torch.cuda.get_device_properties(0).total_memory``."""
    import ray

    @ray.remote(num_gpus=min(1.0, gpus), num_cpus=0)
    def total_memory() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)

    ref = total_memory.remote()
    try:
        return int(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"no GPU task ran within {timeout_s:g} s") from None


def _node_memory(cluster: dict[str, float]) -> tuple[float, float]:
    """``(total, largest node)`` of the memory Ray gives tasks (its ``memory`` resource), in bytes."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")] if ray.is_initialized() else []
    per_node = [float(node.get("Resources", {}).get("memory", 0.0)) for node in nodes]
    total = sum(per_node) or float(cluster.get("memory", 0.0))
    return total, max(per_node, default=total)


def _concurrent_trials(config: SweepConfig, cluster: dict[str, float], concurrency: int) -> int:
    """How many trials run at once: ``concurrency``, as far as the cluster's CPUs hold their workers."""
    per_trial = config.resources.workers * config.resources.cpus
    return max(1, min(concurrency, int(cluster.get("CPU", per_trial) // per_trial)))


def cpu_memory_per_process(
    config: SweepConfig, cluster: dict[str, float], concurrency: int | None = None
) -> tuple[int, str]:
    """The memory one training process of a CPU sweep can use: Ray's memory divided by the processes that run
    at once (``resources.workers`` x the trials at once), at most one node's; with a description."""
    total, largest = _node_memory(cluster)
    trials = _concurrent_trials(config, cluster, concurrency or config.concurrency)
    processes = trials * config.resources.workers
    share = int(min(largest, total / processes))
    return share, f"node memory per process ({processes} process(es) at once)"


def _skip(reason: str) -> None:
    from rpsft.core.memory.preflight import MemoryPreflightWarning

    warnings.warn(f"memory preflight skipped: {reason}", MemoryPreflightWarning, stacklevel=3)


def check_memory(
    config: SweepConfig,
    cluster: dict[str, float],
    *,
    device_bytes: int | None = None,
    dims: ModelDims | None = None,
    headroom: float = 0.9,
    echo: Callable[[str], Any] | None = None,
) -> MemoryCheck | None:
    """The largest trial of the sweep fits the memory of one worker's device, or a :class:`SweepConfigError`
    with the per-part table and the fixes, before any trial.

    The model's sizes come from its config only (:func:`rpsft.core.memory.dims.model_dims_for`, offline: a local
    directory, an embedded name, a ``.gguf`` file, or a hub id in the local HF cache); every trial config
    (:func:`largest_trial_memory`) is estimated by :func:`rpsft.core.memory.preflight.estimate_train_memory`. The
    device: when a trial uses GPUs (``resources.gpus_per_process > 0``), the memory of a GPU as a Ray task
    reads it (:func:`gpu_memory_bytes`; a fraction of it when trials share GPUs); on CPU, Ray's node memory
    divided by the processes that run at once (:func:`cpu_memory_per_process`). ``device_bytes`` and
    ``dims`` replace what would be read. When the sizes or the GPU's memory cannot be read, a
    :class:`rpsft.core.memory.preflight.MemoryPreflightWarning` says so and ``None`` is returned: the check never
    stops a sweep it cannot size. Returns the :class:`MemoryCheck` that passed (``echo``: a line about it
    and the estimate's table)."""
    from rpsft.core.memory.dims import model_dims_for
    from rpsft.core.memory.preflight import MemoryPreflightError, check_fits
    from rpsft.core.memory.report import GIB

    if dims is None:
        try:
            dims = model_dims_for(config.model, cache_dir=config.cache_dir, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  # whatever hides the sizes, the sweep goes on unchecked
            _skip(f"the sizes of model {config.model!r} are not available offline ({_first_line(exc)})")
            return None
    where, estimate, train_config = largest_trial_memory(config, dims)
    gpus = config.resources.gpus_per_process
    on_gpu = gpus > 0
    if device_bytes is not None:
        device = "GPU memory" if on_gpu else "memory per process"
    elif on_gpu:
        try:
            device_bytes = gpu_memory_bytes(gpus)
        except Exception as exc:  # noqa: BLE001
            _skip(f"the memory of a GPU could not be read through Ray ({_first_line(exc)})")
            return None
        device = "GPU memory"
        if gpus < 1 and config.concurrency > 1:  # trials that share a GPU share its memory
            device = f"GPU memory ({gpus:g} of a {device_bytes / GIB:.0f} GiB GPU)"
            device_bytes = int(device_bytes * gpus)
    else:
        device_bytes, device = cpu_memory_per_process(config, cluster)
        if device_bytes <= 0:
            _skip("the Ray cluster reports no memory resource")
            return None
    subject = f"a worker of {where} (the sweep's largest trial)"
    sharded = train_config.spec.sharded  # the method trains over several workers
    try:
        check_fits(
            estimate,
            device_bytes,
            headroom=headroom,
            device=device,
            more_workers=on_gpu and sharded,
            subject=subject,
        )
    except MemoryPreflightError as exc:
        message = str(exc)
        if not sharded and where.startswith("references["):
            message += (
                f"\nOr drop {where} from references: method {train_config.method} runs in one process "
                "(resources.workers: 1)"
            )
        if not on_gpu and config.concurrency > 1:
            fewer = _fewer_trials_at_once(config, cluster, estimate.total, headroom)
            if fewer is not None:
                message += f"\nOr fewer trials at once: concurrency: {fewer}"
        raise SweepConfigError(message) from None
    budget = int(headroom * device_bytes)
    if echo is not None:
        echo(
            f"[rpsft] memory preflight: {where} needs an estimated {estimate.total / GIB:.1f} GiB per worker, "
            f"{budget / GIB:.1f} GiB usable ({device}); the largest trial per worker:\n{estimate.table()}"
        )
    return MemoryCheck(where, estimate, device_bytes, device, budget)


def _fewer_trials_at_once(
    config: SweepConfig, cluster: dict[str, float], need: int, headroom: float
) -> int | None:
    """The largest concurrency below the current one at which a CPU trial's processes fit Ray's memory."""
    for concurrency in range(config.concurrency - 1, 0, -1):
        share, _ = cpu_memory_per_process(config, cluster, concurrency)
        if need <= headroom * share:
            return concurrency
    return None
