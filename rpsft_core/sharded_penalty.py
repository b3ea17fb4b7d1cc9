"""The RPSFT penalty on row-sharded weights (FSDP2 ``Shard(0)``), with no gather of any weight.

Rank ``i`` holds the rows ``R_i`` of each protected matrix ``W`` (the rows ``torch.chunk`` gives it, as FSDP2
does), the same rows of ``Uk`` and all of ``Vk``. Once per optimizer step:

* rank ``i`` forms the k x k partial product ``P_i = Uk[R_i]^T (W_i Vk)``;
* one all-reduce (every matrix's partial products in one flat buffer) gives ``S = sum_i P_i - Sref``, which is
  ``Uk^T W Vk - Sref``, and the penalty is ``lambda ||S||_F^2``;
* rank ``i`` adds ``2 lambda Uk[R_i] S Vk^T`` to its own gradient shard: exactly the rows ``R_i`` of the
  single-process gradient ``2 lambda Uk S Vk^T`` (:class:`rpsft.core.regularizer.RPSFTRegularizer`).

At full rank (``l2-init``) the local term is ``2 lambda (W_i - W0[R_i])``: no communication for the gradient;
the squared norms for the logged penalty and drift ride in the same buffer. ``k = 0`` entries add nothing.

``penalty_mode: decoupled`` (:meth:`ShardedRPSFTPenalty.prox_step_`, after ``optimizer.step()``): the same one
all-reduce gives ``S``, and rank ``i`` subtracts ``c Uk[R_i] S Vk^T`` from its own rows of ``W``
(``c = 2 eta lambda / (1 + 2 eta lambda)``; full rank: ``c (W_i - W0[R_i])``), the rows ``R_i`` of the
single-process proximal step.

RPSFT-LoRA (:class:`ShardedLoRAPenalty`) penalizes the adapter's update of the frozen weight:
``lambda ||M||_F^2`` with ``M = s X Y``, ``X = Uk^T B`` (k x r) and ``Y = A Vk`` (r x k), where ``lora_B``
(m x r) is sharded over its rows ``R_i`` (the rows of ``W``) and ``lora_A`` (r x n) over its ``r`` rows ``J_i``
(with ``r`` below the world size some ranks hold none). Rank ``i`` puts ``Uk[R_i]^T B_i`` and its rows
``A_i Vk`` of a zero r x k block into the flat buffer; after the one all-reduce every rank holds ``X`` and ``Y``
and adds ``2 lambda s Uk[R_i] (M Y^T)`` to its rows of ``B`` and ``2 lambda s (X^T M)[J_i] Vk^T`` to its rows
of ``A``, with no further communication. At full rank the penalty is
``lambda s^2 ||B A||_F^2 = lambda s^2 <B^T B, A A^T>``: the buffer carries the partial Grams ``B_i^T B_i``
(r x r) and the rows of ``A`` in a zero r x n block. Neither mode needs ``W0`` or ``Sref``.

:func:`load_row_shard` reads a rank's slices straight from the bases file (``safe_open`` slices), so no rank
ever holds the full ``Uk`` of a sharded matrix. The file's integrity is checked once, where the bases are
computed (:func:`rpsft.core.bases.load_or_compute_bases`); this reader checks its fingerprint and shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from rpsft.core.bases import Bases, BasisCacheError, resolve_k
from rpsft.core.regularizer import (
    PenaltyMode,
    _LoraParts,
    _update_,
    check_penalty_mode,
    find_lora_parts,
    prox_shrink,
)
from torch import Tensor, nn


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


def _lora_full_slice(shape: tuple[int, int], rows: tuple[int, int], like: Tensor) -> RowShardBasis:
    """A full-mode LoRA slice: no tensors at all (the penalty is ``||s B A||^2``)."""
    empty = like.new_zeros(0, 0)
    return RowShardBasis(shape, rows, empty, empty, empty, None, w0_omitted=True)


def shard_bases(bases: Bases, world_size: int, rank: int, *, lora: bool = False) -> dict[str, RowShardBasis]:
    """Rank ``rank``'s slices of in-memory bases (copies, so the full bases can be freed); ``lora``: slices for
    :class:`ShardedLoRAPenalty`, without ``W0`` rows and ``Sref``."""
    out: dict[str, RowShardBasis] = {}
    for name, entry in bases.entries.items():
        start, end = row_range(entry.shape[0], world_size, rank)
        if entry.full and lora:
            out[name] = _lora_full_slice(entry.shape, (start, end), entry.w0)
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
    ``Uk`` / ``W0`` are read; ``lora``: slices for :class:`ShardedLoRAPenalty`, and neither ``W0`` nor ``Sref``
    is read."""
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
                    out[name] = _lora_full_slice(shape, (start, end), torch.zeros(0, 0))
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


