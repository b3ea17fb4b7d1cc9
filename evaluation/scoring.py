"""G_id, F_ood and Phi = G_id - beta * F_ood of a tuned model against its base, with cached base scores.

A sweep evaluates its base model once: :func:`base_scores` stores the base's :class:`EvalResult` under
``<cache_dir>/base/<model key>-<task config hash>.json``. The model key is a sha256 of the weights
(:func:`model_fingerprint`) for an in-memory model, or of the path and file sizes/mtimes for a model named by
path (:func:`name_fingerprint`); the task config hash (:func:`rpsft.evaluation.lm_eval_tasks.plan_config_hash`)
covers the generated lm-eval task configs (k, generation settings, scorer), the data files' sha256, the limit,
the batch size and the lm-eval version. Anything that changes the numbers changes the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rpsft.evaluation.backends import resolve_backend
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.lm_eval_tasks import plan_config_hash
from rpsft.evaluation.metrics import TradeOff, tradeoff
from rpsft.evaluation.runner import EvalResult, evaluate
from rpsft.evaluation.settings import EvalPlan, EvalSettings, plan_evaluation


def model_fingerprint(model: Any) -> str:
    """sha256 over the model class, its config and the bytes of every parameter and buffer."""
    from rpsft.core.fingerprint import tensors_sha256

    header = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        header += json.dumps(cfg, sort_keys=True, default=str)
    return tensors_sha256(
        ((f"{name}:{t.dtype}:{tuple(t.shape)}", t) for name, t in list(model.state_dict().items())),
        header=header,
    )


def name_fingerprint(name_or_path: str | Path) -> str:
    """A cheap key for a model named by path or embedded name: the resolved path and its files' sizes/mtimes."""
    from rpsft.core.models import resolve_model_dir

    source = resolve_model_dir(str(name_or_path))
    digest = hashlib.sha256(f"name:{source}".encode())
    path = Path(source)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def model_key(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return name_fingerprint(model)
    return model_fingerprint(model)


class BaseScoreCache:
    """Base-model results on disk, keyed by (model key, task config hash)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir) / "base"

    def path(self, key: str, config_hash: str) -> Path:
        return self.root / f"{key[:24]}-{config_hash[:24]}.json"

    def get(self, key: str, config_hash: str) -> EvalResult | None:
        path = self.path(key, config_hash)
        if not path.is_file():
            return None
        try:
            result = EvalResult.load(path)
        except (ValueError, OSError):
            return None
        return result if result.config_hash == config_hash else None

    def put(self, key: str, config_hash: str, result: EvalResult) -> Path:
        path = self.path(key, config_hash)
        tmp = path.with_suffix(".partial")
        result.save(tmp)
        tmp.replace(path)
        return path


def base_scores(
    base_model: Any,
    tokenizer: Any = None,
    settings: EvalSettings | None = None,
    *,
    plan: EvalPlan | None = None,
    key: str | None = None,
    cache_dir: str | Path | None = None,
    **evaluate_kwargs: Any,
) -> tuple[EvalResult, bool]:
    """The base model's scores, from the cache when present: ``(result, cache_hit)``."""
    settings = settings or EvalSettings()
    plan = plan or plan_evaluation(settings)
    cache = BaseScoreCache(cache_dir or settings.resolved_cache_dir())
    key = key or model_key(base_model)
    config_hash = plan_config_hash(plan, resolve_backend(settings.backend, base_model))
    cached = cache.get(key, config_hash)
    if cached is not None:
        return cached, True
    result = evaluate(base_model, tokenizer, settings, plan=plan, **evaluate_kwargs)
    cache.put(key, config_hash, result)
    return result, False


def compute_tradeoff(
    base: EvalResult, tuned: EvalResult, betas: Sequence[float] = (1.0,), metric: str = "avg_at_k"
) -> TradeOff:
    """G_id, F_ood and Phi(beta) per benchmark and macro-averaged, from two results of the same task config."""
    if base.config_hash != tuned.config_hash:
        raise EvalConfigError(
            "tradeoff: base and tuned results come from different task configs (config hashes "
            f"{base.config_hash[:12]} vs {tuned.config_hash[:12]}). Fix: score both with the same settings"
        )
    return tradeoff(base.suite_scores(metric), tuned.suite_scores(metric), betas, metric=metric)


def evaluate_tradeoff(
    tuned_model: Any,
    tokenizer: Any,
    settings: EvalSettings,
    *,
    base_model: Any = None,
    base_tokenizer: Any = None,
    base_key: str | None = None,
    metric: str = "avg_at_k",
    **evaluate_kwargs: Any,
) -> tuple[EvalResult, EvalResult, TradeOff]:
    """Score the tuned model, get the (cached) base scores, and return ``(tuned, base, tradeoff)``.

    ``base_model`` may be ``None`` when ``base_key`` names a cached base result.
    """
    plan = plan_evaluation(settings)
    cache = BaseScoreCache(settings.resolved_cache_dir())
    if base_model is None:
        if base_key is None:
            raise EvalConfigError("base: give base_model, or base_key of a cached base result")
        base = cache.get(base_key, plan_config_hash(plan, resolve_backend(settings.backend, tuned_model)))
        if base is None:
            raise EvalConfigError(
                f"base: no cached base result for key {base_key[:12]} and this task config. Fix: pass base_model"
            )
    else:
        base, _ = base_scores(
            base_model, base_tokenizer or tokenizer, settings, plan=plan, key=base_key, **evaluate_kwargs
        )
    tuned = evaluate(tuned_model, tokenizer, settings, plan=plan, **evaluate_kwargs)
    return tuned, base, compute_tradeoff(base, tuned, settings.betas, metric)
