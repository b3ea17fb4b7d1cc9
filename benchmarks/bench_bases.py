#!/usr/bin/env python
"""Benchmark the top-k singular bases (``rpsft.core.bases.top_k_bases``): time and accuracy per method.

For each unique matrix shape of an architecture (q/k/v/o/gate/up/down x layers, from a ``transformers`` config
built in code), a test matrix with a *decaying spectrum* is synthesized, ``W = U diag(s) V^T`` with random
orthogonal ``U``, ``V`` (so its true top-k subspaces are known), and each method is timed and compared with the
exact SVD:

* seconds per matrix, extrapolated to every matrix of that shape and to the whole model, ratio to ``exact``;
* mean / max principal angle (degrees) between the method's top-k left subspace and the exact one,
  ``arccos(svdvals(Uk_exact^T Uk_method))`` clipped to [0, 1] (by default evaluated in the numerically stable
  sine/cosine form in float64, see :func:`angles_deg`); the same for the right subspace, and the left angle
  against the true (construction) subspace;
* the spectral gap ``sigma_k / sigma_{k+1}`` of the test matrix (the smaller, the harder).

With ``--shapes smollm2`` (the default) it also measures the real SmolLM2-135M weights (``load_model``): one
matrix per shape, ``compute_bases`` end to end on all 210 matrices per method, and a cold vs warm
``load_or_compute_bases`` (cache in a temporary directory).

``--variants`` adds candidate implementations that live in this file (not in ``rpsft.core``): randomized SVD
with other power-iteration / oversampling settings, a sketch + ``eigh`` of the small Gram, a Gram + subspace
iteration, and the Gram method in float64. They show what a change to ``top_k_bases`` would buy.

    python benchmarks/bench_bases.py                                   # CPU, SmolLM2 shapes + real weights
    python benchmarks/bench_bases.py --device cuda --shapes llama3-8b  # the issue's target (k = 768)
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    ARCHS,
    DEFAULT_K,
    arch_config,
    environment,
    matrix_shapes,
    median,
    mib,
    resolve_device,
    table,
    timed,
    write_json,
)
from rpsft.core.bases import (  # noqa: E402
    BASIS_METHODS,
    compute_bases,
    load_or_compute_bases,
    resolve_k,
    top_k_bases,
    weights_fingerprint,
)

# ------------------------------------------------------------------ candidate implementations (benchmark-only)


def _orient(w: Tensor) -> tuple[Tensor, bool]:
    """``a`` with rows <= columns (``w`` or ``w^T``) and whether it was transposed."""
    transposed = w.shape[0] > w.shape[1]
    return (w.transpose(0, 1) if transposed else w), transposed


def _right_from_left(a: Tensor, u: Tensor) -> Tensor:
    """Orthonormal ``V_k`` from ``A^T U_k`` (= V_k S_k) by QR with the sign fixed to match, as in ``gram``."""
    bt = a.transpose(0, 1) @ u
    v, _ = torch.linalg.qr(bt)
    return v * torch.sign(torch.sum(v * bt, dim=0, keepdim=True))


def _randn(shape: tuple[int, int], like: Tensor, seed: int = 0) -> Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


def randomized(niter: int, oversample: int | str) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    """``torch.svd_lowrank`` as in ``_top_k_randomized`` with other settings (``oversample="k/2"`` = k // 2)."""

    def fn(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
        p = _oversample(oversample, k)
        q = min(k + p, min(w.shape))
        u, _, v = torch.svd_lowrank(w, q=q, niter=niter)
        return u[:, :k], v[:, :k]

    return fn


def sketch_eigh(niter: int, oversample: int | str) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    """Randomized range finder on the narrow side, one QR per power iteration (``A A^T Q``), then
    Rayleigh-Ritz by ``eigh`` of the small ``q x q`` Gram of the sketch ``B = Q^T A`` in float64; the other
    side by one matmul + QR (as ``gram``). No SVD at all; the QRs are of ``min(m,n) x q`` matrices."""

    def fn(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
        a, transposed = _orient(w)
        m, n = a.shape
        q = min(k + _oversample(oversample, k), m)
        basis, _ = torch.linalg.qr(a @ _randn((n, q), a))
        for _ in range(niter):
            basis, _ = torch.linalg.qr(a @ (a.transpose(0, 1) @ basis))
        b = basis.transpose(0, 1) @ a  # q x n
        _, evecs = torch.linalg.eigh((b @ b.transpose(0, 1)).double())
        u = basis @ evecs[:, -k:].flip(-1).to(a.dtype)
        v = _right_from_left(a, u)
        return (v, u) if transposed else (u, v)

    return fn


def gram_subspace(niter: int, oversample: int | str) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    """Gram ``G = A A^T`` of the narrow side (as ``gram``), but instead of a full ``eigh`` of ``G`` a block
    subspace iteration with ``q = k + p`` columns and a ``q x q`` Rayleigh-Ritz ``eigh`` (float64)."""

    def fn(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
        a, transposed = _orient(w)
        m = a.shape[0]
        q = min(k + _oversample(oversample, k), m)
        g = a @ a.transpose(0, 1)
        basis, _ = torch.linalg.qr(g @ _randn((m, q), a))
        for _ in range(niter):
            basis, _ = torch.linalg.qr(g @ basis)
        _, evecs = torch.linalg.eigh((basis.transpose(0, 1) @ g @ basis).double())
        u = basis @ evecs[:, -k:].flip(-1).to(a.dtype)
        v = _right_from_left(a, u)
        return (v, u) if transposed else (u, v)

    return fn


def gram_fp64(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``top_k_bases(..., "gram")`` computed in float64 (what ``compute_dtype=torch.float64`` would do)."""
    u, v = top_k_bases(w.double(), k, "gram")
    return u.to(w.dtype), v.to(w.dtype)


def _oversample(spec: int | str, k: int) -> int:
    if isinstance(spec, str):  # "k/2", "k/4"
        return max(16, k // int(spec.split("/")[1]))
    return int(spec)


VARIANTS: dict[str, Callable[[Tensor, int], tuple[Tensor, Tensor]]] = {
    "rand[it=2,p=16]": randomized(2, 16),
    "rand[it=4,p=16]": randomized(4, 16),
    "rand[it=10,p=16]": randomized(10, 16),
    "rand[it=2,p=k/2]": randomized(2, "k/2"),
    "rand[it=4,p=k/2]": randomized(4, "k/2"),
    "sketch-eigh[it=2,p=k/2]": sketch_eigh(2, "k/2"),
    "sketch-eigh[it=4,p=k/2]": sketch_eigh(4, "k/2"),
    "gram-sub[it=3,p=k/2]": gram_subspace(3, "k/2"),
    "gram(fp64)": gram_fp64,
}


def _split_list(text: str) -> list[str]:
    """Split a comma list, keeping commas inside brackets (``rand[it=4,p=16],gram(fp64)``)."""
    return re.split(r",(?![^\[]*\])", text)


# the default subset (--variants default): the 2-iteration variants are clearly worse and left to --variants all
DEFAULT_VARIANTS = ["rand[it=4,p=16]", "rand[it=10,p=16]", "rand[it=4,p=k/2]", "sketch-eigh[it=4,p=k/2]",
                    "gram-sub[it=3,p=k/2]", "gram(fp64)"]


def method_fn(name: str) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    if name in BASIS_METHODS:
        return lambda w, k: top_k_bases(w, k, name)
    return VARIANTS[name]


# ------------------------------------------------------------------------------------------ test matrices


def synthesize(shape: tuple[int, int], spectrum: str, *, alpha: float, seed: int, device: torch.device):
    """``W = U diag(s) V^T`` (float32) with random orthogonal ``U`` (m x r), ``V`` (n x r), ``r = min(m, n)``.

    ``power``: ``s_i = i^-alpha``. ``exp``: ``s_i = exp(-ln(1000) (i-1)/(r-1)) * (1 + 0.05 xi_i)`` sorted (an
    exponential decay over three decades with multiplicative noise, so the gaps are irregular).
    Returns ``(W, U, V, s)`` with ``s`` in float64 on the CPU.
    """
    m, n = shape
    r = min(m, n)
    gen = torch.Generator(device=device).manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device))
    i = torch.arange(1, r + 1, dtype=torch.float64)
    if spectrum == "power":
        s = i.pow(-alpha)
    elif spectrum == "exp":
        noise = torch.randn(r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        s = torch.exp(-math.log(1000.0) * (i - 1) / max(r - 1, 1)) * (1 + 0.05 * noise).clamp_min(0.5)
        s = torch.sort(s, descending=True).values
    else:
        raise ValueError(f"--spectrum: unknown {spectrum!r}; use power or exp")
    w = (u * s.to(device=device, dtype=u.dtype)) @ v.transpose(0, 1)
    return w, u, v, s


ANGLE_FORMULA = "stable"  # set from --angle-formula


def angles_deg(reference: Tensor, other: Tensor) -> tuple[float, float]:
    """Mean and max principal angle (degrees) between the column spaces of two k-column bases.

    ``arccos``: ``arccos(clip(svdvals(A^T B), 0, 1))`` in float64 on the bases as given; fp32 bases are
    orthonormal only to ~1e-7, which puts a floor of ~0.02-0.03 deg under it (exact vs itself reads ~0.025).
    ``stable`` (default): both bases re-orthonormalized in float64, then the small angles from the sines
    (``svdvals(B - A A^T B)``, Knyazev-Argentati) and the angles above 45 deg from the cosines; identical
    angles without the floor.
    """
    a, b = reference.double(), other.double()
    if ANGLE_FORMULA == "arccos":
        cosines = torch.linalg.svdvals(a.transpose(0, 1) @ b).clamp(0.0, 1.0)
        angles = torch.arccos(cosines)
    else:
        a, _ = torch.linalg.qr(a)
        b, _ = torch.linalg.qr(b)
        cross = a.transpose(0, 1) @ b
        from_cos = torch.arccos(torch.linalg.svdvals(cross).clamp(0.0, 1.0))  # ascending angles
        sines = torch.linalg.svdvals(b - a @ cross).clamp(0.0, 1.0).flip(0)  # ascending sines
        from_sin = torch.arcsin(sines)
        angles = torch.where(from_sin < math.pi / 4, from_sin, from_cos)
    angles = torch.rad2deg(angles)
    return float(angles.mean()), float(angles.max())


def gap_of(s: Tensor, k: int) -> float | None:
    return float(s[k - 1] / s[k]) if k < s.numel() and s[k] > 0 else None


# ---------------------------------------------------------------------------------------------- benchmarks


def bench_matrix(w: Tensor, k: int, methods: list[str], repeats: int, device: torch.device,
                 truth: tuple[Tensor, Tensor] | None) -> dict[str, dict]:
    """Time every method on ``w`` and measure its angles to exact (and to the truth).

    The repeats are interleaved across methods (round-robin) and the time kept is the best of ``repeats``
    (the least disturbed run on a shared machine); all runs are in ``times``.
    """
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, tuple[Tensor, Tensor]] = {}
    for _ in range(repeats):
        for name in methods:
            fn = method_fn(name)
            seconds, results[name] = timed(lambda: fn(w, k), device)
            times[name].append(seconds)
    out: dict[str, dict] = {}
    reference = results.get("exact")
    for name in methods:
        u, v = results[name]
        row = {"seconds": min(times[name]), "times": times[name]}
        if reference is not None:
            row["angle_u"], row["angle_u_max"] = angles_deg(reference[0], u)
            row["angle_v"], _ = angles_deg(reference[1], v)
        if truth is not None:
            row["angle_true"], row["angle_true_max"] = angles_deg(truth[0][:, :k], u)
        out[name] = row
    return out


def bench_shapes(args, shapes, device, methods) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    for shape, info in shapes.items():
        kk = resolve_k(args.k, shape)
        label = f"{shape[0]}x{shape[1]}"
        types = "/".join(info["types"])
        if kk == min(shape) or kk == 0:
            rows.append({"shape": label, "types": types, "count": info["count"], "k": kk, "matrix": "-",
                         "method": "(full mode: W0 stored, no SVD)" if kk else "(k=0: no bases)",
                         "seconds": 0.0, "total": 0.0})
            continue
        for spectrum in args.spectrum:
            per_method: dict[str, list[dict]] = {m: [] for m in methods}
            gap = None
            for index in range(args.max_matrices):
                w, u_true, v_true, s = synthesize(shape, spectrum, alpha=args.alpha, seed=args.seed + index,
                                                  device=device)
                gap = gap_of(s, kk) if gap is None else gap
                result = bench_matrix(w, kk, methods, args.repeats, device, (u_true, v_true))
                for name, row in result.items():
                    per_method[name].append(row)
                del w, u_true, v_true
            exact_seconds = _mean(per_method.get("exact", []), "seconds")
            for name, results in per_method.items():
                seconds = _mean(results, "seconds")
                rows.append({
                    "shape": label, "types": types, "count": info["count"], "k": kk,
                    "matrix": spectrum + (f" x{args.max_matrices}" if args.max_matrices > 1 else ""),
                    "gap": gap, "method": name, "seconds": seconds, "total": seconds * info["count"],
                    "x_exact": seconds / exact_seconds if exact_seconds else None,
                    "angle_u": _mean(results, "angle_u"), "angle_u_max": _max(results, "angle_u_max"),
                    "angle_v": _mean(results, "angle_v"), "angle_true": _mean(results, "angle_true"),
                })
            done = [r for r in rows if r["shape"] == label and r["matrix"].split(" ")[0] == spectrum]
            print(f"  {label} {spectrum}: " + ", ".join(
                f"{r['method']} {r['seconds']:.3g}s/{r['angle_u'] if r.get('angle_u') is not None else float('nan'):.3g}deg"
                for r in done), file=sys.stderr, flush=True)
            if args.json:  # checkpoint, so a long run that is stopped keeps what it measured
                write_json(args.json + ".partial", {"args": vars(args), "per_shape": rows}, quiet=True)
    summary = summarize(rows, shapes, methods, args.spectrum)
    return rows, summary


def summarize(rows: list[dict], shapes, methods: list[str], spectra: list[str]) -> list[dict]:
    """Whole-model totals per (spectrum, method): extrapolated seconds, ratio, count-weighted mean angles."""
    full = [r for r in rows if r["matrix"] == "-"]
    n_total = sum(info["count"] for info in shapes.values())
    out = []
    for spectrum in spectra:
        exact_total = None
        for name in methods:
            picked = [r for r in rows if r["method"] == name and r["matrix"].split(" ")[0] == spectrum]
            if not picked and not full:
                continue
            total = sum(r["total"] for r in picked)
            weight = sum(r["count"] for r in picked)
            row = {"matrix": spectrum, "method": name, "matrices": n_total, "total": total,
                   "full_mode": sum(r["count"] for r in full)}
            for key in ("angle_u", "angle_v", "angle_true"):
                vals = [(r[key], r["count"]) for r in picked if r.get(key) is not None]
                row[key] = sum(v * c for v, c in vals) / sum(c for _, c in vals) if vals else None
            row["angle_u_max"] = _max(picked, "angle_u_max")
            if name == "exact":
                exact_total = total
            row["x_exact"] = total / exact_total if exact_total else None
            row["weighted_matrices"] = weight
            out.append(row)
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _max(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return max(vals) if vals else None


def bench_real_smollm2(args, device, methods) -> tuple[list[dict], list[dict], list[dict]]:
    """Real SmolLM2-135M weights: one matrix per shape, compute_bases end to end, cache cold vs warm."""
    from rpsft.core.models import load_model
    from rpsft.core.selection import select_matrices

    model, _ = load_model("smollm2-135m-instruct", device=device)
    selection = select_matrices(model, args.selection)
    layer = len({n.split(".layers.")[1].split(".")[0] for n in selection if ".layers." in n}) // 2

    # one real matrix per shape (the middle layer's first matrix of that shape)
    per_shape: dict[tuple[int, int], str] = {}
    for name, param in selection.items():
        if f".layers.{layer}." in name:
            per_shape.setdefault(tuple(param.shape), name)
    counts: dict[tuple[int, int], int] = {}
    for param in selection.values():
        counts[tuple(param.shape)] = counts.get(tuple(param.shape), 0) + 1
    rows = []
    for shape, name in per_shape.items():
        kk = resolve_k(args.k, shape)
        if kk in (0, min(shape)):
            continue
        w = selection[name].detach().float()
        # truth: float64 SVD of the real weight
        u64, s64, v64h = torch.linalg.svd(w.double(), full_matrices=False)
        result = bench_matrix(w, kk, methods, args.repeats, device, (u64.float(), v64h.transpose(0, 1).float()))
        exact_seconds = result.get("exact", {}).get("seconds")
        short = name.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "").replace(
            "mlp.", "")
        for method, row in result.items():
            rows.append({
                "shape": f"{shape[0]}x{shape[1]}", "count": counts[shape], "k": kk, "matrix": f"real {short}",
                "gap": gap_of(s64.cpu(), kk), "method": method, "seconds": row["seconds"],
                "total": row["seconds"] * counts[shape],
                "x_exact": row["seconds"] / exact_seconds if exact_seconds else None,
                "angle_u": row.get("angle_u"), "angle_u_max": row.get("angle_u_max"),
                "angle_v": row.get("angle_v"), "angle_true": row.get("angle_true"),
            })
    print("  done real per-shape", file=sys.stderr, flush=True)

    # compute_bases end to end, every matrix of the selection, per rpsft.core method
    e2e = []
    reference = None
    for method in [m for m in methods if m in BASIS_METHODS]:
        seconds, bases = timed(lambda: compute_bases(selection, args.k, method=method), device)
        row = {"method": method, "matrices": len(bases), "seconds": seconds, "bases_mib": mib(bases.nbytes())}
        if method == "exact":
            reference = bases
        if reference is not None:
            per_matrix = []
            for name, entry in bases.entries.items():
                if entry.full or entry.k == 0:
                    continue
                ref = reference.entries[name]
                mean_u, max_u = angles_deg(ref.u, entry.u)
                mean_v, _ = angles_deg(ref.v, entry.v)
                per_matrix.append((mean_u, max_u, mean_v, name))
            row["angle_u"] = sum(p[0] for p in per_matrix) / len(per_matrix)
            row["angle_v"] = sum(p[2] for p in per_matrix) / len(per_matrix)
            worst = max(per_matrix, key=lambda p: p[0])
            row["worst_matrix_angle_u"] = worst[0]
            row["worst_matrix"] = worst[3].replace("model.layers.", "L").replace(".weight", "")
            row["angle_u_max"] = max(p[1] for p in per_matrix)
        e2e.append(row)
        print(f"  done compute_bases {method}", file=sys.stderr, flush=True)
    exact_seconds = next((r["seconds"] for r in e2e if r["method"] == "exact"), None)
    for row in e2e:
        row["x_exact"] = row["seconds"] / exact_seconds if exact_seconds else None

    # cached load: cold (fingerprint + compute + save) vs warm (fingerprint + load + verify + slice + bind)
    cache = []
    with tempfile.TemporaryDirectory(prefix="rpsft-bases-cache-") as tmp:
        method = args.cache_method
        seconds, _ = timed(lambda: weights_fingerprint(selection, method), device)
        cache.append({"step": "weights_fingerprint alone (sha256 of the selected weights)", "seconds": seconds})
        seconds, _ = timed(lambda: load_or_compute_bases(selection, args.k, cache_dir=tmp, method=method), device)
        cold = seconds
        cache.append({"step": f"cold load_or_compute_bases ({method}: compute + save)", "seconds": seconds})
        warm = [timed(lambda: load_or_compute_bases(selection, args.k, cache_dir=tmp, method=method), device)[0]
                for _ in range(3)]
        cache.append({"step": "warm load_or_compute_bases (cache hit, median of 3)", "seconds": median(warm)})
        half = max(1, args.k // 2) if isinstance(args.k, int) else args.k / 2
        seconds, _ = timed(lambda: load_or_compute_bases(selection, half, cache_dir=tmp, method=method), device)
        cache.append({"step": f"warm at k={half} (cache hit, sliced)", "seconds": seconds})
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        for row in cache:
            row["x_cold"] = row["seconds"] / cold
        cache.append({"step": f"cache file size: {size / 2**20:.1f} MiB", "seconds": None})
    print("  done cache", file=sys.stderr, flush=True)
    return rows, e2e, cache


# -------------------------------------------------------------------------------------------------- main


SHAPE_COLUMNS = [
    ("shape", "shape"), ("types", "types"), ("count", "count"), ("k", "k"), ("matrix", "test matrix"),
    ("gap", "gap s_k/s_k+1"), ("method", "method"), ("seconds", "s/matrix"), ("total", "total s (x count)"),
    ("x_exact", "x exact"), ("angle_u", "U angle deg (vs exact)"), ("angle_u_max", "U max deg"),
    ("angle_v", "V angle deg"), ("angle_true", "U angle deg (vs truth)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", choices=ARCHS, default="smollm2", help="architecture whose matrix shapes to use")
    p.add_argument("--k", type=int, default=None, help="rank (default: 64 for smollm2, 768 otherwise)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per method and matrix, interleaved across methods; the best is kept "
                        "(default 3, or 1 for big shapes on CPU)")
    p.add_argument("--methods", default=",".join(BASIS_METHODS), help="rpsft.core methods (exact first)")
    p.add_argument("--variants", default="default",
                   help="benchmark-local candidate methods: 'default' (" + ", ".join(DEFAULT_VARIANTS)
                        + "), 'all', 'none' or a comma list of " + ", ".join(VARIANTS))
    p.add_argument("--spectrum", default="power,exp", help="synthetic spectra: power (i^-alpha), exp (+noise)")
    p.add_argument("--alpha", type=float, default=0.7, help="power-law exponent of the synthetic spectrum")
    p.add_argument("--max-matrices", type=int, default=1,
                   help="synthetic matrices timed per shape (the total extrapolates by the model's count)")
    p.add_argument("--only-shapes", default=None, help="comma list like 4096x4096,1024x4096 to restrict shapes")
    p.add_argument("--selection", default="all", help="matrix selection preset (rpsft.core.selection)")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="also benchmark the real SmolLM2-135M weights (default: on for --shapes smollm2)")
    p.add_argument("--cache-method", default="exact", choices=BASIS_METHODS,
                   help="basis method for the cold/warm cache measurement")
    p.add_argument("--angle-formula", choices=["stable", "arccos"], default="stable",
                   help="principal angles: plain arccos of the cosines (floor ~0.02 deg in fp32) or the stable "
                        "sine/cosine form on float64-reorthonormalized bases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="write all rows to this JSON file")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = DEFAULT_K[args.shapes]
    big = args.shapes != "smollm2"
    if args.repeats is None:
        args.repeats = 1 if (big and args.device == "cpu") else 3
    if args.real is None:
        args.real = args.shapes == "smollm2"
    args.spectrum = [s.strip() for s in args.spectrum.split(",") if s.strip()]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)  # torch.svd_lowrank draws its test matrix from the global generator
    global ANGLE_FORMULA
    ANGLE_FORMULA = args.angle_formula
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "exact" in methods:  # exact is the reference: run it first
        methods = ["exact"] + [m for m in methods if m != "exact"]
    named = {"all": list(VARIANTS), "default": DEFAULT_VARIANTS, "none": []}
    variants = named[args.variants] if args.variants in named else [
        v.strip() for v in _split_list(args.variants) if v.strip()]
    unknown = [m for m in methods + variants if m not in BASIS_METHODS and m not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; rpsft.core: {BASIS_METHODS}; variants: {list(VARIANTS)}")
    all_methods = methods + [v for v in variants if v not in methods]

    cfg = arch_config(args.shapes)
    shapes = matrix_shapes(cfg, args.selection)
    if args.only_shapes:
        wanted = {tuple(int(x) for x in s.split("x")) for s in args.only_shapes.split(",")}
        shapes = type(shapes)((s, i) for s, i in shapes.items() if s in wanted)

    # warm up the linear-algebra libraries (first cuSOLVER / MKL call) outside the timings
    warm = torch.randn(256, 192, device=device)
    for name in all_methods:
        method_fn(name)(warm, 32)

    env = environment(device)
    n_total = sum(i["count"] for i in shapes.values())
    print(f"# bench_bases: {args.shapes} shapes, k={args.k}, device={device}, repeats={args.repeats}, "
          f"max_matrices={args.max_matrices}, spectra={','.join(args.spectrum)} (alpha={args.alpha})")
    print("# env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"# {n_total} selected matrices ({args.selection}): "
          + ", ".join(f"{m}x{n} x{i['count']} ({'/'.join(i['types'])})" for (m, n), i in shapes.items()))
    print(f"# angles ({args.angle_formula}): mean principal angle in degrees between top-k subspaces,"
          " = mean(arccos(svdvals(U_ref^T U_method))); 'vs truth' = the construction's U (synthetic)"
          " or a float64 SVD (real weights)\n")

    rows, summary = bench_shapes(args, shapes, device, all_methods)
    print("## Per shape (synthetic decaying spectra)\n")
    print(table(rows, SHAPE_COLUMNS))
    print(f"\n## Whole model ({args.shapes}: {n_total} matrices, extrapolated from one timed matrix per shape)\n")
    print(table(summary, [
        ("matrix", "test spectrum"), ("method", "method"), ("total", "total s (all matrices)"),
        ("x_exact", "x exact"), ("angle_u", "U angle deg (count-weighted)"), ("angle_u_max", "U max deg"),
        ("angle_v", "V angle deg"), ("angle_true", "U angle deg vs truth"), ("full_mode", "full-mode matrices"),
    ]))

    payload = {"args": vars(args), "env": env, "shapes": {f"{m}x{n}": i for (m, n), i in shapes.items()},
               "per_shape": rows, "summary": summary}
    if args.real:
        real_rows, e2e, cache = bench_real_smollm2(args, device, all_methods)
        print("\n## Real SmolLM2-135M weights, one matrix per shape (middle layer)\n")
        print(table(real_rows, [c for c in SHAPE_COLUMNS if c[0] != "types"]))
        print(f"\n## compute_bases end to end, real SmolLM2-135M, selection '{args.selection}', k={args.k}\n")
        print(table(e2e, [
            ("method", "method"), ("matrices", "matrices"), ("seconds", "seconds"), ("x_exact", "x exact"),
            ("bases_mib", "bases MiB"), ("angle_u", "mean U angle deg"), ("angle_v", "mean V angle deg"),
            ("worst_matrix_angle_u", "worst matrix mean U deg"), ("worst_matrix", "worst matrix"),
            ("angle_u_max", "max U angle deg"),
        ]))
        print(f"\n## Bases cache (load_or_compute_bases, tempdir), real SmolLM2-135M, k={args.k}\n")
        print(table(cache, [("step", "step"), ("seconds", "seconds"), ("x_cold", "x cold")]))
        payload.update({"real_per_shape": real_rows, "compute_bases": e2e, "cache": cache})
    payload["load_avg_1m_end"] = environment(device).get("load_avg_1m")
    print(f"\n# load_avg_1m at start {env.get('load_avg_1m')}, at end {payload['load_avg_1m_end']} "
          f"({torch.get_num_threads()} threads; well above that = other processes share the CPU, timings inflated)")
    write_json(args.json, payload)
    if args.json:
        Path(args.json + ".partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
