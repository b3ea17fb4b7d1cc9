"""A rank's rows of the protected bases under FSDP2 ``Shard(0)``: which rows it holds, and its slices of the
bases (in memory or read from the bases file), the layout :mod:`rpsft.core.sharded_penalty` and
:mod:`rpsft.core.sharded_lora_penalty` work on.

Rank ``i`` holds the rows ``R_i`` of each protected matrix ``W`` (the rows ``torch.chunk`` gives it, as FSDP2
does), the same rows of ``Uk`` (or of ``W0`` at full rank) and all of ``Vk`` and ``Sref``.
:func:`load_row_shard` reads a rank's slices straight from the bases file (``safe_open`` slices), so no rank
ever holds the full ``Uk`` of a sharded matrix. The file's integrity is checked once, where the bases are
computed (:func:`rpsft.core.bases.load_or_compute_bases`); this reader checks its fingerprint and shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from rpsft.core.bases import Bases, BasisCacheError, resolve_k
from torch import Tensor


def row_range(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the rows that rank ``rank`` of ``world_size`` holds under FSDP2 ``Shard(0)``
    (``torch.chunk`` along dim 0: chunks of ``ceil(rows / world_size)``, the last ones short or empty)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, {world_size}). Fix: 0 <= rank < world_size")
    chunk = -(-rows // world_size)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


@dataclass
class RowShardBasis:
    """One matrix's basis slices on one rank: ``u_rows = Uk[R_i]`` (rows x k), all of ``v`` (n x k) and
    ``sref`` (k x k); in full mode ``w0_rows = W0[R_i]`` and the others are empty.

    LoRA slices (``lora=True`` in :func:`shard_bases` and :func:`load_row_shard`) hold an empty ``sref`` and, in
    full mode, no ``w0_rows`` (``w0_omitted``): the LoRA penalty needs neither."""

    shape: tuple[int, int]
    rows: tuple[int, int]
    u_rows: Tensor
    v: Tensor
    sref: Tensor
    w0_rows: Tensor | None = None
    w0_omitted: bool = False

    @property
    def full(self) -> bool:
        return self.w0_rows is not None or self.w0_omitted

    @property
    def k(self) -> int:
        return min(self.shape) if self.full else self.v.shape[1]

    def nbytes(self) -> int:
        tensors = [self.u_rows, self.v, self.sref] + ([self.w0_rows] if self.w0_rows is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> RowShardBasis:
        move = lambda t: t.to(device)  # noqa: E731
        return RowShardBasis(
            self.shape,
            self.rows,
            move(self.u_rows),
            move(self.v),
            move(self.sref),
            None if self.w0_rows is None else move(self.w0_rows),
            self.w0_omitted,
        )


def lora_full_slice(shape: tuple[int, int], rows: tuple[int, int], like: Tensor) -> RowShardBasis:
    """A full-mode LoRA slice: no tensors at all (the penalty is ``||s B A||^2``)."""
    empty = like.new_zeros(0, 0)
    return RowShardBasis(shape, rows, empty, empty, empty, None, w0_omitted=True)


def shard_bases(bases: Bases, world_size: int, rank: int, *, lora: bool = False) -> dict[str, RowShardBasis]:
    """Rank ``rank``'s slices of in-memory bases (copies, so the full bases can be freed); ``lora``: slices for
    :class:`rpsft.core.sharded_lora_penalty.ShardedLoRAPenalty`, without ``W0`` rows and ``Sref``."""
    out: dict[str, RowShardBasis] = {}
    for name, entry in bases.entries.items():
        start, end = row_range(entry.shape[0], world_size, rank)
        if entry.full and lora:
            out[name] = lora_full_slice(entry.shape, (start, end), entry.w0)
        elif entry.full:
            w0 = entry.w0[start:end].clone()
            empty = w0.new_zeros(0, 0)
            out[name] = RowShardBasis(entry.shape, (start, end), empty, empty, empty, w0)
        else:
            sref = entry.sref.new_zeros(0, 0) if lora else entry.sref.clone()
            out[name] = RowShardBasis(
                entry.shape, (start, end), entry.u[start:end].clone(), entry.v.clone(), sref
            )
    return out


def load_row_shard(
    path: str | os.PathLike,
    world_size: int,
    rank: int,
    *,
    k: int | float | None = None,
    expected_fingerprint: str | None = None,
    lora: bool = False,
) -> dict[str, RowShardBasis]:
    """Rank ``rank``'s slices read from a bases file of :func:`rpsft.core.bases.save_bases`, truncated to
    ``k`` (an int or a rank fraction, resolved per matrix; ``None``: as stored). Only the rank's rows of
    ``Uk`` / ``W0`` are read; ``lora``: slices for :class:`rpsft.core.sharded_lora_penalty.ShardedLoRAPenalty`,
    and neither ``W0`` nor ``Sref`` is read."""
    from safetensors import safe_open

    try:
        handle_cm = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise BasisCacheError(f"bases: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    out: dict[str, RowShardBasis] = {}
    with handle_cm as handle:
        metadata = handle.metadata() or {}
        if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
            raise BasisCacheError(f"bases: {path} belongs to other weights, selection or basis method")
        keys = set(handle.keys())
        for name, shape in json.loads(metadata["shapes"]).items():
            shape = (int(shape[0]), int(shape[1]))
            start, end = row_range(shape[0], world_size, rank)
            if f"{name}::w0" in keys:
                if k is not None and resolve_k(k, shape) != min(shape):
                    raise ValueError(f"k: {name} is stored at full rank only. Fix: compute bases at k={k}")
                if lora:
                    out[name] = lora_full_slice(shape, (start, end), torch.zeros(0, 0))
                    continue
                w0 = handle.get_slice(f"{name}::w0")[start:end]
                empty = w0.new_zeros(0, 0)
                out[name] = RowShardBasis(shape, (start, end), empty, empty, empty, w0)
                continue
            stored_k = handle.get_slice(f"{name}::v").get_shape()[1]
            kk = stored_k if k is None else resolve_k(k, shape)
            if kk > stored_k or kk == min(shape):
                raise ValueError(
                    f"k: cannot slice {name} to k={kk}: the file holds k={stored_k}. "
                    "Fix: compute the bases at the largest k the run needs (full rank needs its own bases)"
                )
            v = handle.get_slice(f"{name}::v")[:, :kk]
            sref = v.new_zeros(0, 0) if lora else handle.get_slice(f"{name}::sref")[:kk, :kk]
            out[name] = RowShardBasis(
                shape, (start, end), handle.get_slice(f"{name}::u")[start:end, :kk], v, sref
            )
    return out


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that shares its storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor

