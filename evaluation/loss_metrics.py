"""Loss-based trade-off metrics: forward passes only, and they move on small models.

* **ID gain** ``G_id^loss = NLL_base(ID) - NLL_tuned(ID)``: the drop in the mean per-token negative
  log-likelihood of the *reference solutions* of held-out ID items (MATH-500, Minerva and OlympiadBench carry
  solutions), each rendered as ``system + user`` prompt and the solution as the assistant turn with the
  model's chat template, exactly as SFT scores a response (assistant tokens and the turn-closing token; see
  :func:`rpsft.core.data.tokenize_example`).
* **OOD forgetting** ``F_ood^loss = NLL_tuned(OOD) - NLL_base(OOD)``: the rise in NLL of the *base model's own
  greedy responses* to the OOD prompts. The responses are generated once per base model (``max_new_tokens``)
  and cached under ``<cache_dir>/loss/`` keyed by the base model fingerprint, the prompts and the generation
  settings. Alternatively ``F_ood^KL``: the mean per-token ``KL(base || tuned)`` of the next-token
  distributions over those same response positions (0 for the base itself; needs the base model in memory).

Both are token-weighted means per benchmark, macro-averaged over benchmarks, and combined as
``Phi = G_id - beta * F_ood`` by :func:`rpsft.evaluation.metrics.tradeoff` (scores = -NLL, or -KL).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rpsft.evaluation.benchmarks import EvalConfigError, build_registry
from rpsft.evaluation.items import load_items
from rpsft.evaluation.metrics import TradeOff, tradeoff
from rpsft.evaluation.progress import advance

Messages = list[dict[str, str]]

DEFAULT_ID_LOSS_BENCHMARKS = ("math500", "minerva", "olympiadbench")
DEFAULT_OOD_LOSS_BENCHMARKS = ("gpqa", "ifeval", "mmlu_pro", "safety", "truthfulqa_mc")


class LossSettings(BaseModel):
    """Which items the loss metrics use and how. ``n_*`` items per benchmark are taken from the start."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data_dir: str | None = None
    subset: str = "full"
    id_benchmarks: list[str] = Field(default_factory=lambda: list(DEFAULT_ID_LOSS_BENCHMARKS))
    ood_benchmarks: list[str] = Field(default_factory=lambda: list(DEFAULT_OOD_LOSS_BENCHMARKS))
    n_id: int = Field(32, ge=1)
    n_ood: int = Field(16, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="length of the base model's greedy OOD responses")
    max_length: int = Field(1024, ge=16, description="token cap of prompt + response for the NLL")
    batch_size: int = Field(8, ge=1)
    kl: bool = True
    cache_dir: str | None = None

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        from rpsft.core.models import default_cache_dir

        return default_cache_dir() / "eval"


class LossItems(BaseModel):
    id_conversations: dict[str, list[Messages]]  # benchmark -> prompt + reference solution
    ood_prompts: dict[str, list[Messages]]  # benchmark -> prompt

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def loss_items(settings: LossSettings) -> LossItems:
    """Validated items for the loss metrics (fails before any model is loaded)."""
    registry = build_registry()
    id_conv: dict[str, list[Messages]] = {}
    for name in settings.id_benchmarks:
        bench = registry.get(name)
        if bench is None or bench.suite != "id" or not bench.has_solutions:
            with_solutions = [b.name for b in registry.values() if b.suite == "id" and b.has_solutions]
            raise EvalConfigError(
                f"loss id_benchmarks: {name!r} is not an ID benchmark with reference solutions. Fix: one of "
                f"{', '.join(with_solutions)}"
            )
        items = [it for it in load_items(bench, settings.data_dir, settings.subset) if it.solution.strip()]
        if not items:
            raise EvalConfigError(
                f"loss id_benchmarks: {name} has no rows with a 'solution'. Fix: add solutions"
            )
        id_conv[name] = [
            [*it.messages(), {"role": "assistant", "content": it.solution}] for it in items[: settings.n_id]
        ]
    ood: dict[str, list[Messages]] = {}
    for name in settings.ood_benchmarks:
        bench = registry.get(name)
        if bench is None or bench.suite != "ood":
            raise EvalConfigError(
                f"loss ood_benchmarks: {name!r} is not an OOD benchmark. Fix: one of "
                f"{', '.join(b.name for b in registry.values() if b.suite == 'ood')}"
            )
        ood[name] = [
            it.messages() for it in load_items(bench, settings.data_dir, settings.subset)[: settings.n_ood]
        ]
    if not id_conv and not ood:
        raise EvalConfigError("loss: no ID and no OOD benchmark selected. Fix: name at least one")
    return LossItems(id_conversations=id_conv, ood_prompts=ood)


