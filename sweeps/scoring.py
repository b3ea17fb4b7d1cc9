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

    def warm_base(self, base_model: Any, tokenizer: Any) -> None:
        """Generate and cache the base model's responses, NLLs and harness scores."""
        from evaluation.loss_metrics import loss_tradeoff
        from evaluation.scoring import base_scores

        settings = self.loss_settings.model_copy(update={"kl": False})
        loss_tradeoff(base_model, tokenizer, settings, base_model=base_model, base_key=self.base_key)
        if self.harness_settings is not None:
            base_scores(base_model, tokenizer, self.harness_settings, key=self.base_key)

    def loss_metrics(self, model: Any, tokenizer: Any, base_model: Any = None) -> dict[str, float]:
        from evaluation.loss_metrics import loss_tradeoff

        settings = self.loss_settings
        if base_model is None:
            settings = settings.model_copy(update={"kl": False})
        trade = loss_tradeoff(
            model, tokenizer, settings, base_model=base_model, base_key=self.base_key, betas=self.betas
        )
        out = _tradeoff_metrics("nll", trade.nll, self.betas)
        for name, value in trade.tuned.id_nll.items():
            out[f"nll/id/{name}"] = value
        for name, value in trade.tuned.ood_nll.items():
            out[f"nll/ood/{name}"] = value
        if trade.kl is not None:
            out.update(_tradeoff_metrics("kl", trade.kl, self.betas))
        return out

    def harness_metrics(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from evaluation.scoring import evaluate_tradeoff

        if self.harness_settings is None:
            return {}
        tuned, _, trade = evaluate_tradeoff(model, tokenizer, self.harness_settings, base_key=self.base_key)
        out = _tradeoff_metrics("acc", trade, self.betas)
        for name, score in tuned.benchmarks.items():
            out[f"acc/{score.suite}/{name}"] = score.avg_at_k
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
