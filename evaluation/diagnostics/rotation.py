"""U-space rotation between base and tuned weights (paper App. F.3).

For a matrix with base weight ``W_b`` and tuned weight ``W_t`` (m x n), take the top-K left singular vectors
``U_b``, ``U_t`` (K = min(512, m, n), configurable) and the principal angles between their column spaces,
``theta_i = arccos(sigma_i(U_b^T U_t))``; the rotation is their mean in degrees.

Numerics: ``arccos`` loses all precision for small angles (cos ~ 1). The angles are computed as
``atan2(sin_i, cos_i)``: cosines are the singular values of ``U_b^T U_t`` (descending), sines the singular values
of ``U_t - U_b (U_b^T U_t)`` (ascending order pairs them with the cosines), which is accurate at every angle.

A matrix with ``K == m`` (e.g. SmolLM2's 192-row k/v projections at K = 192) has ``U`` spanning all of R^m,
so its left-subspace rotation is identically 0; such matrices are reported as ``trivial`` and left out of the
means (for the paper's models, m >= 1024 > 512, none is). Identical base and tuned weights give exactly 0.

The subspaces come from :func:`rpsft.core.bases.top_k_bases`: ``method="gram"`` (default; eigendecomposition of
the narrow-side Gram matrix, several times faster than a full SVD on a CPU) or ``"exact"`` (full SVD),
computed in float64 by default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rpsft.core.model_parts import (
    WeightSource,
    layer_index,
    matrix_type,
    named_weights,
    resolve_names,
)
from torch import Tensor

DEFAULT_TOP_K = 512


def rotation_rank(shape: Sequence[int], top_k: int = DEFAULT_TOP_K) -> int:
    """K = min(top_k, m, n)."""
    return int(min(top_k, shape[0], shape[1]))


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spaces of orthonormal ``a``, ``b`` (m x r)."""
    if a.shape != b.shape:
        raise ValueError(f"principal_angles: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if a.shape[1] == 0:
        return a.new_zeros(0)
    cross = a.transpose(0, 1) @ b
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(b - a @ cross).clamp(0.0, 1.0).flip(0)  # ascending
    return torch.atan2(sin, cos)


def mean_angle_deg(a: Tensor, b: Tensor) -> float:
    """Mean principal angle between two orthonormal bases, in degrees."""
    angles = principal_angles(a, b)
    return math.degrees(float(angles.mean())) if angles.numel() else 0.0


def left_subspace(
    weight: Tensor, top_k: int = DEFAULT_TOP_K, *, method: str = "gram", dtype: torch.dtype = torch.float64
) -> Tensor:
    """Top-K left singular vectors (m x K, ordered by singular value) of ``weight``."""
    from rpsft.core.bases import top_k_bases

    k = rotation_rank(weight.shape, top_k)
    u, _ = top_k_bases(weight.detach().to(dtype), k, method=method)
    return u


@dataclass
class MatrixRotation:
    name: str
    shape: tuple[int, int]
    k: int
    mean_deg: float
    trivial: bool = False  # K == m: U spans R^m, so the rotation is 0 by construction
    unchanged: bool = False  # identical weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "k": self.k,
            "mean_deg": self.mean_deg,
            "trivial": self.trivial,
            "unchanged": self.unchanged,
        }


def matrix_rotation(
    w_base: Tensor | None,
    w_tuned: Tensor,
    *,
    top_k: int = DEFAULT_TOP_K,
    method: str = "gram",
    dtype: torch.dtype = torch.float64,
    base_u: Tensor | None = None,
    name: str = "",
) -> MatrixRotation:
    """Mean principal angle (degrees) between the top-K left subspaces of ``w_base`` and ``w_tuned``.

    ``base_u`` (a cached :func:`left_subspace` of the base, m x K) replaces ``w_base``'s decomposition.
    """
    shape = tuple(int(s) for s in w_tuned.shape)
    k = rotation_rank(shape, top_k)
    if k == shape[0]:
        return MatrixRotation(name, shape, k, 0.0, trivial=True)
    if w_base is not None:
        if tuple(w_base.shape) != shape:
            raise ValueError(f"rotation: {name or 'matrix'} has shape {tuple(w_base.shape)} vs {shape}")
        if torch.equal(w_base.detach().to(w_tuned.device, w_tuned.dtype), w_tuned.detach()):
            return MatrixRotation(name, shape, k, 0.0, unchanged=True)
    if base_u is None:
        if w_base is None:
            raise ValueError("rotation: need the base weight or its cached subspace")
        base_u = left_subspace(w_base, top_k, method=method, dtype=dtype)
    tuned_u = left_subspace(w_tuned, top_k, method=method, dtype=dtype)
    return MatrixRotation(name, shape, k, mean_angle_deg(base_u[:, :k].to(tuned_u.device), tuned_u))


