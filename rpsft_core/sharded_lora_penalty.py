"""RPSFT-LoRA on row-sharded adapters (FSDP2 ``Shard(0)``), with no gather of any weight.

:class:`ShardedLoRAPenalty` penalizes the adapter's update of the frozen weight:
``lambda ||M||_F^2`` with ``M = s X Y``, ``X = Uk^T B`` (k x r) and ``Y = A Vk`` (r x k), where ``lora_B``
(m x r) is sharded over its rows ``R_i`` (the rows of ``W``) and ``lora_A`` (r x n) over its ``r`` rows ``J_i``
(with ``r`` below the world size some ranks hold none). Rank ``i`` puts ``Uk[R_i]^T B_i`` and its rows
``A_i Vk`` of a zero r x k block into the flat buffer; after the one all-reduce every rank holds ``X`` and ``Y``
and adds ``2 lambda s Uk[R_i] (M Y^T)`` to its rows of ``B`` and ``2 lambda s (X^T M)[J_i] Vk^T`` to its rows
of ``A``, with no further communication. At full rank the penalty is
``lambda s^2 ||B A||_F^2 = lambda s^2 <B^T B, A A^T>``: the buffer carries the partial Grams ``B_i^T B_i``
(r x r) and the rows of ``A`` in a zero r x n block. Neither mode needs ``W0`` or ``Sref``.

The slices are a rank's rows of ``Uk`` and all of ``Vk`` (:mod:`rpsft.core.row_shards`, loaded with
``lora=True``); the one all-reduce per step and the penalty's bookkeeping are
:class:`rpsft.core.sharded_penalty.RowShardedPenalty`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from rpsft.core.distributed import world
from rpsft.core.regularizer import PenaltyMode, _LoraParts, find_lora_parts
from rpsft.core.row_shards import RowShardBasis, local_tensor, row_range
from rpsft.core.sharded_penalty import RowShardedPenalty, check_rows, compute_dtype, local_grad
from torch import Tensor, nn


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


class ShardedLoRAPenalty(RowShardedPenalty):
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
        if rank is None or world_size is None:
            rank, world_size = world(group)
        self.a_rows: dict[str, tuple[int, int]] = {}
        for name, shard in shards.items():
            a, b = local_tensor(lora[name].a), local_tensor(lora[name].b)
            check_rows(name, b.shape[0], shard)
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
        return compute_dtype(
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
                grad_b, grad_a = local_grad(parts.b), local_grad(parts.a)
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
