"""The RPSFT penalty on row-sharded weights (FSDP2 ``Shard(0)``), with no gather of any weight.

Rank ``i`` holds the rows ``R_i`` of each protected matrix ``W`` (the rows ``torch.chunk`` gives it, as FSDP2
does), the same rows of ``Uk`` and all of ``Vk``. Once per optimizer step:

* rank ``i`` forms the k x k partial product ``P_i = Uk[R_i]^T (W_i Vk)``;
* one all-reduce (every matrix's partial products in one flat buffer) gives ``S = sum_i P_i - Sref``, which is
  ``Uk^T W Vk - Sref``, and the penalty is ``lambda ||S||_F^2``;
* rank ``i`` adds ``2 lambda Uk[R_i] S Vk^T`` to its own gradient shard: exactly the rows ``R_i`` of the
  single-process gradient ``2 lambda Uk S Vk^T`` (:class:`rpsft_core.regularizer.RPSFTRegularizer`).

At full rank (``l2-init``) the local term is ``2 lambda (W_i - W0[R_i])``: no communication for the gradient;
the squared norms for the logged penalty and drift ride in the same buffer. ``k = 0`` entries add nothing.

:func:`load_row_shard` reads a rank's slices straight from the bases file (``safe_open`` slices), so no rank
ever holds the full ``Uk`` of a sharded matrix. The file's integrity is checked once, where the bases are
computed (:func:`rpsft_core.bases.load_or_compute_bases`); this reader checks its fingerprint and shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from rpsft_core.bases import Bases, BasisCacheError, resolve_k


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
    ``sref`` (k x k); in full mode ``w0_rows = W0[R_i]`` and the others are empty."""

    shape: tuple[int, int]
    rows: tuple[int, int]
    u_rows: Tensor
    v: Tensor
    sref: Tensor
    w0_rows: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.w0_rows is not None

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
        )


def shard_bases(bases: Bases, world_size: int, rank: int) -> dict[str, RowShardBasis]:
    """Rank ``rank``'s slices of in-memory bases (copies, so the full bases can be freed)."""
    out: dict[str, RowShardBasis] = {}
    for name, entry in bases.entries.items():
        start, end = row_range(entry.shape[0], world_size, rank)
        if entry.full:
            w0 = entry.w0[start:end].clone()
            empty = w0.new_zeros(0, 0)
            out[name] = RowShardBasis(entry.shape, (start, end), empty, empty, empty, w0)
        else:
            out[name] = RowShardBasis(
                entry.shape, (start, end), entry.u[start:end].clone(), entry.v.clone(), entry.sref.clone()
            )
    return out


