"""Pretrained top-k singular bases ``Uk``, ``Vk`` and reference block ``Sref`` for each protected matrix.

``Sref`` is always computed from the bases *as stored* (same dtype, same projection routine as the penalty), so
the penalty is exactly zero at the pretrained weights. A matrix whose resolved ``k`` equals ``min(m, n)`` is
stored in *full* mode: it keeps ``W0`` itself and the penalty is the L2-to-init distance ``||W - W0||_F^2``
(the top-k penalty with complete orthonormal bases). ``k = 0`` stores empty bases: no penalty, plain SFT.

Bases are computed once at the largest ``k`` needed; :meth:`Bases.truncate` slices them for smaller ``k``
(the leading columns of a top-k basis are the top-k' basis). :func:`load_or_compute_bases` caches them as
safetensors keyed by a fingerprint of the weights, the selection and the basis method, with a content hash
checked on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rpsft.core.fingerprint import tensors_sha256
from rpsft.core.k_spec import parse_k_spec
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

BasisMethod = Literal["exact", "gram", "randomized"]
BASIS_METHODS: tuple[str, ...] = ("exact", "gram", "randomized")
KSpec = int | float


class BasisCacheError(RuntimeError):
    """A cached basis file is corrupt or does not belong to these weights."""


def check_k(k: KSpec) -> KSpec:
    """Validate a resolved rank spec: an int >= 0, or a fraction of each matrix's rank in (0, 1]
    (:func:`rpsft.core.k_spec.parse_k_spec`; an ``auto`` spec must be resolved before bases exist)."""
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ValueError(
            f"k: expected an int rank or a fraction in (0, 1], got {k!r}. Fix: resolve an 'auto' spec first "
            "(rpsft.core.rank_rule.resolve_auto_k)"
        )
    return parse_k_spec(k)


def resolve_k(k: KSpec, shape: tuple[int, int]) -> int:
    """Resolve an int or a rank fraction to an int in ``[0, min(m, n)]`` (ints above the rank are clamped)."""
    rank = min(shape)
    if isinstance(check_k(k), float):
        return max(1, min(rank, round(k * rank)))
    return min(int(k), rank)


def mean_rank_fraction(k: int | float, shapes: Iterable[tuple[int, int]]) -> float:
    """The share of each matrix's rank that ``k`` (an int rank or a rank fraction) protects, averaged over the
    matrices' ``shapes``: ``resolve_k(k, shape) / min(shape)``. 0 for ``k = 0`` (SFT); 1 at full rank."""
    shapes = list(shapes)
    if not shapes:
        raise ValueError("mean_rank_fraction: no matrices")
    if k == 0:
        return 0.0
    return sum(resolve_k(k, shape) / min(shape) for shape in shapes) / len(shapes)