def left_subspaces(
    base: WeightSource,
    selection: Any = "all",
    *,
    top_k: int = DEFAULT_TOP_K,
    method: str = "gram",
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """Cache of the base model's top-K left subspaces ``{name: m x K}`` for repeated :func:`rotation_summary`.

    Trivial matrices (K == m) are skipped.
    """
    weights = named_weights(base)
    out = {}
    for name in resolve_names(base, selection):
        w = weights[name]
        if rotation_rank(w.shape, top_k) < w.shape[0]:
            out[name] = left_subspace(w, top_k, method=method, dtype=dtype)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rotation_summary(
    base_model: WeightSource | None,
    tuned_model: WeightSource,
    selection: Any = "all",
    *,
    top_k: int = DEFAULT_TOP_K,
    method: str = "gram",
    dtype: torch.dtype = torch.float64,
    base_subspaces: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Rotation of every selected matrix, layerwise and overall (cheap enough to run once per trial).

    ``base_model``/``tuned_model``: models or ``{name: tensor}`` mappings with the same parameter names;
    ``selection``: a preset/spec (resolved on the base model, or on the tuned one when ``base_model`` is
    None), a selection dict, or names. ``base_subspaces`` (from :func:`left_subspaces`) skips the base
    decompositions; with ``base_model=None`` it is required and identical weights are not short-circuited.

    Returns ``mean_deg`` (mean over the non-trivial matrices), ``max_deg``, ``layer_mean_deg`` (mean of the
    per-layer values), ``per_layer`` ({layer index: mean over its types}), ``per_type``, ``per_matrix``
    ({name: degrees}), ``trivial`` (names with K == m), ``n_matrices``, ``n_unchanged``, ``update_norm``
    (``||W_tuned - W_base||_F`` over all selected matrices, None without base weights: rotation at equal
    update size is the fair comparison), ``top_k``, ``method`` and ``seconds``.
    """
    started = time.perf_counter()
    names = resolve_names(base_model if base_model is not None else tuned_model, selection)
    base_weights = named_weights(base_model) if base_model is not None else {}
    tuned_weights = named_weights(tuned_model)
    results: list[MatrixRotation] = []
    for name in names:
        if name not in tuned_weights:
            raise KeyError(f"rotation: the tuned model has no parameter {name!r}")
        base_u = base_subspaces.get(name) if base_subspaces is not None else None
        if base_u is None and name not in base_weights:
            if rotation_rank(tuned_weights[name].shape, top_k) == tuned_weights[name].shape[0]:
                base_u = tuned_weights[name].new_zeros(0)  # trivial anyway
            else:
                raise KeyError(f"rotation: no base weight or cached subspace for {name!r}")
        results.append(
            matrix_rotation(
                base_weights.get(name),
                tuned_weights[name],
                top_k=top_k,
                method=method,
                dtype=dtype,
                base_u=base_u,
                name=name,
            )
        )
    counted = [r for r in results if not r.trivial]
    update_sq = 0.0
    if base_weights:
        for name in names:
            if name in base_weights:
                tuned_w = tuned_weights[name].detach()
                delta = tuned_w.to(torch.float64) - base_weights[name].detach().to(
                    tuned_w.device, torch.float64
                )
                update_sq += float(delta.square().sum())
    per_layer: dict[int, list[float]] = {}
    per_type: dict[str, list[float]] = {}
    for r in counted:
        layer = layer_index(r.name)
        per_layer.setdefault(-1 if layer is None else layer, []).append(r.mean_deg)
        per_type.setdefault(matrix_type(r.name), []).append(r.mean_deg)
    layer_means = {layer: _mean(v) for layer, v in sorted(per_layer.items())}
    return {
        "top_k": top_k,
        "method": method,
        "mean_deg": _mean([r.mean_deg for r in counted]) or 0.0,
        "max_deg": max((r.mean_deg for r in counted), default=0.0),
        "layer_mean_deg": _mean(list(layer_means.values())) or 0.0,
        "per_layer": layer_means,
        "per_type": {t: _mean(v) for t, v in per_type.items()},
        "per_matrix": {r.name: r.mean_deg for r in counted},
        "trivial": [r.name for r in results if r.trivial],
        "n_matrices": len(counted),
        "n_unchanged": sum(r.unchanged for r in counted),
        "update_norm": math.sqrt(update_sq) if base_weights else None,
        "seconds": time.perf_counter() - started,
    }


def rotation_metrics(summary: Mapping[str, Any], prefix: str = "rotation/") -> dict[str, float]:
    """Flat ``{metric name: value}`` of a :func:`rotation_summary` (e.g. for ``mlflow.log_metrics``)."""
    metrics = {
        f"{prefix}mean_deg": float(summary["mean_deg"]),
        f"{prefix}max_deg": float(summary["max_deg"]),
        f"{prefix}layer_mean_deg": float(summary["layer_mean_deg"]),
    }
    if summary.get("update_norm") is not None:
        metrics[f"{prefix}update_norm"] = float(summary["update_norm"])
    for layer, value in summary["per_layer"].items():
        if value is not None:
            metrics[f"{prefix}layer_{int(layer):02d}_deg"] = float(value)
    for kind, value in summary["per_type"].items():
        if value is not None:
            metrics[f"{prefix}type_{kind}_deg"] = float(value)
    return metrics


def rank_grid(k: int, points: int = 64) -> list[int]:
    """Prefix ranks for the rankwise curve: every r up to 16, then about ``points`` evenly spaced, and K."""
    if k <= points:
        return list(range(1, k + 1))
    dense = list(range(1, min(16, k) + 1))
    rest = points - len(dense)
    spaced = {round(16 + i * (k - 16) / max(rest, 1)) for i in range(rest + 1)}
    return sorted(set(dense) | spaced | {k})


def rankwise_rotation(
    w_base: Tensor,
    w_tuned: Tensor,
    *,
    top_k: int = DEFAULT_TOP_K,
    ranks: Sequence[int] | str | None = None,
    method: str = "gram",
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Mean principal angle (degrees) between the first r columns of the base and tuned top-K left bases.

    ``ranks``: the prefixes r to evaluate (default :func:`rank_grid`; ``"all"`` for 1..K).
    """
    k = rotation_rank(w_tuned.shape, top_k)
    if ranks is None:
        ranks = rank_grid(k)
    elif ranks == "all":
        ranks = list(range(1, k + 1))
    ranks = [int(r) for r in ranks if 1 <= int(r) <= k]
    if torch.equal(w_base.detach().to(w_tuned.device, w_tuned.dtype), w_tuned.detach()):
        return {"k": k, "ranks": ranks, "mean_deg": [0.0] * len(ranks)}
    ub = left_subspace(w_base, top_k, method=method, dtype=dtype)
    ut = left_subspace(w_tuned, top_k, method=method, dtype=dtype).to(ub.device)
    return {"k": k, "ranks": ranks, "mean_deg": [mean_angle_deg(ub[:, :r], ut[:, :r]) for r in ranks]}


def protected_drift(
    base_model: WeightSource,
    tuned_model: WeightSource,
    selection: Any = "all",
    *,
    k: int | float = 64,
    bases=None,
    method: str = "gram",
) -> dict[str, Any]:
    """Drift of the protected block ``||U_k^T (W_tuned - W_base) V_k||_F`` per matrix, its mean and max.

    The same quantity the RPSFT regularizer logs (``reg.drift()``), but computable for any pair of
    checkpoints (SFT ones included), so trials of different methods compare on the same block. ``bases``:
    :class:`rpsft.core.bases.Bases` of the base weights (computed here at ``k`` when None).
    """
    from rpsft.core.bases import compute_bases, project_block

    started = time.perf_counter()
    names = resolve_names(base_model, selection)
    base_weights, tuned_weights = named_weights(base_model), named_weights(tuned_model)
    if bases is None:
        bases = compute_bases({name: base_weights[name] for name in names}, k, method=method)
    per_matrix: dict[str, float] = {}
    for name in names:
        entry = bases.entries[name]
        tuned_w = tuned_weights[name].detach()
        delta = tuned_w.to(torch.float64) - base_weights[name].detach().to(tuned_w.device, torch.float64)
        if entry.full:
            per_matrix[name] = float(delta.norm())
        elif entry.k == 0:
            per_matrix[name] = 0.0
        else:
            u, v = entry.u.to(delta.device, torch.float64), entry.v.to(delta.device, torch.float64)
            per_matrix[name] = float(project_block(delta, u, v).norm())
    values = list(per_matrix.values())
    return {
        "k": k,
        "mean": sum(values) / len(values) if values else 0.0,
        "max": max(values, default=0.0),
        "per_matrix": per_matrix,
        "seconds": time.perf_counter() - started,
    }