def _local_grad(param: Tensor) -> Tensor:
    """The local shard of ``param.grad``, created as zeros (with the parameter's sharding) when missing."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return local_tensor(param.grad)


def _check_rows(name: str, rows: int, shard: RowShardBasis) -> None:
    if rows != shard.rows[1] - shard.rows[0]:
        raise ValueError(
            f"bases: {name} holds {rows} local rows but its basis slice has rows {shard.rows}. "
            "Fix: load the slices with this rank's world size and rank"
        )


def _compute_dtype(tensors: Iterable[Tensor | None]) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


class _RowShardedPenalty:
    """What the row-sharded penalties share: the strength and period, the one flat all-reduce per step, the
    computation with autocast off, and the penalty value and drift read from the reduced squared norms.

    A subclass provides ``_device``, ``_squared`` (one all-reduce; the squared residual norm per matrix) and
    ``_apply_grad`` (the same, and the gradient added to the local gradient shards)."""

    lora_penalty = False

    def __init__(
        self, shards: dict[str, RowShardBasis], lam: float, period: int, group, mode: PenaltyMode = "loss"
    ) -> None:
        check_penalty_mode(mode, lora=self.lora_penalty)
        if lam < 0:
            raise ValueError(f"lam: lambda must be >= 0, got {lam}. Fix: use a non-negative strength")
        if period < 1:
            raise ValueError(f"period: must be >= 1, got {period}")
        self.shards = shards
        self.lam = float(lam)
        self.period = int(period)
        self.group = group
        self.mode = mode
        self._last_squared: dict[str, float] | None = None

    def applies_at(self, step: int) -> bool:
        return self.lam > 0 and len(self.shards) > 0 and step % self.period == 0

    def _all_reduce(self, buffer: Tensor) -> Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer

    def _reduce(self, pieces: list[Tensor]) -> Tensor:
        """All pieces, flattened into one buffer, summed over the ranks (one all-reduce)."""
        return self._all_reduce(torch.cat([piece.reshape(-1) for piece in pieces]))

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _full_precision(self):
        """Autocast off: the products run in float32 (float64 for float64 bases or weights)."""
        return torch.autocast(device_type=self._device().type, enabled=False)

    def _squared(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _apply_grad(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def penalty(self) -> float:
        """The penalty's value (one all-reduce; no gradient)."""
        return self.lam * float(sum(float(v) for v in self._squared().values()))

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
        squared = self._apply_grad()
        self._last_squared = {name: float(value) for name, value in squared.items()}
        return self.lam * sum(self._last_squared.values())

    def drift(self) -> dict[str, float]:
        """Protected-block drift per matrix at the current weights: one all-reduce, so every rank must call
        it."""
        return {name: float(value) ** 0.5 for name, value in self._squared().items()}

    def last_drift(self) -> dict[str, float]:
        """The drift as the last :meth:`add_grad_` measured it (before that step's update; no communication),
        the drift after the last ``prox_step_``, or :meth:`drift` before the first."""
        if self._last_squared is None:
            return self.drift()
        return {name: value**0.5 for name, value in self._last_squared.items()}


