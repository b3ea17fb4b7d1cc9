"""Token-level training losses: SFT (NLL), DFT and importance-weighted SFT (IW).

All losses sum per-token terms over response tokens and divide by ``num_items`` (the number of response tokens
in the whole optimizer step, as ``transformers.Trainer`` passes it), so gradient accumulation gives the same
update as one large batch.

* SFT: ``-log p(y_t)``.
* DFT (dynamic fine-tuning, Wu et al. 2025): ``-sg(p(y_t)) * log p(y_t)``; the same per-token formula as TRL's
  ``SFTConfig(loss_type="dft")``.
* IW (importance-weighted SFT, Qin & Springenberg 2025): per sequence
  ``w = min(exp(tau * mean_t(log p - log p_ref)), clamp)`` (detached, ``p_ref`` from the frozen base model)
  times the sequence's NLL.
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
LossType = Literal["sft", "dft", "iw"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the next-token labels and their mask, both ``[batch, seq - 1]``; computed in at
    least float32 (float64 logits stay float64)."""
    shift_logits = logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe_labels = shift_labels.masked_fill(~mask, 0)
    logp = torch.gather(F.log_softmax(shift_logits, dim=-1), -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def label_window(labels: Tensor) -> int:
    """How many trailing positions' logits the next-token loss of ``labels`` needs: from the position that
    predicts the earliest scored label of any row to the end. Prompt positions before it never enter a loss."""
    scored = labels[:, 1:] != IGNORE_INDEX
    rows = scored.any(dim=1)
    if not bool(rows.any()):
        return labels.shape[1]
    first = int(scored.int().argmax(dim=1)[rows].min())  # index into labels[:, 1:]: label first + 1
    return labels.shape[1] - first


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can skip positions (once per model class, not per micro-batch)."""
    base = getattr(model, "module", model)  # DDP / accelerate wrappers
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT
    return _forward_takes_logits_to_keep(type(base))


def causal_lm_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` over the label window only (:func:`label_window`): the output head and the
    softmax skip the prompt positions, which carry no loss; :func:`token_logprobs` of the pair equals that
    of the full sequence. Models whose forward has no ``logits_to_keep`` get the full sequence."""
    labels = batch["labels"]
    device = next(model.parameters()).device
    kwargs = {}
    keep = label_window(labels)
    if keep < labels.shape[1] and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    else:
        keep = labels.shape[1]
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **kwargs
    ).logits
    return logits, labels[:, labels.shape[1] - keep :].to(logits.device)


def _denominator(mask: Tensor, num_items: int | Tensor | None) -> Tensor:
    count = mask.sum() if num_items is None else torch.as_tensor(num_items, device=mask.device)
    return count.clamp(min=1)


def sft_loss(logp: Tensor, mask: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    return -(logp * mask).sum() / _denominator(mask, num_items)


def dft_loss(logp: Tensor, mask: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    return -(logp * logp.detach().exp() * mask).sum() / _denominator(mask, num_items)


def iw_weights(logp: Tensor, ref_logp: Tensor, mask: Tensor, tau: float = 1.0, clamp: float = 16.0) -> Tensor:
    """Per-sequence importance weights ``min(exp(tau * mean_t(logp - ref_logp)), clamp)``, detached."""
    tokens = mask.sum(-1).clamp(min=1)
    mean_log_ratio = ((logp.detach() - ref_logp.detach()) * mask).sum(-1) / tokens
    return torch.exp(tau * mean_log_ratio).clamp(max=clamp)


def iw_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    num_items: int | Tensor | None = None,
    *,
    tau: float = 1.0,
    clamp: float = 16.0,
) -> Tensor:
    weights = iw_weights(logp, ref_logp, mask, tau, clamp)
    return -(weights.unsqueeze(-1) * logp * mask).sum() / _denominator(mask, num_items)
