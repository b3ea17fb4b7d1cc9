"""Hidden-state drift from the base model (paper App. F.6).

Each prompt (rendered with the chat template and the generation prompt) is represented by its final hidden
state (after the last norm, what feeds ``lm_head``; or the output of block ``layer``) mean-pooled over its
tokens. Per dataset, a model's centroid is the mean over prompts, and its drift is the Euclidean distance to
the base model's centroid. The 2-D picture stacks all models' representations, centres them and projects on
the first two principal directions (numpy SVD).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from rpsft.core.model_parts import eval_mode, model_device
from torch import Tensor, nn


@torch.no_grad()
def pooled_hidden_states(
    model: nn.Module,
    tokenizer,
    examples,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    layer: int | None = None,
) -> Tensor:
    """``[N, hidden]`` float32 mean-pooled hidden states, one row per prompt (right padding, masked mean).

    ``layer=None``: the final hidden state (after the final norm); an int indexes ``hidden_states`` (0 = the
    embeddings, i = the output of block i).
    """
    from rpsft.core.prompts import batches, pad_ids, prompt_token_ids

    ids = prompt_token_ids(examples, tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    backbone = model.base_model if hasattr(model, "base_model") else model
    rows = []
    with eval_mode(model):
        for chunk in batches(ids, batch_size):
            input_ids, mask = pad_ids(chunk, pad, side="right")
            input_ids, mask = input_ids.to(device), mask.to(device)
            out = backbone(input_ids=input_ids, attention_mask=mask, output_hidden_states=layer is not None)
            states = out.last_hidden_state if layer is None else out.hidden_states[layer]
            weights = mask.unsqueeze(-1).to(states.dtype)
            rows.append(((states * weights).sum(1) / weights.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(rows)


def centroid_drift(states: Mapping[str, Tensor], base: str = "base") -> dict[str, float]:
    """``{model: ||centroid(model) - centroid(base)||_2}`` for one dataset (the base itself gives 0)."""
    base_centroid = states[base].double().mean(0)
    return {label: float((s.double().mean(0) - base_centroid).norm()) for label, s in states.items()}


def pca_2d(states: Mapping[str, Tensor], base: str = "base") -> dict[str, Any]:
    """2-D PCA of all models' pooled states of one dataset.

    Returns per model its points, its PCA-plane centroid and ``D_PCA`` (distance of that centroid to the
    base's), plus the explained-variance ratios of the two axes. Axis signs are fixed (largest loading
    positive) so pictures are reproducible.
    """
    labels = list(states)
    stacked = np.concatenate([states[label].double().numpy() for label in labels])
    centred = stacked - stacked.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:  # a single point: no second direction
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], centred.shape[1]))])
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    coords = centred @ axes.T
    variance = s**2
    explained = (variance[:2] / variance.sum()).tolist() if variance.sum() > 0 else [0.0, 0.0]
    out: dict[str, Any] = {"labels": labels, "explained": explained, "points": {}, "centroids": {}}
    start = 0
    for label in labels:
        n = states[label].shape[0]
        pts = coords[start : start + n]
        start += n
        out["points"][label] = pts.tolist()
        out["centroids"][label] = pts.mean(0).tolist()
    base_c = np.asarray(out["centroids"][base])
    out["distance"] = {
        label: float(np.linalg.norm(np.asarray(c) - base_c)) for label, c in out["centroids"].items()
    }
    return out