class ShardedRPSFTPenalty(_RowShardedPenalty):
    """``lambda * sum_l ||Uk^T W_l Vk - Sref_l||_F^2`` over row-sharded weights, applied by adding its
    gradient to each local gradient shard once per optimizer step (:meth:`add_grad_`).

    ``params`` maps basis names to the live parameters (FSDP2 DTensors, or plain tensors holding the rows
    ``shards[name].rows``). ``group`` is the process group the rows are sharded over (``None``: the default
    group; a single process needs no group at all). The drift is ``||Uk^T (W - W0) Vk||_F`` per matrix
    (``||W - W0||_F`` in full mode).
    """

    def __init__(
        self,
        shards: dict[str, RowShardBasis],
        params: dict[str, Tensor],
        lam: float,
        *,
        period: int = 1,
        group=None,
        mode: PenaltyMode = "loss",
    ) -> None:
        super().__init__(shards, lam, period, group, mode)
        missing = [name for name in shards if name not in params]
        if missing:
            raise KeyError(f"bases: parameters {missing[:3]} not found in the model")
        for name, shard in shards.items():
            if shard.w0_omitted or (not shard.full and tuple(shard.sref.shape) != (shard.k, shard.k)):
                raise ValueError(
                    f"bases: {name} holds LoRA slices (no Sref, no W0 rows). "
                    "Fix: load the slices with lora=False for the full-weight penalty"
                )
            _check_rows(name, local_tensor(params[name]).shape[0], shard)
        self.params = params

    def _device(self) -> torch.device:
        if not self.params:
            return torch.device("cpu")
        return local_tensor(next(iter(self.params.values()))).device

    @torch.no_grad()
    def residuals(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(S, squared)``: the reduced k x k blocks ``S = Uk^T W Vk - Sref`` of the projected matrices and
        every matrix's squared residual norm (full mode: ``||W - W0||^2``, summed over ranks). One
        all-reduce."""
        pieces: list[Tensor] = []
        layout: list[tuple[str, int]] = []
        full_names: list[str] = []
        dtype = _compute_dtype(t for s in self.shards.values() for t in (s.v, s.w0_rows))
        device = self._device()
        with self._full_precision():
            for name, shard in self.shards.items():
                weight = local_tensor(self.params[name])
                if shard.full:
                    full_names.append(name)
                    continue
                if shard.k == 0:
                    continue
                u = shard.u_rows.to(device)
                partial = u.transpose(0, 1) @ (weight.to(u.dtype) @ shard.v.to(device))
                pieces.append(partial.to(dtype))
                layout.append((name, shard.k))
            for name in full_names:
                shard = self.shards[name]
                diff = local_tensor(self.params[name]).to(dtype) - shard.w0_rows.to(device, dtype)
                pieces.append(diff.pow(2).sum().reshape(1))
        if not pieces:
            return {}, {name: torch.zeros((), dtype=dtype) for name in self.shards}
        buffer = self._reduce(pieces)
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

    def _squared(self) -> dict[str, Tensor]:
        return self.residuals()[1]

    def _apply_grad(self) -> dict[str, Tensor]:
        blocks, squared = self.residuals()
        scale = 2.0 * self.lam
        device = self._device()
        with self._full_precision():
            for name, shard in self.shards.items():
                param = self.params[name]
                grad = _local_grad(param)
                if shard.full:
                    weight = local_tensor(param)
                    grad.add_((weight - shard.w0_rows.to(device, weight.dtype)).to(grad.dtype), alpha=scale)
                elif name in blocks and grad.shape[0] > 0:
                    u = shard.u_rows.to(device)
                    ur = (u @ blocks[name].to(u.dtype)).to(grad.dtype)
                    grad.addmm_(ur, shard.v.to(device).transpose(0, 1).to(grad.dtype), alpha=scale)
        return squared

    def parameters(self) -> list[Tensor]:
        """The protected parameters (as the optimizer holds them)."""
        return list(self.params.values())

    @torch.no_grad()
    def prox_step_(self, lr: float, step: int | None = None) -> float | None:
        """The exact proximal step of the penalty at learning rate ``lr`` on this rank's rows (``penalty_mode:
        decoupled``; :meth:`rpsft.core.regularizer.RPSFTRegularizer.prox_step_`): call it on every rank right
        after ``optimizer.step()`` with the rate that step used. One all-reduce (of ``S``). Returns the penalty
        after the step (:meth:`last_drift`: the drift after it), or None when the period skips ``step``."""
        if step is not None and not self.applies_at(step):
            return None
        if self.lam == 0 or not self.shards:
            return 0.0
        shrink = prox_shrink(lr, self.lam)
        blocks, squared = self.residuals()
        device = self._device()
        with self._full_precision():
            for name, shard in self.shards.items():
                weight = local_tensor(self.params[name])
                if weight.shape[0] == 0:
                    continue
                if shard.full:
                    w0_dtype = torch.promote_types(shard.w0_rows.dtype, torch.float32)
                    dtype = torch.promote_types(weight.dtype, w0_dtype)
                    diff = weight.to(dtype) - shard.w0_rows.to(device, dtype)
                    _update_(weight, lambda w, d=diff: w.sub_(d, alpha=shrink), dtype)
                elif name in blocks:
                    block = blocks[name]
                    dtype = torch.promote_types(weight.dtype, block.dtype)
                    u = shard.u_rows.to(device, block.dtype)
                    ur = (u @ (block * shrink)).to(dtype)
                    vt = shard.v.to(device, dtype).transpose(0, 1)
                    _update_(weight, lambda w, ur=ur, vt=vt: w.addmm_(ur, vt, alpha=-1.0), dtype)
        keep = 1.0 - shrink
        self._last_squared = {name: float(value) * keep * keep for name, value in squared.items()}
        return self.lam * sum(self._last_squared.values())


# ------------------------------------------------------------------------------------------- RPSFT-LoRA


class _PlainModuleNames:
    """A model's ``named_modules`` with activation checkpointing's wrapper prefix removed from the names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

        for name, module in self.model.named_modules():
            yield name.replace(_CHECKPOINT_PREFIX, ""), module


