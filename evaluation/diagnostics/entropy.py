"""Token entropy along greedy decoding (paper App. F.4).

Each prompt is decoded greedily for at most ``max_new_tokens`` tokens (stopping at an end-of-sequence token,
which counts); at every generated step the entropy of the next-token distribution ``softmax(logits)`` is
taken, and the prompt's value is the mean over its steps. The distribution over prompts is shown as a Gaussian
KDE with the paper's bandwidth ``h = 1.06 * s * N^(-1/5)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from rpsft.core.model_parts import eval_mode, model_device
from torch import nn


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(x) for x in config_eos)
    return sorted(ids)


@torch.no_grad()
def generation_entropy(
    model: nn.Module,
    tokenizer,
    examples,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, Any]:
    """Greedy decoding; ``per_prompt`` mean token entropy (nats), ``lengths`` (generated tokens), ``mean``."""
    from rpsft.core.prompts import batches, pad_ids, prompt_token_ids
    from transformers import GenerationConfig

    ids = prompt_token_ids(examples, tokenizer, max_length)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    device = model_device(model)
    per_prompt: list[float] = []
    lengths: list[int] = []
    with eval_mode(model):
        for chunk in batches(ids, batch_size):
            input_ids, mask = pad_ids(chunk, pad, side="left")
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
            )
            # One step at a time, in float64 (generate hands out float32 logits; a stacked [B, T, V] copy
            # of a real vocabulary would be large).
            entropy = torch.stack(
                [
                    -(torch.softmax(z.double(), -1) * torch.log_softmax(z.double(), -1)).sum(-1)
                    for z in out.logits
                ],
                dim=1,
            )  # [B, T]
            generated = out.sequences[:, input_ids.shape[1] :]
            steps = entropy.shape[1]
            for row in range(entropy.shape[0]):
                is_eos = torch.isin(generated[row, :steps], torch.tensor(eos, device=generated.device))
                hits = torch.nonzero(is_eos).flatten()
                length = int(hits[0]) + 1 if hits.numel() else steps
                lengths.append(length)
                per_prompt.append(float(entropy[row, :length].mean()))
    return {
        "per_prompt": per_prompt,
        "lengths": lengths,
        "mean": sum(per_prompt) / len(per_prompt) if per_prompt else 0.0,
        "max_new_tokens": max_new_tokens,
    }


def silverman_bandwidth(values: Sequence[float]) -> float:
    """``1.06 * s * N^(-1/5)`` (sample standard deviation ``s``); a small positive floor for degenerate data."""
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    h = 1.06 * std * x.size ** (-0.2) if x.size else 0.0
    return h if h > 0 else max(1e-3, 0.05 * (abs(float(x.mean())) if x.size else 1.0))


def kde(
    values: Sequence[float],
    grid: Sequence[float] | None = None,
    *,
    points: int = 200,
    bandwidth: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian KDE ``f(x) = 1/(N h) sum_j phi((x - e_j) / h)`` on ``grid`` (default: data range +- 3h)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("kde: no values")
    h = bandwidth if bandwidth is not None else silverman_bandwidth(x)
    if grid is None:
        grid = np.linspace(x.min() - 3 * h, x.max() + 3 * h, points)
    grid = np.asarray(grid, dtype=np.float64)
    z = (grid[:, None] - x[None, :]) / h
    density = np.exp(-0.5 * z**2).sum(1) / (x.size * h * math.sqrt(2 * math.pi))
    return grid, density
