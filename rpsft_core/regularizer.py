"""The RPSFT penalty ``lambda * sum_l ||Uk^T W_l Vk - Sref_l||_F^2`` and its closed-form gradient.

Two equivalent ways to apply it:

* :meth:`RPSFTRegularizer.add_grad_` (the fast path): after the backward passes of all micro-batches of an
  optimizer step, add ``2 lambda Uk (Uk^T W Vk - Sref) Vk^T`` to each ``W.grad`` in place. No autograd graph,
  no per-micro-batch cost, no m x n temporary (one ``addmm_`` into the gradient). The order within an optimizer
  step is: micro-batch backward passes -> ``add_grad_`` -> gradient clipping -> ``optimizer.step()``.
* :meth:`RPSFTRegularizer.penalty` (the reference path): a differentiable scalar to add to the loss.

With gradient accumulation the task loss is averaged over micro-batches, so adding ``penalty()`` to every
micro-batch loss (each scaled by ``1/accumulation``) and applying ``add_grad_`` once per step give the same
update.

For a PEFT LoRA module the penalty applies to the effective weight ``W0 + s B A`` (RPSFT-LoRA): its residual is
``s (Uk^T B)(A Vk)`` and the gradients flow to ``A`` and ``B`` only.

``mode="decoupled"`` (``penalty_mode: decoupled``) applies the penalty outside the gradient instead:
:meth:`RPSFTRegularizer.prox_step_` runs right after ``optimizer.step()`` and takes the exact proximal step of
``lambda R_k`` at that step's learning rate ``eta``, ``W <- W - c Uk S Vk^T`` with ``S = Uk^T (W - W0) Vk`` and
``c = 2 eta lambda / (1 + 2 eta lambda)`` (full rank: ``W <- W - c (W - W0)``). No penalty gradient reaches
``.grad``, the clipping or the optimizer's moments. Not defined for RPSFT-LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rpsft.core.bases import Bases, MatrixBasis, project_block
from rpsft.core.method_table import PENALTY_MODES, PenaltyMode
from torch import Tensor, nn


@dataclass
class _LoraParts:
    a: nn.Parameter  # r x n
    b: nn.Parameter  # m x r
    scaling: float


def _lora_parts(module: nn.Module) -> _LoraParts | None:
    """The active adapter of a PEFT LoRA layer, or None for a plain module."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not lora_a:
        return None
    adapter = module.active_adapters[0] if hasattr(module, "active_adapters") else next(iter(lora_a))
    return _LoraParts(lora_a[adapter].weight, lora_b[adapter].weight, float(module.scaling[adapter]))


def find_lora_parts(model: nn.Module, names: list[str]) -> dict[str, _LoraParts]:
    """Map basis names (``...q_proj.weight``) to the LoRA adapters wrapping those modules in a PEFT model."""
    wanted = {name.removesuffix(".weight"): name for name in names}
    found: dict[str, _LoraParts] = {}
    for module_name, module in model.named_modules():
        parts = _lora_parts(module)
        if parts is None:
            continue
        for short, full in wanted.items():
            if module_name == short or module_name.endswith("." + short):
                found[full] = parts
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"layers: no LoRA adapter wraps {missing[:3]}. Fix: target the same modules with LoRA")
    return found


def check_penalty_mode(mode: str, *, lora: bool) -> str:
    """``mode`` if the penalty can be applied that way (a ValueError naming ``penalty_mode`` otherwise)."""
    if mode not in PENALTY_MODES:
        raise ValueError(f"penalty_mode: unknown {mode!r}. Fix: one of {', '.join(PENALTY_MODES)}")
    if mode == "decoupled" and lora:
        raise ValueError(
            "penalty_mode: decoupled is not defined for RPSFT-LoRA (the penalty acts on the adapters' product "
            "s B A, which has no exact proximal step). Fix: penalty_mode: loss, or method: rpsft"
        )
    return mode