# ------------------------------------------------------------------------------------- forward passes


def _device(model: Any):
    return next(model.parameters()).device


def _batches(seq: Sequence[Any], size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _scoring_batches(
    models: Sequence[Any], tokenizer: Any, conversations: Sequence[Messages], batch_size: int, max_length: int
):
    """``(indices, batch)``: collated (CPU) batches of the tokenized conversations, longest first so that a
    batch pads little, with ``models`` in eval mode and no grad; ``indices`` are the conversations' positions.

    Each model's train/eval mode is restored afterwards.
    """
    import torch
    from rpsft.core.data import SFTCollator, tokenize_example

    encoded = [tokenize_example(list(c), tokenizer, max_length) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    collate = SFTCollator(tokenizer.pad_token_id)
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            for chunk in _batches(order, batch_size):
                yield chunk, collate([encoded[i] for i in chunk])
                advance(len(chunk))
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def _in_order(pieces: list[tuple[list[int], list[tuple[float, int]]]], n: int) -> list[tuple[float, int]]:
    out: list[tuple[float, int] | None] = [None] * n
    for indices, values in pieces:
        for i, value in zip(indices, values):
            out[i] = value
    return out  # type: ignore[return-value]


def token_nll(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Messages],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[tuple[float, int]]:
    """``(sum of NLL, number of scored tokens)`` of the assistant turns of each conversation."""
    from rpsft.core.losses import causal_lm_logits, token_logprobs

    pieces = []
    for indices, batch in _scoring_batches([model], tokenizer, conversations, batch_size, max_length):
        logits, labels = causal_lm_logits(model, batch)
        logp, mask = token_logprobs(logits.cpu(), labels.cpu())  # logp is zero where masked
        sums = zip((-logp.sum(dim=1)).tolist(), mask.sum(dim=1).tolist())
        pieces.append((indices, [(float(s), int(n)) for s, n in sums]))
    return _in_order(pieces, len(conversations))


def token_kl(
    base_model: Any,
    tuned_model: Any,
    tokenizer: Any,
    conversations: Sequence[Messages],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[tuple[float, int]]:
    """``(sum over response tokens of KL(base || tuned), number of tokens)`` per conversation."""
    import torch
    from rpsft.core.losses import IGNORE_INDEX, causal_lm_logits

    pieces = []
    models = [base_model, tuned_model]
    for indices, batch in _scoring_batches(models, tokenizer, conversations, batch_size, max_length):
        (base_logits, labels), (tuned_logits, _) = (causal_lm_logits(model, batch) for model in models)
        mask = labels[:, 1:].cpu() != IGNORE_INDEX
        base_logp, tuned_logp = (
            torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu() for logits in (base_logits, tuned_logits)
        )
        kl = (base_logp.exp() * (base_logp - tuned_logp)).sum(-1)
        kl_sum = (kl * mask).sum(dim=1)
        pieces.append(
            (indices, [(float(s), int(n)) for s, n in zip(kl_sum.tolist(), mask.sum(dim=1).tolist())])
        )
    return _in_order(pieces, len(conversations))


def greedy_responses(
    model: Any, tokenizer: Any, prompts: Sequence[Messages], *, max_new_tokens: int = 128, batch_size: int = 8
) -> list[str]:
    """Greedy responses (left-padded batches, chat template with generation prompt)."""
    import torch

    device = _device(model)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in _batches(texts, batch_size):
                enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=False).to(
                    device
                )
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                for row in gen[:, enc["input_ids"].shape[1] :]:
                    out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _json_cache(path: Path, compute):
    from rpsft.core.json_cache import cached_json

    return cached_json(path, compute)


def base_greedy_responses(
    base_model: Any,
    tokenizer: Any,
    items: LossItems,
    settings: LossSettings,
    *,
    base_key: str | None = None,
) -> dict[str, list[str]]:
    """The base model's greedy responses to the OOD prompts, generated once and cached on disk."""
    from rpsft.evaluation.scoring import model_fingerprint

    key = base_key or model_fingerprint(base_model)
    spec = hashlib.sha256(
        json.dumps(
            [items.ood_prompts, settings.max_new_tokens, getattr(tokenizer, "chat_template", "")],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    path = settings.resolved_cache_dir() / "loss" / f"responses-{key[:24]}-{spec[:24]}.json"

    def compute() -> dict[str, list[str]]:
        if base_model is None:
            raise EvalConfigError("loss: the base responses are not cached yet. Fix: pass the base model")
        return {
            name: greedy_responses(
                base_model,
                tokenizer,
                prompts,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
            )
            for name, prompts in items.ood_prompts.items()
        }

    return _json_cache(path, compute)


def _mean(pairs: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in pairs)
    return sum(s for s, _ in pairs) / tokens if tokens else float("nan")


def _finite(scores: dict[str, float] | None) -> dict[str, float] | None:
    return None if scores is None else {k: v for k, v in scores.items() if math.isfinite(v)}


ItemPairs = list[tuple[float, int]]  # per item: (sum over its scored tokens, number of tokens)


class LossScores(BaseModel):
    """Mean per-token NLL (and KL) per benchmark of one model, and the per-item sums behind them."""

    id_nll: dict[str, float]
    ood_nll: dict[str, float]
    ood_kl: dict[str, float] | None = None
    id_nll_items: dict[str, ItemPairs] = Field(default_factory=dict)
    ood_nll_items: dict[str, ItemPairs] = Field(default_factory=dict)
    ood_kl_items: dict[str, ItemPairs] | None = None

    def item_scores(self, ood: str = "nll") -> dict[str, dict[str, list[tuple[float, int]]]]:
        """Per-item ``(value, weight)`` for :mod:`rpsft.evaluation.intervals`: value = minus the summed NLL (or KL),
        weight = tokens, so a benchmark's weighted mean is its score (higher is better)."""
        ood_items = self.ood_kl_items if ood == "kl" else self.ood_nll_items

        def neg(items: dict[str, ItemPairs] | None) -> dict[str, list[tuple[float, int]]]:
            return {name: [(-s, n) for s, n in pairs] for name, pairs in (items or {}).items() if pairs}

        return {"id": neg(self.id_nll_items), "ood": neg(ood_items)}


def _ood_conversations(items: LossItems, responses: dict[str, list[str]]) -> dict[str, list[Messages]]:
    return {
        name: [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses[name])]
        for name, prompts in items.ood_prompts.items()
    }


def loss_scores(
    model: Any,
    tokenizer: Any,
    items: LossItems,
    responses: dict[str, list[str]],
    settings: LossSettings,
    *,
    base_model: Any = None,
) -> LossScores:
    """NLL of ID reference solutions and of the base responses to OOD prompts (and KL if a base is given)."""
    kw = dict(batch_size=settings.batch_size, max_length=settings.max_length)
    id_items = {
        name: token_nll(model, tokenizer, conv, **kw) for name, conv in items.id_conversations.items()
    }
    ood_conv = _ood_conversations(items, responses)
    ood_items = {name: token_nll(model, tokenizer, conv, **kw) for name, conv in ood_conv.items() if conv}
    kl_items = None
    if base_model is not None and settings.kl:
        kl_items = {
            name: token_kl(base_model, model, tokenizer, conv, **kw)
            for name, conv in ood_conv.items()
            if conv
        }

    def means(per_item: dict[str, ItemPairs] | None) -> dict[str, float] | None:
        return None if per_item is None else {name: _mean(pairs) for name, pairs in per_item.items()}

    # a benchmark whose items all lost their response to truncation (max_length) has no score
    return LossScores(
        id_nll=_finite(means(id_items)),
        ood_nll=_finite(means(ood_items)),
        ood_kl=_finite(means(kl_items)),
        id_nll_items=id_items,
        ood_nll_items=ood_items,
        ood_kl_items=kl_items,
    )


class LossTradeOff(BaseModel):
    base: LossScores
    tuned: LossScores
    nll: TradeOff  # G_id = NLL drop on ID solutions, F_ood = NLL rise on base OOD responses
    kl: TradeOff | None = None  # F_ood = mean KL(base || tuned) on the base OOD responses


def base_loss_scores(
    base_model: Any,
    tokenizer: Any,
    settings: LossSettings,
    *,
    base_key: str | None = None,
    items: LossItems | None = None,
) -> tuple[LossScores, dict[str, list[str]]]:
    """The base model's NLLs (per benchmark and per item) and its OOD responses, computed once and cached on
    disk; ``base_model`` may be ``None`` when both are cached under ``base_key``."""
    from rpsft.evaluation.scoring import model_fingerprint

    items = items or loss_items(settings)
    key = base_key or model_fingerprint(base_model)
    responses = base_greedy_responses(base_model, tokenizer, items, settings, base_key=key)
    base_path = (
        settings.resolved_cache_dir()
        / "loss"
        / f"base-nll-v2-{key[:24]}-{items.digest()[:16]}-{settings.max_length}.json"
    )

    def compute_base() -> dict[str, Any]:
        if base_model is None:
            raise EvalConfigError("loss: the base NLLs are not cached yet. Fix: pass the base model")
        scores = loss_scores(
            base_model, tokenizer, items, responses, settings.model_copy(update={"kl": False})
        )
        return json.loads(scores.model_dump_json())

    return LossScores.model_validate(_json_cache(base_path, compute_base)), responses


def loss_tradeoff(
    tuned_model: Any,
    tokenizer: Any,
    settings: LossSettings,
    *,
    base_model: Any = None,
    base_key: str | None = None,
    betas: Sequence[float] = (1.0,),
) -> LossTradeOff:
    """Loss-based G_id / F_ood / Phi of a tuned model against its base (base results cached on disk).

    ``base_model`` may be ``None`` when ``base_key`` names a base whose responses and NLLs are cached and
    ``settings.kl`` is off (the KL needs both models).
    """
    from rpsft.evaluation.scoring import model_fingerprint

    items = loss_items(settings)
    if base_model is None and base_key is None:
        raise EvalConfigError(
            "loss: pass base_model (or base_key of a cached base). Fix: give the base model"
        )
    if base_model is None and settings.kl:
        raise EvalConfigError(
            "loss: KL(base || tuned) needs the base model in memory. Fix: pass base_model or kl=False"
        )
    key = base_key or model_fingerprint(base_model)
    base, responses = base_loss_scores(base_model, tokenizer, settings, base_key=key, items=items)
    if settings.kl:
        base.ood_kl = {name: 0.0 for name in base.ood_nll}
        base.ood_kl_items = {name: [(0.0, n) for _, n in pairs] for name, pairs in base.ood_nll_items.items()}
    tuned = loss_scores(tuned_model, tokenizer, items, responses, settings, base_model=base_model)

    def neg(d: dict[str, float] | None) -> dict[str, float]:
        return {k: -v for k, v in (d or {}).items()}

    nll = tradeoff(
        {"id": neg(base.id_nll), "ood": neg(base.ood_nll)},
        {"id": neg(tuned.id_nll), "ood": neg(tuned.ood_nll)},
        betas,
        metric="neg_nll",
    )
    kl = None
    if settings.kl and tuned.ood_kl is not None:
        kl = tradeoff(
            {"id": neg(base.id_nll), "ood": neg(base.ood_kl)},
            {"id": neg(tuned.id_nll), "ood": neg(tuned.ood_kl)},
            betas,
            metric="neg_kl",
        )
    return LossTradeOff(base=base, tuned=tuned, nll=nll, kl=kl)
