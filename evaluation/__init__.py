"""Scoring of the in-domain math and out-of-domain benchmarks (lm-evaluation-harness tasks) and the trade-off.

    from rpsft.evaluation import EvalSettings, evaluate, base_scores, compute_tradeoff

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
    "Benchmark": "rpsft.evaluation.benchmarks",
    "HubSource": "rpsft.evaluation.benchmarks",
    "EvalConfigError": "rpsft.evaluation.benchmarks",
    "builtin_registry": "rpsft.evaluation.benchmarks",
    "EvalDataError": "rpsft.evaluation.items",
    "load_items": "rpsft.evaluation.items",
    "EvalSettings": "rpsft.evaluation.settings",
    "EvalPlan": "rpsft.evaluation.settings",
    "load_eval_settings": "rpsft.evaluation.settings",
    "plan_evaluation": "rpsft.evaluation.settings",
    "write_task_dir": "rpsft.evaluation.lm_eval_tasks",
    "plan_config_hash": "rpsft.evaluation.lm_eval_tasks",
    "evaluate": "rpsft.evaluation.runner",
    "EvalResult": "rpsft.evaluation.runner",
    "BenchmarkScore": "rpsft.evaluation.runner",
    "base_scores": "rpsft.evaluation.scoring",
    "compute_tradeoff": "rpsft.evaluation.scoring",
    "evaluate_tradeoff": "rpsft.evaluation.scoring",
    "model_fingerprint": "rpsft.evaluation.scoring",
    "TradeOff": "rpsft.evaluation.metrics",
    "tradeoff": "rpsft.evaluation.metrics",
    "pass_at_k": "rpsft.evaluation.metrics",
    "avg_at_k": "rpsft.evaluation.metrics",
    "LossSettings": "rpsft.evaluation.loss_metrics",
    "loss_tradeoff": "rpsft.evaluation.loss_metrics",
    "MCDoc": "rpsft.evaluation.multiple_choice",
    "MCScore": "rpsft.evaluation.multiple_choice",
    "MCSettings": "rpsft.evaluation.multiple_choice",
    "mc_docs": "rpsft.evaluation.multiple_choice",
    "mc_task_config": "rpsft.evaluation.multiple_choice",
    "write_mc_task_dir": "rpsft.evaluation.multiple_choice",
    "mc_item_scores": "rpsft.evaluation.multiple_choice",
    "mc_scores_by_benchmark": "rpsft.evaluation.multiple_choice",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
