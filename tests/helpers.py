"""Shared test helpers: matrices with a decaying spectrum and subspace angles (independent of rpsft.core)."""

import torch


def decaying_matrix(
    m: int, n: int, *, decay: float = 0.9, seed: int = 0, dtype=torch.float64
) -> torch.Tensor:
    """W = U diag(s) V^T with s_i = decay^i (a clear spectral gap at every index)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (u * s) @ v.T if dtype is None else ((u * s) @ v.T).to(dtype)


def mean_angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean principal angle between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(a.double().T @ b.double()).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).mean().item()


def tradeoff_by_hand(base, record, benches, indices=None):
    """G_id and F_ood computed by hand, independently of rpsft.evaluation.intervals: per benchmark the weighted mean of
    the tuned minus the base model's NLL item scores (ID) or the base's minus the tuned (OOD), on ``indices``
    (``{(suite, bench): item indices}``) or all items; then the mean over each suite's ``benches``."""
    import numpy as np

    out = {}
    for suite, sign in (("id", 1.0), ("ood", -1.0)):
        diffs = []
        for bench in benches[suite]:
            b = np.asarray(base[f"{suite}_nll"][bench])
            t = np.asarray(record[f"{suite}_nll"][bench])
            idx = slice(None) if indices is None else indices[(suite, bench)]
            diffs.append(sign * (t[idx, 0].sum() / t[idx, 1].sum() - b[idx, 0].sum() / b[idx, 1].sum()))
        out[suite] = float(np.mean(diffs))
    return out["id"], out["ood"]