def project_block(weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``U^T W V`` (k x k), computed as ``U^T (W V)``: the one routine used for ``Sref`` and the penalty."""
    return u.transpose(0, 1) @ (weight.to(u.dtype) @ v)


@dataclass
class MatrixBasis:
    """Bases of one matrix. In full mode ``w0`` holds the pretrained weight and ``u``/``v``/``sref`` are empty."""

    u: Tensor  # m x k
    v: Tensor  # n x k
    sref: Tensor  # k x k
    shape: tuple[int, int]
    w0: Tensor | None = None

    @property
    def k(self) -> int:
        return min(self.shape) if self.full else self.u.shape[1]

    @property
    def full(self) -> bool:
        return self.w0 is not None

    def covers(self, k: int) -> bool:
        """Whether bases at resolved rank ``k`` can be sliced from this entry."""
        if self.full:
            return k == min(self.shape)
        return k <= self.k and k != min(self.shape)

    def nbytes(self) -> int:
        tensors = [self.u, self.v, self.sref] + ([self.w0] if self.w0 is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Bases:
    """Top-k bases for a selection of matrices, keyed by parameter name."""

    entries: dict[str, MatrixBasis]
    method: str = "exact"
    fingerprint: str = ""
    params: dict[str, nn.Parameter] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ks(self) -> dict[str, int]:
        return {name: entry.k for name, entry in self.entries.items()}

    def nbytes(self) -> int:
        return sum(entry.nbytes() for entry in self.entries.values())

    def truncate(self, k: KSpec) -> Bases:
        """Bases at a smaller ``k`` (int or fraction, resolved per matrix) by slicing; no recomputation."""
        entries: dict[str, MatrixBasis] = {}
        for name, entry in self.entries.items():
            kk = resolve_k(k, entry.shape)
            if not entry.covers(kk):
                have = "full mode (W0 only)" if entry.full else f"k={entry.k}"
                raise ValueError(
                    f"k: cannot slice {name} to k={kk}: the bases hold {have}. "
                    "Fix: compute the bases at the largest k the run needs (full rank needs its own bases)"
                )
            if entry.full:
                entries[name] = entry
                continue
            u, v = entry.u[:, :kk].contiguous(), entry.v[:, :kk].contiguous()
            entries[name] = MatrixBasis(u, v, entry.sref[:kk, :kk].contiguous(), entry.shape)
        return Bases(entries, self.method, self.fingerprint, self.params)

    def bind(self, params: dict[str, nn.Parameter] | nn.Module) -> Bases:
        """Attach the live parameters (a selection dict, or a model to look the names up in)."""
        if isinstance(params, nn.Module):
            named = dict(params.named_parameters(remove_duplicate=False))
            missing = [n for n in self.entries if n not in named]
            if missing:
                raise KeyError(f"bases: parameters {missing[:3]} not found in the model")
            params = {n: named[n] for n in self.entries}
        self.params = dict(params)
        return self

    def to(self, device: torch.device | str) -> Bases:
        for entry in self.entries.values():
            entry.u, entry.v, entry.sref = entry.u.to(device), entry.v.to(device), entry.sref.to(device)
            if entry.w0 is not None:
                entry.w0 = entry.w0.to(device)
        return self


def _full_entry(w0: Tensor, dtype: torch.dtype) -> MatrixBasis:
    empty = w0.new_zeros((0,), dtype=dtype)
    return MatrixBasis(empty, empty, empty, tuple(w0.shape), w0=w0.detach().clone())


def _top_k_exact(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], vh[:k].transpose(0, 1)


def _top_k_gram(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the Gram matrix of the narrow side; the other side by one matmul + QR."""
    transposed = w.shape[0] > w.shape[1]
    a = w.transpose(0, 1) if transposed else w  # a is m x n with m <= n
    _, evecs = torch.linalg.eigh(a @ a.transpose(0, 1))
    u = evecs[:, -k:].flip(-1)
    v, _ = torch.linalg.qr(a.transpose(0, 1) @ u)  # = V_k S_k up to column scale; QR keeps it orthonormal
    v = v * torch.sign(torch.sum(v * (a.transpose(0, 1) @ u), dim=0, keepdim=True))
    return (v, u) if transposed else (u, v)


def _top_k_randomized(w: Tensor, k: int, niter: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Randomized subspace iteration (``torch.svd_lowrank``), seeded so bases are reproducible.

    Oversampling ``k/2`` matters more than more iterations at large k (benchmarks/README.md).
    """
    q = min(k + max(16, k // 2), min(w.shape))
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :k], v[:, :k]


def top_k_bases(w: Tensor, k: int, method: str = "exact") -> tuple[Tensor, Tensor]:
    """Top-k left/right singular vectors of ``w`` (float32 or float64 compute)."""
    if method == "exact":
        return _top_k_exact(w, k)
    if method == "gram":
        return _top_k_gram(w, k)
    if method == "randomized":
        return _top_k_randomized(w, k)
    raise ValueError(f"basis_method: unknown {method!r}. Fix: use one of {', '.join(BASIS_METHODS)}")


@torch.no_grad()
def compute_bases(
    selection: dict[str, nn.Parameter],
    k: KSpec,
    *,
    method: str = "exact",
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Bases:
    """Compute ``Uk``, ``Vk``, ``Sref`` for each selected matrix at its resolved ``k``.

    ``dtype`` is the storage dtype of the bases (default: float32, float64 for float64 weights, so the small
    drift of bf16 weights is not lost in bf16 rounding; pass ``torch.bfloat16`` to halve their memory);
    ``Sref`` is built from the stored bases, so the penalty at the pretrained weights is exactly zero. ``compute_dtype`` defaults to
    float32 (float64 for float64 weights).
    """
    if method not in BASIS_METHODS:
        raise ValueError(f"basis_method: unknown {method!r}. Fix: use one of {', '.join(BASIS_METHODS)}")
    from tqdm.auto import tqdm

    entries: dict[str, MatrixBasis] = {}
    for name, param in tqdm(selection.items(), desc=f"bases ({method})", disable=not progress, leave=False):
        w0 = param.detach()
        if w0.ndim != 2:
            raise ValueError(f"layers: {name} is not a 2-D matrix (shape {tuple(w0.shape)})")
        store_dtype = dtype or torch.promote_types(w0.dtype, torch.float32)
        kk = resolve_k(k, tuple(w0.shape))
        if kk == min(w0.shape):
            entries[name] = _full_entry(w0, store_dtype)
            continue
        if kk == 0:
            u, v = w0.new_zeros((w0.shape[0], 0)), w0.new_zeros((w0.shape[1], 0))
        else:
            u, v = top_k_bases(
                w0.to(compute_dtype or torch.promote_types(w0.dtype, torch.float32)), kk, method
            )
        u, v = u.to(store_dtype).contiguous(), v.to(store_dtype).contiguous()
        entries[name] = MatrixBasis(u, v, project_block(w0, u, v), tuple(w0.shape))
    return Bases(entries, method, params=dict(selection))


# --------------------------------------------------------------------------------------------- caching


def weights_fingerprint(selection: dict[str, nn.Parameter], method: str, extra: str = "") -> str:
    """sha256 over names, shapes, dtypes and bytes of the selected matrices, plus the basis method."""
    return tensors_sha256(
        ((f"{name}:{tuple(param.shape)}:{param.dtype}", param) for name, param in selection.items()),
        header=f"method={method};{extra}",
    )


def _content_hash(tensors: dict[str, Tensor]) -> str:
    return tensors_sha256((key, tensors[key]) for key in sorted(tensors))


def save_bases(bases: Bases, path: str | os.PathLike, k: KSpec) -> None:
    """Write bases to a safetensors file with their fingerprint, k and a content hash in the metadata."""
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, entry in bases.entries.items():
        shapes[name] = list(entry.shape)
        if entry.full:
            tensors[f"{name}::w0"] = entry.w0
        else:
            tensors[f"{name}::u"], tensors[f"{name}::v"], tensors[f"{name}::sref"] = (
                entry.u,
                entry.v,
                entry.sref,
            )
    tensors = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    metadata = {
        "fingerprint": bases.fingerprint,
        "method": bases.method,
        "k": json.dumps(k),
        "shapes": json.dumps(shapes),
        "content_sha256": _content_hash(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_bases(path: str | os.PathLike, expected_fingerprint: str | None = None) -> tuple[Bases, KSpec]:
    """Read bases written by :func:`save_bases`; verify the content hash (and the fingerprint if given)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # truncated or overwritten: safetensors raises its own error types
        raise BasisCacheError(f"bases: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if metadata.get("content_sha256") != _content_hash(tensors):
        raise BasisCacheError(f"bases: {path} fails its integrity check (content hash mismatch)")
    if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
        raise BasisCacheError(f"bases: {path} belongs to other weights, selection or basis method")
    entries: dict[str, MatrixBasis] = {}
    for name, shape in json.loads(metadata["shapes"]).items():
        if f"{name}::w0" in tensors:
            w0 = tensors[f"{name}::w0"]
            entries[name] = _full_entry(w0, w0.dtype)
        else:
            entries[name] = MatrixBasis(
                tensors[f"{name}::u"], tensors[f"{name}::v"], tensors[f"{name}::sref"], tuple(shape)
            )
    return Bases(entries, metadata.get("method", "exact"), metadata.get("fingerprint", "")), json.loads(
        metadata["k"]
    )


def _cache_path(
    selection: dict[str, nn.Parameter],
    k: KSpec,
    cache_dir: str | os.PathLike,
    method: str,
    dtype: torch.dtype | None,
) -> tuple[str, Path]:
    """``(fingerprint, file)`` of the cached bases of ``selection``: the file is named by the fingerprint of
    (weights, selection, method, dtype), and a file computed at a larger k serves every smaller k (except for
    randomized bases, which depend on the k they were sketched at)."""
    extra = f"dtype={dtype}" + (f";k={k}" if method == "randomized" else "")
    fingerprint = weights_fingerprint(selection, method, extra=extra)
    return fingerprint, Path(cache_dir) / f"{fingerprint[:32]}.safetensors"


def full_rank_everywhere(selection: dict[str, nn.Parameter], k: KSpec) -> bool:
    """Whether ``k`` resolves to full rank on every selected matrix (bases are then ``W0`` itself)."""
    return all(resolve_k(k, tuple(w.shape)) == min(w.shape) for w in selection.values())


def _compute_and_save(
    selection: dict[str, nn.Parameter],
    k: KSpec,
    fingerprint: str,
    path: Path,
    method: str,
    dtype: torch.dtype | None,
    progress: bool,
) -> Bases:
    bases = compute_bases(selection, k, method=method, dtype=dtype, progress=progress)
    bases.fingerprint = fingerprint
    save_bases(bases, path, k)
    return bases


def _file_covers(path: Path, fingerprint: str, k: KSpec) -> bool:
    """Whether the bases file at ``path`` belongs to ``fingerprint`` and holds at least rank ``k`` for every
    matrix, read from its header and tensor shapes only (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                return False
            keys = set(handle.keys())
            for name, shape in json.loads(metadata["shapes"]).items():
                shape = (int(shape[0]), int(shape[1]))
                kk = resolve_k(k, shape)
                if f"{name}::w0" in keys:
                    if kk != min(shape):
                        return False
                elif kk == min(shape) or kk > handle.get_slice(f"{name}::v").get_shape()[1]:
                    return False
    except Exception:  # noqa: BLE001  # unreadable or truncated: not a usable cache file
        return False
    return True


def ensure_bases_file(
    selection: dict[str, nn.Parameter],
    k: KSpec,
    *,
    cache_dir: str | os.PathLike,
    method: str = "exact",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Path | None:
    """The cached bases file of :func:`load_or_compute_bases` that covers ``k``, computed and saved only when
    none does; the tensors of an existing file are not loaded (a sharded run reads its slices from it).
    ``None`` at full rank, which keeps ``W0`` and caches nothing."""
    if full_rank_everywhere(selection, k):
        return None
    fingerprint, path = _cache_path(selection, k, cache_dir, method, dtype)
    if path.exists() and _file_covers(path, fingerprint, k):
        return path
    _compute_and_save(selection, k, fingerprint, path, method, dtype, progress)
    return path


def load_or_compute_bases(
    selection: dict[str, nn.Parameter],
    k: KSpec,
    *,
    cache_dir: str | os.PathLike,
    method: str = "exact",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Bases:
    """Cached :func:`compute_bases`: reuse a stored file when it covers ``k`` (slicing it), else compute.

    The file name is the fingerprint of (weights, selection, method); a file computed at a larger k serves
    every smaller k. A corrupt file is recomputed.
    """
    if full_rank_everywhere(selection, k):
        # full rank keeps W0 itself: a copy, nothing worth caching (and a sweep's shared file stays intact)
        return compute_bases(selection, k, method=method, dtype=dtype, progress=progress)
    # Slicing is exact for exact/gram bases; randomized ones depend on the k they were sketched at.
    fingerprint, path = _cache_path(selection, k, cache_dir, method, dtype)
    if path.exists():
        try:
            stored, _ = load_bases(path, expected_fingerprint=fingerprint)
            if all(entry.covers(resolve_k(k, entry.shape)) for entry in stored.entries.values()):
                device = next(iter(selection.values())).device
                return stored.truncate(k).to(device).bind(selection)
        except BasisCacheError:
            pass
    return _compute_and_save(selection, k, fingerprint, path, method, dtype, progress)
