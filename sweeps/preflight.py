"""Checks that run before any trial: config-level storage rules, storage and tracking reachability, data,
evaluation items, model, and the Ray cluster's resources. Each failure is a :class:`SweepConfigError` that
names the config field and the fix.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sweeps.config import SweepConfig, SweepConfigError
from sweeps.optuna_storage import optuna_storage


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
    """Training data and every evaluation item load and parse (no model needed)."""
    from evaluation.benchmarks import EvalConfigError
    from evaluation.items import EvalDataError
    from rpsft_core.data import DataError, load_examples

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
    if config.auto_k_specs():
        source = config.evaluation.auto_k_source()
        if not Path(source).is_file():
            raise SweepConfigError(
                f"evaluation.auto_k_prompts: {source} does not exist; k: auto needs OOD prompts. "
                "Fix: point it at a JSONL of prompts, or drop 'auto' from space.k"
            )


def check_no_overlap(source: str, examples: list[Any], prompts: list[str]) -> None:
    """No training example repeats a scored item (exact or near-duplicate user text)."""
    from rpsft_core.math_data import find_overlap

    pairs = find_overlap(examples, prompts)
    if pairs:
        train_index, eval_index = pairs[0]
        raise SweepConfigError(
            f"data: {len(pairs)} training example(s) of {source} overlap the items the sweep scores "
            f"(first: example #{train_index} and the scored prompt {prompts[eval_index][:80]!r}). "
            "Fix: remove them from the training data, or score other items"
        )


def check_resources(config: SweepConfig, cluster: dict[str, float]) -> None:
    """The Ray cluster can hold at least one trial."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if config.resources.gpus > gpus:
        raise SweepConfigError(
            f"resources.gpus: each trial asks for {config.resources.gpus:g} GPU(s) but the Ray cluster has "
            f"{gpus:g}. Fix: resources.gpus <= {gpus:g} (fractions share a GPU), or a cluster with GPUs (--address)"
        )
    if config.resources.cpus > cpus:
        raise SweepConfigError(
            f"resources.cpus: each trial asks for {config.resources.cpus:g} CPUs but the Ray cluster has "
            f"{cpus:g}. Fix: resources.cpus <= {cpus:g}"
        )
