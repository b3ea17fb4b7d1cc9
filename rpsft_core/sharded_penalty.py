"""The RPSFT penalty on row-sharded weights (FSDP2 ``Shard(0)``), with no gather of any weight.

Rank ``i`` holds the rows ``R_i`` of each protected matrix ``W`` and its slices of the bases
(:mod:`rpsft.core.row_shards`). Once per optimizer step:

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

:class:`RowShardedPenalty` is what this penalty and the RPSFT-LoRA one
(:class:`rpsft.core.sharded_lora_penalty.ShardedLoRAPenalty`) share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rpsft.core.distributed import all_reduce_sum
from rpsft.core.regularizer import PenaltyMode, _update_, check_penalty_mode, prox_shrink
from rpsft.core.row_shards import RowShardBasis, local_tensor
from torch import Tensor


def local_grad(param: Tensor) -> Tensor:
    """The local shard of ``param.grad``, created as zeros (with the parameter's sharding) when missing."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return local_tensor(param.grad)


def check_rows(name: str, rows: int, shard: RowShardBasis) -> None:
    if rows != shard.rows[1] - shard.rows[0]:
        raise ValueError(
            f"bases: {name} holds {rows} local rows but its basis slice has rows {shard.rows}. "
            "Fix: load the slices with this rank's world size and rank"
        )


def compute_dtype(tensors: Iterable[Tensor | None]) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


class RowShardedPenalty:
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
        """``buffer`` summed over the ranks of the penalty's group, in place."""
        return all_reduce_sum(buffer, self.group)

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


class ShardedRPSFTPenalty(RowShardedPenalty):
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
            check_rows(name, local_tensor(params[name]).shape[0], shard)
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
        dtype = compute_dtype(t for s in self.shards.values() for t in (s.v, s.w0_rows))
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
                grad = local_grad(param)
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

