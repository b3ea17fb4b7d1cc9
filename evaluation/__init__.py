"""Scoring of the in-domain math and out-of-domain benchmarks (lm-evaluation-harness tasks) and the trade-off.

    from evaluation import EvalSettings, evaluate, base_scores, compute_tradeoff

    settings = EvalSettings(suite=["id", "ood"], data_dir="../shared/paper-data", k=1, limit=8)
    tuned = evaluate(model, tokenizer, settings)              # in-memory model -> EvalResult
    base, _ = base_scores(base_model, tokenizer, settings)    # cached per (model, task config)
    trade = compute_tradeoff(base, tuned, betas=[0.5, 1.0])   # G_id, F_ood, Phi per beta

Names are imported lazily so that ``rpsft --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Benchmark": "evaluation.benchmarks",
    "HubSource": "evaluation.benchmarks",
    "EvalConfigError": "evaluation.benchmarks",
    "BUILTIN_BENCHMARKS": "evaluation.benchmarks",
    "EvalDataError": "evaluation.items",
    "load_items": "evaluation.items",
    "EvalSettings": "evaluation.settings",
    "EvalPlan": "evaluation.settings",
    "load_eval_settings": "evaluation.settings",
    "plan_evaluation": "evaluation.settings",
    "write_task_dir": "evaluation.lm_eval_tasks",
    "plan_config_hash": "evaluation.lm_eval_tasks",
    "evaluate": "evaluation.runner",
    "EvalResult": "evaluation.runner",
    "BenchmarkScore": "evaluation.runner",
    "base_scores": "evaluation.scoring",
    "compute_tradeoff": "evaluation.scoring",
    "evaluate_tradeoff": "evaluation.scoring",
    "model_fingerprint": "evaluation.scoring",
    "TradeOff": "evaluation.metrics",
    "tradeoff": "evaluation.metrics",
    "pass_at_k": "evaluation.metrics",
    "avg_at_k": "evaluation.metrics",
    "LossSettings": "evaluation.loss_metrics",
    "loss_tradeoff": "evaluation.loss_metrics",
    "MCDoc": "evaluation.multiple_choice",
    "MCScore": "evaluation.multiple_choice",
    "MCSettings": "evaluation.multiple_choice",
    "mc_docs": "evaluation.multiple_choice",
    "mc_task_config": "evaluation.multiple_choice",
    "write_mc_task_dir": "evaluation.multiple_choice",
    "mc_item_scores": "evaluation.multiple_choice",
    "mc_scores_by_benchmark": "evaluation.multiple_choice",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