def load_row_shard(
    path: str | os.PathLike,
    world_size: int,
    rank: int,
    *,
    k: int | float | None = None,
    expected_fingerprint: str | None = None,
) -> dict[str, RowShardBasis]:
    """Rank ``rank``'s slices read from a bases file of :func:`rpsft_core.bases.save_bases`, truncated to
    ``k`` (an int or a rank fraction, resolved per matrix; ``None``: as stored). Only the rank's rows of
    ``Uk`` / ``W0`` are read."""
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
            out[name] = RowShardBasis(
                shape,
                (start, end),
                handle.get_slice(f"{name}::u")[start:end, :kk],
                handle.get_slice(f"{name}::v")[:, :kk],
                handle.get_slice(f"{name}::sref")[:kk, :kk],
            )
    return out


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that shares its storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class ShardedRPSFTPenalty:
    """``lambda * sum_l ||Uk^T W_l Vk - Sref_l||_F^2`` over row-sharded weights, applied by adding its
    gradient to each local gradient shard once per optimizer step (:meth:`add_grad_`).

    ``params`` maps basis names to the live parameters (FSDP2 DTensors, or plain tensors holding the rows
    ``shards[name].rows``). ``group`` is the process group the rows are sharded over (``None``: the default
    group; a single process needs no group at all).
    """

    def __init__(
        self,
        shards: dict[str, RowShardBasis],
        params: dict[str, Tensor],
        lam: float,
        *,
        period: int = 1,
        group=None,
    ) -> None:
        if lam < 0:
            raise ValueError(f"lam: lambda must be >= 0, got {lam}. Fix: use a non-negative strength")
        if period < 1:
            raise ValueError(f"period: must be >= 1, got {period}")
        missing = [name for name in shards if name not in params]
        if missing:
            raise KeyError(f"bases: parameters {missing[:3]} not found in the model")
        for name, shard in shards.items():
            rows = local_tensor(params[name]).shape[0]
            if rows != shard.rows[1] - shard.rows[0]:
                raise ValueError(
                    f"bases: {name} holds {rows} local rows but its basis slice has rows {shard.rows}. "
                    "Fix: load the slices with this rank's world size and rank"
                )
        self.shards = shards
        self.params = params
        self.lam = float(lam)
        self.period = int(period)
        self.group = group
        self._last_squared: dict[str, float] | None = None

    def applies_at(self, step: int) -> bool:
        return self.lam > 0 and len(self.shards) > 0 and step % self.period == 0

    def _all_reduce(self, buffer: Tensor) -> Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer

    def _device(self) -> torch.device:
        return local_tensor(next(iter(self.params.values()))).device

    @torch.no_grad()
    def residuals(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(S, squared)``: the reduced k x k blocks ``S = Uk^T W Vk - Sref`` of the projected matrices and
        every matrix's squared residual norm (full mode: ``||W - W0||^2``, summed over ranks). One
        all-reduce."""
        pieces: list[Tensor] = []
        layout: list[tuple[str, int]] = []
        full_names: list[str] = []
        dtype = (
            torch.float64
            if any(
                s.v.dtype == torch.float64 or (s.w0_rows is not None and s.w0_rows.dtype == torch.float64)
                for s in self.shards.values()
            )
            else torch.float32
        )
        device = self._device()
        with torch.autocast(device_type=device.type, enabled=False):
            for name, shard in self.shards.items():
                weight = local_tensor(self.params[name])
                if shard.full:
                    full_names.append(name)
                    continue
                if shard.k == 0:
                    continue
                u = shard.u_rows.to(device)
                partial = u.transpose(0, 1) @ (weight.to(u.dtype) @ shard.v.to(device))
                pieces.append(partial.reshape(-1).to(dtype))
                layout.append((name, shard.k))
            for name in full_names:
                shard = self.shards[name]
                diff = local_tensor(self.params[name]).to(dtype) - shard.w0_rows.to(device, dtype)
                pieces.append(diff.pow(2).sum().reshape(1))
        if not pieces:
            return {}, {name: torch.zeros((), dtype=dtype) for name in self.shards}
        buffer = self._all_reduce(torch.cat(pieces))
        blocks: dict[str, Tensor] = {}
        squared: dict[str, Tensor] = {}
        offset = 0
        for name, k in layout:
            shard = self.shards[name]
            block = buffer[offset : offset + k * k].reshape(k, k) - shard.sref.to(device, dtype)
            blocks[name] = block
            squared[name] = block.pow(2).sum()
            offset += k * k
        for name in full_names:
            squared[name] = buffer[offset]
            offset += 1
        for name in self.shards:
            squared.setdefault(name, torch.zeros((), dtype=dtype, device=device))
        return blocks, squared

    def penalty(self) -> float:
        """The penalty's value (one all-reduce; no gradient)."""
        _, squared = self.residuals()
        return self.lam * float(sum(float(v) for v in squared.values()))

    @torch.no_grad()
    def add_grad_(self, step: int | None = None) -> float | None:
        """Add the closed-form gradient to each local gradient shard in place; return the penalty value.

        Call after the backward passes (FSDP2's reduce-scatter has filled the gradient shards) and before
        clipping and ``optimizer.step()``. Returns None (and does nothing) when the period skips ``step``.
        """
        if step is not None and not self.applies_at(step):
            return None
        if self.lam == 0 or not self.shards:
            return 0.0
        blocks, squared = self.residuals()
        scale = 2.0 * self.lam
        device = self._device()
        with torch.autocast(device_type=device.type, enabled=False):
            for name, shard in self.shards.items():
                param = self.params[name]
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grad = local_tensor(param.grad)
                if shard.full:
                    weight = local_tensor(param)
                    grad.add_((weight - shard.w0_rows.to(device, weight.dtype)).to(grad.dtype), alpha=scale)
                elif name in blocks and grad.shape[0] > 0:
                    u = shard.u_rows.to(device)
                    ur = (u @ blocks[name].to(u.dtype)).to(grad.dtype)
                    grad.addmm_(ur, shard.v.to(device).transpose(0, 1).to(grad.dtype), alpha=scale)
        self._last_squared = {name: float(value) for name, value in squared.items()}
        return self.lam * sum(self._last_squared.values())

    def drift(self) -> dict[str, float]:
        """Protected-block drift ``||Uk^T (W - W0) Vk||_F`` per matrix (``||W - W0||_F`` in full mode) at the
        current weights: one all-reduce, so every rank must call it."""
        _, squared = self.residuals()
        return {name: float(value) ** 0.5 for name, value in squared.items()}

    def last_drift(self) -> dict[str, float]:
        """The drift as the last :meth:`add_grad_` measured it (before that step's update; no communication),
        or :meth:`drift` before the first."""
        if self._last_squared is None:
            return self.drift()
        return {name: value**0.5 for name, value in self._last_squared.items()}