def find_sharded_lora_parts(model: nn.Module, names: list[str]) -> dict[str, _LoraParts]:
    """:func:`rpsft.core.regularizer.find_lora_parts` on a PEFT model sharded by
    :func:`rpsft.core.fsdp.shard_model` (activation-checkpointed blocks included): basis names
    (``...q_proj.weight``) to the sharded ``lora_A`` / ``lora_B`` parameters and the scaling of the active
    adapter. Call it after sharding and outside a forward pass, when the modules hold the sharded parameters."""
    return find_lora_parts(_PlainModuleNames(model), names)  # type: ignore[arg-type]


def _world(group, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class ShardedLoRAPenalty(_RowShardedPenalty):
    """RPSFT-LoRA on row-sharded adapters: ``lambda * sum_l ||s_l (Uk^T B_l)(A_l Vk)||_F^2``
    (``lambda s^2 ||B A||_F^2`` at full rank), the penalty of
    :class:`rpsft.core.regularizer.RPSFTRegularizer` with ``lora=``, applied by adding its gradient to the
    local gradient shards of ``lora_A`` and ``lora_B`` once per optimizer step (:meth:`add_grad_`).

    ``lora`` maps basis names to the adapters (:func:`find_sharded_lora_parts`; ``a`` r x n and ``b`` m x r as
    FSDP2 DTensors, or plain tensors holding this rank's ``torch.chunk`` rows). ``rank`` and ``world_size``
    place the rows of ``A`` (default: those of ``group``, or 0 of 1 without a process group). The drift is
    ``||Uk^T (W_eff - W0) Vk||_F = ||M||_F`` per matrix (``s ||B A||_F`` in full mode). Only ``mode="loss"``.
    """

    lora_penalty = True

    def __init__(
        self,
        shards: dict[str, RowShardBasis],
        lora: dict[str, _LoraParts],
        lam: float,
        *,
        period: int = 1,
        group=None,
        rank: int | None = None,
        world_size: int | None = None,
        mode: PenaltyMode = "loss",
    ) -> None:
        super().__init__(shards, lam, period, group, mode)
        missing = [name for name in shards if name not in lora]
        if missing:
            raise KeyError(
                f"layers: no LoRA adapter wraps {missing[:3]}. Fix: target the same modules with LoRA"
            )
        rank, world_size = _world(group, rank, world_size)
        self.a_rows: dict[str, tuple[int, int]] = {}
        for name, shard in shards.items():
            a, b = local_tensor(lora[name].a), local_tensor(lora[name].b)
            _check_rows(name, b.shape[0], shard)
            r = b.shape[1]
            start, end = row_range(r, world_size, rank)
            if tuple(a.shape) != (end - start, shard.shape[1]):
                raise ValueError(
                    f"lora: {name}'s lora_A holds {tuple(a.shape)} locally, but rank {rank} of {world_size} holds "
                    f"rows [{start}, {end}) of {r} x {shard.shape[1]}. Fix: shard the adapters over the same "
                    "ranks as the bases (rank and world_size of the group)"
                )
            self.a_rows[name] = (start, end)
        self.lora = lora

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        shards: dict[str, RowShardBasis],
        lam: float,
        *,
        period: int = 1,
        group=None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> ShardedLoRAPenalty:
        """The penalty on the adapters of a sharded PEFT model that wrap the matrices of ``shards``."""
        return cls(
            shards,
            find_sharded_lora_parts(model, list(shards)),
            lam,
            period=period,
            group=group,
            rank=rank,
            world_size=world_size,
        )

    def _device(self) -> torch.device:
        if not self.lora:
            return torch.device("cpu")
        return local_tensor(next(iter(self.lora.values())).a).device

    def _dtype(self) -> torch.dtype:
        return _compute_dtype(
            t for name, shard in self.shards.items() for t in (shard.v, self.lora[name].a, self.lora[name].b)
        )

    @torch.no_grad()
    def _factors(self) -> tuple[dict[str, tuple[Tensor, ...]], dict[str, Tensor]]:
        """``(factors, squared)`` from one all-reduce: per projected matrix ``(X, Y, M)``, per full-mode
        matrix ``(B^T B, A, A A^T)``, and every matrix's squared drift."""
        device, dtype = self._device(), self._dtype()
        pieces: list[Tensor] = []
        layout: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
        with self._full_precision():
            for name, shard in self.shards.items():
                if not shard.full and shard.k == 0:
                    continue
                b = local_tensor(self.lora[name].b).to(dtype)
                a = local_tensor(self.lora[name].a).to(dtype)
                r, (start, end) = b.shape[1], self.a_rows[name]
                if shard.full:
                    rows_of_a = a.new_zeros(r, shard.shape[1])
                    rows_of_a[start:end] = a
                    pieces += [b.transpose(0, 1) @ b, rows_of_a]
                    layout.append((name, (r, r), (r, shard.shape[1])))
                else:
                    u, v = shard.u_rows.to(device, dtype), shard.v.to(device, dtype)
                    y = a.new_zeros(r, shard.k)
                    y[start:end] = a @ v
                    pieces += [u.transpose(0, 1) @ b, y]
                    layout.append((name, (shard.k, r), (r, shard.k)))
            factors: dict[str, tuple[Tensor, ...]] = {}
            squared: dict[str, Tensor] = {}
            if pieces:
                buffer = self._reduce(pieces)
                offset = 0
                for name, first, second in layout:
                    size = first[0] * first[1]
                    left = buffer[offset : offset + size].reshape(first)
                    right = buffer[offset + size : offset + size + second[0] * second[1]].reshape(second)
                    offset += size + second[0] * second[1]
                    s = self.lora[name].scaling
                    if self.shards[name].full:
                        gram_a = right @ right.transpose(0, 1)
                        factors[name] = (left, right, gram_a)
                        squared[name] = (s * s * (left * gram_a).sum()).clamp(min=0)
                    else:
                        m = s * (left @ right)
                        factors[name] = (left, right, m)
                        squared[name] = m.pow(2).sum()
        for name in self.shards:
            squared.setdefault(name, torch.zeros((), dtype=dtype, device=device))
        return factors, squared

    @torch.no_grad()
    def residuals(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(M, squared)``: the reduced k x k blocks ``M = s (Uk^T B)(A Vk)`` of the projected matrices and
        every matrix's squared drift (full mode: ``s^2 ||B A||^2``). One all-reduce."""
        factors, squared = self._factors()
        return {n: f[2] for n, f in factors.items() if not self.shards[n].full}, squared

    def _squared(self) -> dict[str, Tensor]:
        return self._factors()[1]

    def _apply_grad(self) -> dict[str, Tensor]:
        factors, squared = self._factors()
        device = self._device()
        with self._full_precision():
            for name, parts in self.lora.items():
                if name not in factors:
                    continue
                shard, s = self.shards[name], parts.scaling
                grad_b, grad_a = _local_grad(parts.b), _local_grad(parts.a)
                start, end = self.a_rows[name]
                if shard.full:
                    # d/dB = 2 lam s^2 B (A A^T);  d/dA = 2 lam s^2 (B^T B) A
                    gram_b, a_full, gram_a = factors[name]
                    scale = 2.0 * self.lam * s * s
                    if grad_b.shape[0] > 0:
                        b = local_tensor(parts.b).to(gram_a.dtype)
                        grad_b.add_((b @ gram_a).to(grad_b.dtype), alpha=scale)
                    if end > start:
                        grad_a.add_((gram_b[start:end] @ a_full).to(grad_a.dtype), alpha=scale)
                    continue
                # d/dB = 2 lam s U (M Y^T);  d/dA = 2 lam s (X^T M) V^T
                x, y, m = factors[name]
                scale = 2.0 * self.lam * s
                if grad_b.shape[0] > 0:
                    u = shard.u_rows.to(device, m.dtype)
                    grad_b.add_((u @ (m @ y.transpose(0, 1))).to(grad_b.dtype), alpha=scale)
                if end > start:
                    v = shard.v.to(device, m.dtype)
                    grad_a.add_(
                        ((x[:, start:end].transpose(0, 1) @ m) @ v.transpose(0, 1)).to(grad_a.dtype),
                        alpha=scale,
                    )
        return squared