def prox_shrink(lr: float, lam: float) -> float:
    """``c = 2 eta lambda / (1 + 2 eta lambda)``: the fraction of the protected block one proximal step of
    ``lambda ||.||_F^2`` at learning rate ``eta`` removes (``1 - c`` of it stays)."""
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr: the proximal step needs a finite learning rate >= 0, got {lr}")
    return 2.0 * lr * lam / (1.0 + 2.0 * lr * lam)


def step_learning_rate(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> float:
    """The learning rate ``optimizer`` holds for ``params`` (the protected matrices): read it between
    ``optimizer.step()`` and ``scheduler.step()`` for the rate that step used. A ValueError when the matrices are
    not in the optimizer, or sit in parameter groups with different rates."""
    wanted = {id(p) for p in params}
    rates = {float(g["lr"]) for g in optimizer.param_groups if any(id(p) in wanted for p in g["params"])}
    if len(rates) != 1:
        found = f"their groups have rates {sorted(rates)}" if rates else "none of them is in the optimizer"
        raise ValueError(
            f"penalty_mode: decoupled needs the one learning rate of the protected matrices, but {found}. "
            "Fix: one learning rate for the protected matrices, or penalty_mode: loss"
        )
    return rates.pop()


def _update_(weight: Tensor, update, dtype: torch.dtype) -> None:
    """``update(w)`` in place on ``weight`` computed in ``dtype``: directly when ``weight`` has that dtype, else
    on a ``dtype`` copy rounded back once (a bf16/fp16 weight under float32 bases)."""
    if weight.dtype == dtype:
        update(weight)
    else:
        weight.copy_(update(weight.to(dtype)))


def _squared_norm(tensor: Tensor) -> Tensor:
    """``||tensor||_F^2`` accumulated in at least float32 (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32)).pow(2).sum()


class RPSFTRegularizer:
    """Rotation-preserving penalty over bound bases.

    ``bases`` must be bound to the live parameters (``compute_bases`` does this; use ``bases.bind(model)``
    after loading from disk). For RPSFT-LoRA pass ``lora=find_lora_parts(peft_model, list(bases.entries))``.
    ``period`` applies the gradient every ``period`` optimizer steps (as in the reference implementation, it is
    not rescaled). ``mode`` says how the training loop applies it: ``"loss"`` (:meth:`add_grad_` before
    clipping) or ``"decoupled"`` (:meth:`prox_step_` after ``optimizer.step()``, on the same steps).
    """

    def __init__(
        self,
        bases: Bases,
        lam: float,
        *,
        period: int = 1,
        lora: dict[str, _LoraParts] | None = None,
        mode: PenaltyMode = "loss",
    ) -> None:
        check_penalty_mode(mode, lora=lora is not None)
        if lam < 0:
            raise ValueError(f"lam: lambda must be >= 0, got {lam}. Fix: use a non-negative strength")
        if period < 1:
            raise ValueError(f"period: must be >= 1, got {period}")
        if bases.params is None and lora is None:
            raise ValueError(
                "bases: not bound to parameters. Fix: bases.bind(model) before building the regularizer"
            )
        self.bases = bases
        self.lam = float(lam)
        self.period = int(period)
        self.lora = lora
        self.mode = mode
        self.last_step_applied: int | None = None
        self._last_residual_norms: Tensor | None = None

    @property
    def names(self) -> list[str]:
        return list(self.bases.entries)

    def _sync_device(self) -> None:
        """Follow the parameters when the model was moved (e.g. to CUDA by the Trainer) after the bases were built."""
        if not self.bases.entries:
            return
        device = self._device()
        entry = next(iter(self.bases.entries.values()))
        if (entry.w0 if entry.full else entry.u).device != device:
            self.bases.to(device)

    def applies_at(self, step: int) -> bool:
        return self.lam > 0 and len(self.bases) > 0 and step % self.period == 0

    # ----------------------------------------------------------------------------------- residuals

    def _residual(self, name: str, entry: MatrixBasis) -> Tensor:
        """``Uk^T W Vk - Sref`` (k x k), or ``W - W0`` in full mode; differentiable."""
        if self.lora is not None:
            parts = self.lora[name]
            if entry.full:
                return parts.scaling * (parts.b @ parts.a)
            return parts.scaling * (
                (entry.u.transpose(0, 1) @ parts.b.to(entry.u.dtype)) @ (parts.a.to(entry.u.dtype) @ entry.v)
            )
        weight = self.bases.params[name]
        if entry.full:
            return weight - entry.w0
        return project_block(weight, entry.u, entry.v) - entry.sref

    def _full_precision(self):
        """Autocast off: the projections run in the bases' dtype, as ``Sref`` was built, so the penalty is
        exactly 0 at the pretrained weights also inside a bf16/fp16 autocast region."""
        return torch.autocast(device_type=self._device().type, enabled=False)

    def _device(self) -> torch.device:
        if self.lora is not None and self.lora:
            return next(iter(self.lora.values())).a.device
        if self.bases.params:
            return next(iter(self.bases.params.values())).device
        return torch.device("cpu")

    def penalty(self) -> Tensor:
        """``lambda * sum_l R_k(W_l)`` as a differentiable scalar (reference path, builds an autograd graph)."""
        with self._full_precision():
            return self._penalty()

    def _penalty(self) -> Tensor:
        self._sync_device()
        total = None
        for name, entry in self.bases.entries.items():
            term = _squared_norm(self._residual(name, entry))
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total

    # ----------------------------------------------------------------------------------- fast path

    @torch.no_grad()
    def add_grad_(self, step: int | None = None) -> float | None:
        """Add the closed-form penalty gradient to ``.grad`` in place; return the penalty value.

        Returns None (and does nothing) when ``step`` is given and the period skips it.
        """
        if step is not None and not self.applies_at(step):
            return None
        if self.lam == 0 or len(self.bases) == 0:
            return 0.0
        with self._full_precision():
            return self._add_grad(step)

    def _add_grad(self, step: int | None) -> float:
        self._sync_device()
        scale = 2.0 * self.lam
        norms = []
        for name, entry in self.bases.entries.items():
            residual = self._residual(name, entry)
            norms.append(_squared_norm(residual))
            if entry.k == 0:
                continue
            if self.lora is not None:
                self._add_lora_grad(self.lora[name], entry, residual, scale)
                continue
            weight = self.bases.params[name]
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            if entry.full:
                weight.grad.add_(residual.to(weight.grad.dtype), alpha=scale)
            else:
                ur = (entry.u @ residual).to(weight.grad.dtype)
                weight.grad.addmm_(ur, entry.v.transpose(0, 1).to(weight.grad.dtype), alpha=scale)
        squared = torch.stack(norms)
        self._last_residual_norms = squared.sqrt()
        self.last_step_applied = step
        return float(self.lam * squared.sum())

    @staticmethod
    def _add_lora_grad(parts: _LoraParts, entry: MatrixBasis, residual: Tensor, scale: float) -> None:
        # dR/dW_eff = 2 lam U E V^T;  dB = s * dW_eff A^T;  dA = s * B^T dW_eff
        s = parts.scaling
        if parts.a.grad is None:
            parts.a.grad = torch.zeros_like(parts.a)
        if parts.b.grad is None:
            parts.b.grad = torch.zeros_like(parts.b)
        if entry.full:
            grad_w = scale * residual
            parts.b.grad.add_((s * grad_w @ parts.a.transpose(0, 1)).to(parts.b.grad.dtype))
            parts.a.grad.add_((s * parts.b.transpose(0, 1) @ grad_w).to(parts.a.grad.dtype))
            return
        u, v = entry.u, entry.v
        av = parts.a.to(u.dtype) @ v  # r x k
        utb = u.transpose(0, 1) @ parts.b.to(u.dtype)  # k x r
        parts.b.grad.add_((scale * s * (u @ (residual @ av.transpose(0, 1)))).to(parts.b.grad.dtype))
        parts.a.grad.add_(
            (scale * s * ((utb.transpose(0, 1) @ residual) @ v.transpose(0, 1))).to(parts.a.grad.dtype)
        )

    # ----------------------------------------------------------------------------------- decoupled

    def parameters(self) -> list[Tensor]:
        """The protected parameters (the LoRA adapters' ``A`` and ``B`` for RPSFT-LoRA)."""
        if self.lora is not None:
            return [t for parts in self.lora.values() for t in (parts.a, parts.b)]
        return list(self.bases.params.values()) if self.bases.params else []

    @torch.no_grad()
    def prox_step_(self, lr: float, step: int | None = None) -> float | None:
        """The exact proximal step of the penalty at learning rate ``lr``, in place on the weights; call it right
        after ``optimizer.step()`` with the rate that step used (``penalty_mode: decoupled``).

        ``W <- W - c Uk S Vk^T`` with ``S = Uk^T (W - W0) Vk`` and ``c = 2 lr lambda / (1 + 2 lr lambda)`` (full
        mode: ``W <- W - c (W - W0)``): the minimizer of ``lambda R_k(W) + ||W - Z||_F^2 / (2 lr)`` at the
        optimizer's output ``Z``, as ``Uk`` and ``Vk`` have orthonormal columns. No autograd graph; the math runs
        with autocast off in the bases' dtype (at least float32). Returns the penalty value after the step (and
        :meth:`last_drift` gives the drift after it), or None when the period skips ``step``.
        """
        if step is not None and not self.applies_at(step):
            return None
        if self.lora is not None:
            check_penalty_mode("decoupled", lora=True)
        if self.lam == 0 or len(self.bases) == 0:
            return 0.0
        shrink = prox_shrink(lr, self.lam)
        with self._full_precision():
            return self._prox_step(shrink, step)

    def _prox_step(self, shrink: float, step: int | None) -> float:
        self._sync_device()
        keep = 1.0 - shrink
        norms = []
        for name, entry in self.bases.entries.items():
            weight = self.bases.params[name]
            if entry.full:
                dtype = torch.promote_types(weight.dtype, torch.promote_types(entry.w0.dtype, torch.float32))
                diff = weight.to(dtype) - entry.w0.to(dtype)
                norms.append(_squared_norm(diff))
                _update_(weight, lambda w, d=diff: w.sub_(d, alpha=shrink), dtype)
                continue
            block = self._residual(name, entry)  # S = Uk^T W Vk - Sref, in the bases' dtype
            norms.append(_squared_norm(block))
            if entry.k == 0:
                continue
            dtype = torch.promote_types(weight.dtype, block.dtype)
            ur, vt = (entry.u @ (block * shrink)).to(dtype), entry.v.transpose(0, 1).to(dtype)
            _update_(weight, lambda w, ur=ur, vt=vt: w.addmm_(ur, vt, alpha=-1.0), dtype)
        squared = torch.stack(norms) * (keep * keep)  # the block after the step is (1 - c) S
        self._last_residual_norms = squared.sqrt()
        self.last_step_applied = step
        return float(self.lam * squared.sum())

    # ----------------------------------------------------------------------------------- reporting

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """Protected-block drift ``||Uk^T (W - W0) Vk||_F`` per matrix (``||W - W0||_F`` in full mode)."""
        self._sync_device()
        with self._full_precision():
            norms = torch.stack(
                [_squared_norm(self._residual(n, e)).sqrt() for n, e in self.bases.entries.items()]
            )
        return dict(zip(self.names, norms.tolist()))

    def last_drift(self) -> dict[str, float]:
        """Drift per matrix as measured by the last ``add_grad_`` (free: no extra projection), or the drift after
        the last ``prox_step_``."""
        if self._last_residual_norms is None:
            return self.drift()
        return dict(zip(self.names, self._last_residual_norms.tolist()))
