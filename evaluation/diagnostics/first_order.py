"""Layerwise first-order signal of an update on a dataset (paper App. F.2).

``g_W`` is the gradient of the average per-sample loss (each sample's mean token NLL on its reference reply,
or language modelling of the prompt when it has none; see :mod:`rpsft.core.prompts`), taken at
the *base* weights. For a tuned checkpoint, ``<g_W, W_tuned - W_base>`` is the first-order change of that
loss; ``m_l`` averages it over the matrices of layer ``l``. Negative: the update descends that data's loss.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from rpsft.core.losses import IGNORE_INDEX
from rpsft.core.model_parts import (
    WeightSource,
    eval_mode,
    grad_enabled_for,
    layer_index,
    matrix_type,
    model_device,
    named_weights,
    resolve_names,
)
from rpsft.core.rank_rule import lm_sample_losses
from torch import Tensor, nn


def dataset_gradients(
    model: nn.Module,
    tokenizer,
    examples,
    selection: Any = "all",
    *,
    batch_size: int = 4,
    max_length: int = 256,
    limit: int | None = None,
) -> dict[str, Tensor]:
    """``{name: g_W}``: gradient of the mean over samples of each sample's mean token NLL, at ``model``'s weights.

    Samples without a scored token are left out. ``.grad`` fields are not touched.
    """
    from rpsft.core.data import collate_features
    from rpsft.core.prompts import as_prompt_examples, batches, gradient_features

    examples = as_prompt_examples(examples)[:limit]
    features = [
        f
        for f in gradient_features(examples, tokenizer, max_length)
        if any(label != IGNORE_INDEX for label in f["labels"][1:])
    ]
    if not features:
        raise ValueError("first-order: no example with a scored token")
    names = resolve_names(model, selection)
    named = dict(model.named_parameters(remove_duplicate=False))
    params = [named[name] for name in names]
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    totals = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    with eval_mode(model), grad_enabled_for(params):
        for chunk in batches(features, batch_size):
            batch = {key: value.to(device) for key, value in collate_features(chunk, pad).items()}
            loss = lm_sample_losses(model, batch).sum() / len(features)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total += grad.detach().to(total.dtype)
    return dict(zip(names, totals))


def first_order_signal(
    gradients: Mapping[str, Tensor], base: WeightSource, tuned: WeightSource
) -> dict[str, Any]:
    """``<g_W, W_tuned - W_base>`` per matrix, its mean per layer (``per_layer``), overall ``mean`` and ``sum``."""
    started = time.perf_counter()
    base_weights, tuned_weights = named_weights(base), named_weights(tuned)
    per_matrix: dict[str, float] = {}
    for name, grad in gradients.items():
        delta = tuned_weights[name].detach().to(grad.device, torch.float64) - base_weights[name].detach().to(
            grad.device, torch.float64
        )
        per_matrix[name] = float((grad.to(torch.float64) * delta).sum())
    per_layer: dict[int, list[float]] = {}
    per_type: dict[str, list[float]] = {}
    for name, value in per_matrix.items():
        layer = layer_index(name)
        per_layer.setdefault(-1 if layer is None else layer, []).append(value)
        per_type.setdefault(matrix_type(name), []).append(value)
    values = list(per_matrix.values())
    return {
        "mean": sum(values) / len(values) if values else 0.0,
        "sum": sum(values),
        "per_layer": {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())},
        "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
        "per_matrix": per_matrix,
        "seconds": time.perf_counter() - started,
    }
