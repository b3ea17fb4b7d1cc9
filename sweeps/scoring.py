"""How a sweep scores a model: the loss-based trade-off (always) and the lm-eval harness (when configured).

The driver calls :meth:`TrialScorer.warm_base` once with the base model, so the base model's responses, NLLs
and harness scores are on disk before any trial starts; trials then only score themselves.
"""

from __future__ import annotations

from typing import Any

from sweeps.config import SweepConfig


def _tradeoff_metrics(prefix: str, trade: Any, betas: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    if trade.g_id is not None:
        out[f"{prefix}/g_id"] = trade.g_id
    if trade.f_ood is not None:
        out[f"{prefix}/f_ood"] = trade.f_ood
    for beta in betas:
        out[f"{prefix}/phi@{beta:g}"] = trade.phi[str(float(beta))]
    return out


def benchmark_metrics(scores: Any) -> dict[str, float]:
    """Per-benchmark NLLs of one model (a ``LossScores``): ``nll/id/<benchmark>``, ``nll/ood/<benchmark>``."""
    out = {f"nll/id/{name}": value for name, value in (scores.id_nll or {}).items()}
    out.update({f"nll/ood/{name}": value for name, value in (scores.ood_nll or {}).items()})
    return out


def harness_benchmark_metrics(result: Any) -> dict[str, float]:
    """Per-benchmark lm-eval accuracies of one model (an ``EvalResult``): ``acc/<suite>/<benchmark>``."""
    return {f"acc/{score.suite}/{name}": score.avg_at_k for name, score in result.benchmarks.items()}


class TrialScorer:
    """Scores models for one sweep; ``base_key`` identifies the base model in the on-disk caches."""

    def __init__(self, config: SweepConfig, base_key: str, cache_dir: str) -> None:
        from evaluation.loss_metrics import LossSettings

        self.config = config
        self.base_key = base_key
        ev = config.evaluation
        loss_kwargs: dict[str, Any] = dict(
            data_dir=ev.data_dir,
            subset=ev.subset,
            n_id=ev.loss.n_id,
            n_ood=ev.loss.n_ood,
            max_new_tokens=ev.loss.max_new_tokens,
            max_length=ev.loss.max_length,
            batch_size=ev.loss.batch_size,
            kl=ev.loss.kl,
            cache_dir=cache_dir,
        )
        if ev.loss.id_benchmarks is not None:
            loss_kwargs["id_benchmarks"] = ev.loss.id_benchmarks
        if ev.loss.ood_benchmarks is not None:
            loss_kwargs["ood_benchmarks"] = ev.loss.ood_benchmarks
        self.loss_settings = LossSettings(**loss_kwargs)
        self.harness_settings = None
        if ev.harness is not None:
            from evaluation.settings import load_eval_settings

            harness = {"data_dir": ev.data_dir, "subset": ev.subset, **ev.harness}
            harness.update(betas=config.objective.betas, cache_dir=cache_dir)
            self.harness_settings = load_eval_settings(None, harness)

    @property
    def betas(self) -> list[float]:
        return self.config.objective.betas

    def check(self) -> None:
        """Load and validate every evaluation item (no model needed); raises with the field named."""
        from evaluation.loss_metrics import loss_items
        from evaluation.settings import plan_evaluation

        loss_items(self.loss_settings)
        if self.harness_settings is not None:
            plan_evaluation(self.harness_settings)

    def warm_base(self, base_model: Any, tokenizer: Any) -> dict[str, float]:
        """Generate and cache the base model's responses, NLLs and harness scores; return its per-benchmark
        numbers under the names trials use (``nll/id/<b>``, ``nll/ood/<b>``, ``acc/<suite>/<b>``)."""
        from evaluation.loss_metrics import loss_tradeoff
        from evaluation.scoring import base_scores

        settings = self.loss_settings.model_copy(update={"kl": False})
        trade = loss_tradeoff(base_model, tokenizer, settings, base_model=base_model, base_key=self.base_key)
        out = benchmark_metrics(trade.base)
        if self.harness_settings is not None:
            result, _ = base_scores(base_model, tokenizer, self.harness_settings, key=self.base_key)
            out.update(harness_benchmark_metrics(result))
        return out

    def loss_metrics(self, model: Any, tokenizer: Any, base_model: Any = None) -> dict[str, float]:
        from evaluation.loss_metrics import loss_tradeoff

        settings = self.loss_settings
        if base_model is None:
            settings = settings.model_copy(update={"kl": False})
        trade = loss_tradeoff(
            model, tokenizer, settings, base_model=base_model, base_key=self.base_key, betas=self.betas
        )
        out = _tradeoff_metrics("nll", trade.nll, self.betas)
        out.update(benchmark_metrics(trade.tuned))
        if trade.kl is not None:
            out.update(_tradeoff_metrics("kl", trade.kl, self.betas))
        return out

    def harness_metrics(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from evaluation.scoring import evaluate_tradeoff

        if self.harness_settings is None:
            return {}
        tuned, _, trade = evaluate_tradeoff(model, tokenizer, self.harness_settings, base_key=self.base_key)
        out = _tradeoff_metrics("acc", trade, self.betas)
        out.update(harness_benchmark_metrics(tuned))
        return out

    def primary(self, metrics: dict[str, float]) -> dict[str, float]:
        """``g_id``, ``f_ood``, ``phi@beta`` and ``objective`` (Phi at the first beta) of the objective metric."""
        prefix = {"nll": "nll", "kl": "kl", "accuracy": "acc"}[self.config.objective.metric]
        out: dict[str, float] = {}
        if f"{prefix}/g_id" in metrics:
            out["g_id"] = metrics[f"{prefix}/g_id"]
        if f"{prefix}/f_ood" in metrics:
            out["f_ood"] = metrics[f"{prefix}/f_ood"]
        for beta in self.betas:
            key = f"{prefix}/phi@{beta:g}"
            if key in metrics:
                out[f"phi@{beta:g}"] = metrics[key]
        beta0 = f"phi@{self.betas[0]:g}"
        if beta0 in out:
            out["phi"] = out["objective"] = out[beta0]
        return out
