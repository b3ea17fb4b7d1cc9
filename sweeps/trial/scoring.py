"""How a sweep scores a model: the loss-based trade-off (always) and the lm-eval harness (when configured).

The driver calls :meth:`TrialScorer.warm_base` once with the base model, so the base model's responses, NLLs
and harness scores are on disk before any trial starts; trials then only score themselves.
"""

from __future__ import annotations

from typing import Any

from rpsft.evaluation.metrics import phi
from rpsft.sweeps.config.sweep import SweepConfig


def _tradeoff_metrics(prefix: str, trade: Any, betas: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    if trade.g_id is not None:
        out[f"{prefix}/g_id"] = trade.g_id
    if trade.f_ood is not None:
        out[f"{prefix}/f_ood"] = trade.f_ood
    for beta in betas:
        out[f"{prefix}/phi@{beta:g}"] = trade.phi[str(float(beta))]
    return out


def _user_text(conversation: list[dict[str, str]]) -> str:
    return next((m["content"] for m in conversation if m["role"] == "user"), "")


def _loss_item_scores(scores: Any) -> dict[str, Any]:
    """A ``LossScores``' per-item scores as stored (``id_nll``, ``ood_nll``, ``ood_kl``; higher is better)."""
    nll = scores.item_scores()
    out = {"id_nll": nll["id"], "ood_nll": nll["ood"]}
    if scores.ood_kl_items is not None:
        out["ood_kl"] = scores.item_scores("kl")["ood"]
    return out


def _harness_item_scores(result: Any) -> dict[str, Any]:
    """An ``EvalResult``'s per-item scores as stored (``id_acc``, ``ood_acc``; higher is better)."""
    items = result.item_scores()
    return {"id_acc": items["id"], "ood_acc": items["ood"]}


def benchmark_metrics(scores: Any) -> dict[str, float]:
    """Per-benchmark NLLs of one model (a ``LossScores``): ``nll/id/<benchmark>``, ``nll/ood/<benchmark>``."""
    out = {f"nll/id/{name}": value for name, value in (scores.id_nll or {}).items()}
    out.update({f"nll/ood/{name}": value for name, value in (scores.ood_nll or {}).items()})
    return out


def harness_benchmark_metrics(result: Any) -> dict[str, float]:
    """Per-benchmark lm-eval scores of one model (an ``EvalResult``): ``acc/<suite>/<benchmark>``, the avg@k of a
    built-in benchmark or a task entry's primary metric, signed so that higher is better."""
    return {
        f"acc/{score.suite}/{name}": score.oriented(score.avg_at_k)
        for name, score in result.benchmarks.items()
    }


class TrialScorer:
    """Scores models for one sweep; ``base_key`` identifies the base model in the on-disk caches."""

    def __init__(self, config: SweepConfig, base_key: str, cache_dir: str) -> None:
        self.config = config
        self.base_key = base_key
        self.cache_dir = cache_dir
        ev = config.evaluation
        self.loss_settings = ev.loss_settings(cache_dir)
        self.mc_settings = ev.mc_settings()
        self.harness_settings = ev.harness_settings(config.objective.betas, cache_dir)

    @property
    def betas(self) -> list[float]:
        return self.config.objective.betas

    def check(self) -> list[str]:
        """Load and validate every evaluation item (no model needed); raises with the field named. Returns the
        user text of every scored item (for the training-data overlap check)."""
        from rpsft.evaluation.loss_metrics import loss_items
        from rpsft.evaluation.settings import plan_evaluation

        items = loss_items(self.loss_settings)
        prompts = [_user_text(conv) for convs in items.id_conversations.values() for conv in convs]
        prompts += [_user_text(conv) for convs in items.ood_prompts.values() for conv in convs]
        if self.mc_settings is not None:
            from rpsft.evaluation.multiple_choice import mc_benchmark_docs

            docs = mc_benchmark_docs(self.mc_settings)
            prompts += [doc.stem for rows in docs.values() for doc in rows]
        if self.harness_settings is not None:
            if self.harness_settings.backend == "vllm":
                from rpsft.sweeps.config.errors import SweepConfigError

                raise SweepConfigError(
                    "evaluation.harness.backend: vllm loads a model by path, and a sweep scores its trials in "
                    "memory. Fix: backend: auto or hf"
                )
            plan_evaluation(self.harness_settings)
        return prompts

    def base_work(self) -> int:
        """Items the base model generates for or is scored on in :meth:`warm_base` (a progress bar's total)."""
        from rpsft.evaluation.loss_metrics import loss_items

        items = loss_items(self.loss_settings)
        prompts = sum(len(p) for p in items.ood_prompts.values())
        return 2 * prompts + sum(len(c) for c in items.id_conversations.values())

    def warm_base(self, base_model: Any, tokenizer: Any) -> dict[str, float]:
        """Generate and cache the base model's responses, NLLs and harness scores; return its per-benchmark
        numbers under the names trials use (``nll/id/<b>``, ``nll/ood/<b>``, ``acc/<suite>/<b>``)."""
        from rpsft.evaluation.loss_metrics import base_loss_scores
        from rpsft.evaluation.scoring import base_scores

        base, _ = base_loss_scores(base_model, tokenizer, self.loss_settings, base_key=self.base_key)
        out = benchmark_metrics(base)
        if self.mc_settings is not None:
            base_mc = self._mc_items(self._base_mc(base_model, tokenizer))
            out.update({f"mc/ood/{b}": sum(v for v, _ in rows) / len(rows) for b, rows in base_mc.items()})
        if self.harness_settings is not None:
            result, _ = base_scores(base_model, tokenizer, self.harness_settings, key=self.base_key)
            out.update(harness_benchmark_metrics(result))
        return out

    def loss_metrics(self, model: Any, tokenizer: Any, base_model: Any = None) -> dict[str, float]:
        return self._loss(model, tokenizer, base_model)[0]

    def _loss(self, model: Any, tokenizer: Any, base_model: Any = None) -> tuple[dict[str, float], Any]:
        from rpsft.evaluation.loss_metrics import loss_tradeoff

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
        return out, trade

    def final_scores(
        self, model: Any, tokenizer: Any, base_model: Any = None
    ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
        """``(metrics, item scores, base item scores)`` of a trained model: the loss metrics, the
        multiple-choice scores when configured, the harness when configured, and the intervals of the
        objective (``g_id_lo``, ``g_id_hi``, ``phi@<beta>_lo``, ...)."""
        metrics, trade = self._loss(model, tokenizer, base_model)
        items = _loss_item_scores(trade.tuned)
        base_items = _loss_item_scores(trade.base)
        if self.mc_settings is not None:
            mc_metrics, mc_items, mc_base_items = self.mc_metrics(model, tokenizer, metrics)
            metrics.update(mc_metrics)
            items["ood_mc"], base_items["ood_mc"] = mc_items, mc_base_items
        if self.harness_settings is not None:
            harness_metrics, harness_items, harness_base_items = self.harness_scores(model, tokenizer)
            metrics.update(harness_metrics)
            items.update(harness_items)
            base_items.update(harness_base_items)
        metrics.update(self.interval_metrics(items, base_items))
        return metrics, items, base_items

    def checkpoint_scores(self, model: Any, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """``(metrics, item scores)`` of a checkpoint during training (an intermediate evaluation): the loss
        metrics without the base model (no KL) and the multiple-choice scores when configured; no harness, no
        intervals. The item scores are stored as :meth:`final_scores` stores them (``ood_kl`` left out). The
        multiple-choice scores are computed only where they are used: for trajectory points
        (``evaluation.trajectory``) or as the objective (``objective.metric: mc``)."""
        metrics, trade = self._loss(model, tokenizer)
        items = _loss_item_scores(trade.tuned)
        used = self.config.evaluation.trajectory or self.config.objective.metric == "mc"
        if self.mc_settings is not None and used:
            mc_metrics, mc_items, _ = self.mc_metrics(model, tokenizer, metrics)
            metrics.update(mc_metrics)
            items["ood_mc"] = mc_items
        return metrics, items

    def interval_metrics(self, items: dict[str, Any], base_items: dict[str, Any]) -> dict[str, float]:
        """This trial's paired bootstrap intervals of the objective's G_id, F_ood and Phi at each beta."""
        from rpsft.evaluation.intervals import bootstrap_tradeoff, interval_metrics
        from rpsft.sweeps.analysis.uncertainty import METRIC_ITEMS, objective_items

        metric = self.config.objective.metric
        if metric not in METRIC_ITEMS:
            return {}
        ev = self.config.evaluation.intervals
        draws = bootstrap_tradeoff(
            objective_items(base_items, metric),
            {"trial": [objective_items(items, metric)]},
            draws=ev.draws,
            level=ev.level,
            seed=ev.seed,
        )
        return interval_metrics(draws.summary("trial", self.betas))

    def base_item_scores(self, base_model: Any, tokenizer: Any) -> dict[str, Any]:
        """The base model's per-item scores (from the caches that :meth:`warm_base` filled)."""
        from rpsft.evaluation.loss_metrics import base_loss_scores

        base, _ = base_loss_scores(base_model, tokenizer, self.loss_settings, base_key=self.base_key)
        if self.loss_settings.kl:  # KL(base || base) = 0 on every token, as loss_tradeoff scores the base
            base = base.model_copy(
                update={"ood_kl_items": {b: [(0.0, n) for _, n in p] for b, p in base.ood_nll_items.items()}}
            )
        items = _loss_item_scores(base)
        if self.mc_settings is not None:
            items["ood_mc"] = self._mc_items(self._base_mc(base_model, tokenizer))
        if self.harness_settings is not None:
            from rpsft.evaluation.scoring import base_scores

            result, _ = base_scores(base_model, tokenizer, self.harness_settings, key=self.base_key)
            items.update(_harness_item_scores(result))
        return items

    # ------------------------------------------------------------------ multiple choice

    def _mc_items(self, scores: dict[str, list[Any]]) -> dict[str, list[tuple[float, int]]]:
        field = self.mc_settings.score
        return {bench: [(float(getattr(s, field)), 1) for s in rows] for bench, rows in scores.items()}

    def _mc_scores(self, model: Any, tokenizer: Any) -> dict[str, list[Any]]:
        from rpsft.evaluation.multiple_choice import mc_scores_by_benchmark

        return mc_scores_by_benchmark(model, tokenizer, self.mc_settings)

    def _base_mc(self, base_model: Any, tokenizer: Any) -> dict[str, list[Any]]:
        """The base model's multiple-choice scores, computed once and cached on disk."""
        import hashlib
        from dataclasses import asdict
        from pathlib import Path

        from rpsft.core.json_cache import read_cached_json, write_cached_json
        from rpsft.evaluation.multiple_choice import MCScore

        spec = hashlib.sha256(self.mc_settings.model_dump_json().encode()).hexdigest()
        path = Path(self.cache_dir) / "mc" / f"base-{self.base_key[:24]}-{spec[:16]}.json"
        raw = read_cached_json(path)
        if raw is not None:
            return {bench: [MCScore(**row) for row in rows] for bench, rows in raw.items()}
        if base_model is None:
            from rpsft.evaluation.benchmarks import EvalConfigError

            raise EvalConfigError("mc: the base model's scores are not cached yet. Fix: pass the base model")
        scores = self._mc_scores(base_model, tokenizer)
        write_cached_json(path, {b: [asdict(s) for s in rows] for b, rows in scores.items()})
        return scores

    def mc_metrics(
        self, model: Any, tokenizer: Any, loss_metrics: dict[str, float]
    ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
        """``mc/ood/<b>`` (the tuned model's mean score per benchmark), ``mc/f_ood`` (base minus tuned,
        macro-averaged), ``mc/g_id`` (the loss-based ID gain) and ``mc/phi@<beta>``; plus the item scores."""
        tuned = self._mc_items(self._mc_scores(model, tokenizer))
        base = self._mc_items(self._base_mc(None, tokenizer))

        def mean(rows: list[tuple[float, int]]) -> float:
            return sum(v for v, _ in rows) / len(rows)

        out = {f"mc/ood/{bench}": mean(rows) for bench, rows in tuned.items()}
        drops = [mean(base[bench]) - mean(rows) for bench, rows in tuned.items()]
        f_ood = sum(drops) / len(drops)
        out["mc/f_ood"] = f_ood
        if "nll/g_id" in loss_metrics:
            out["mc/g_id"] = loss_metrics["nll/g_id"]
            for beta in self.betas:
                out[f"mc/phi@{beta:g}"] = phi(loss_metrics["nll/g_id"], f_ood, beta)
        return out, tuned, base

    def harness_scores(
        self, model: Any, tokenizer: Any
    ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
        """``(metrics, item scores, base item scores)`` of the lm-eval harness: ``acc/g_id``, ``acc/f_ood``,
        ``acc/phi@<beta>`` and ``acc/<suite>/<benchmark>``; the per-item scores as ``id_acc`` / ``ood_acc``."""
        from rpsft.evaluation.scoring import evaluate_tradeoff

        tuned, base, trade = evaluate_tradeoff(
            model, tokenizer, self.harness_settings, base_key=self.base_key
        )
        out = _tradeoff_metrics("acc", trade, self.betas)
        out.update(harness_benchmark_metrics(tuned))
        return out, _harness_item_scores(tuned), _harness_item_scores(base)

    def primary(self, metrics: dict[str, float]) -> dict[str, float]:
        """``g_id``, ``f_ood``, ``phi@beta`` and ``objective`` (Phi at the first beta) of the objective metric."""
        prefix = {"nll": "nll", "kl": "kl", "mc": "mc", "accuracy": "acc"}[self.config.objective.metric]
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
