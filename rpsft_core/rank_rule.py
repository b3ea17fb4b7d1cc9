"""The rank rule of ``k: auto``: k from Fisher-projected gradient energy (App. C.5, F.1).

:func:`resolve_auto_k` turns ``auto`` (:class:`rpsft.core.k_spec.AutoK`, parsed by
:func:`rpsft.core.k_spec.parse_k_spec`) into a rank fraction by the energy rule below, measured on the base
model before training.

For a probed matrix ``W`` (m x n, pretrained ``W = U S V^T``, ``R = min(m, n)``) and per-sample gradients
``G_t`` on a small OOD batch, the energy captured by the strict top r x r singular block is

    y(r) = sum_t ||U_r^T G_t V_r||_F^2 / sum_t ||G_t||_F^2,        x(r) = r^2 / R^2.

The suggested rank is the smallest r with ``y(r) >= target`` (default 20%); as a model-wide ``k`` it is the
rank fraction ``r / R`` (``rpsft.core.bases.resolve_k`` turns a fraction into each matrix's own rank), and
with several probed matrices the median of their fractions.

Per-sample gradients are never materialized as model-sized tensors: for a linear layer ``Y = X W^T``, a
forward hook keeps the layer input ``X_t`` and its output ``Y``; ``dY_t`` comes from one backward pass of the
summed per-sample losses (``sum_t loss_t``, so sample t's rows of ``dY`` hold exactly its own gradient), and
``G_t = dY_t^T X_t``. The energy never forms ``G_t`` either: ``P_t = U^T G_t V = (dY_t U)^T (X_t V)`` and
``||G_t||_F^2 = sum((dY_t dY_t^T) * (X_t X_t^T))``; a 2-D prefix sum of ``sum_t P_t**2`` gives y(r) for every
r at once. Matrices are processed one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rpsft.core.bases import top_k_bases
from rpsft.core.k_spec import DEFAULT_TARGET, AutoK, parse_k_spec
from rpsft.core.losses import IGNORE_INDEX
from rpsft.core.model_parts import (
    eval_mode,
    grad_enabled_for,
    linear_module,
    model_device,
    resolve_names,
)
from torch import Tensor, nn

AUTO_K_PROMPTS = 16  # OOD prompts the rule reads from a source
# The paper's probe: the layer-1 attention q_proj.
DEFAULT_PROBE: dict[str, Any] = {"types": ["q"], "layers": "1:2"}


# --------------------------------------------------------------------------------------------- losses


def lm_sample_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample mean token NLL over labelled tokens, shape ``[batch]`` (0 for a sample without labels)."""
    from rpsft.core.losses import token_logprobs

    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    logp, mask = token_logprobs(logits, batch["labels"])
    return -logp.sum(-1) / mask.sum(-1).clamp(min=1)


def _lm_valid(batch: dict[str, Tensor]) -> Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).any(-1)


@dataclass
class LayerIO:
    """What one backward pass gives for a linear layer: inputs ``X`` [B, S, n] and output grads ``dY`` [B, S, m].

    Several calls of the same layer in one forward are concatenated along the sequence axis, so
    ``G_t = dY[t]^T X[t]`` still holds.
    """

    x: Tensor
    dy: Tensor


def capture_layer_io(
    model: nn.Module,
    batch: Any,
    names: Sequence[str],
    loss_fn: Callable[[nn.Module, Any], Tensor] = lm_sample_losses,
) -> tuple[dict[str, LayerIO], Tensor]:
    """Run ``loss_fn`` (per-sample losses ``[B]``), backprop their sum to the probed layers' outputs.

    Returns ``{param name: LayerIO}`` and the per-sample losses (detached). Parameter ``.grad`` fields are
    left untouched (gradients are taken with ``torch.autograd.grad`` with respect to the layer outputs).
    """
    modules = {name: linear_module(model, name) for name in names}
    inputs: dict[str, list[Tensor]] = {name: [] for name in names}
    outputs: dict[str, list[Tensor]] = {name: [] for name in names}

    def make_hook(name: str):
        def hook(_module, args, output):
            inputs[name].append(args[0].detach())
            outputs[name].append(output)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with grad_enabled_for(m.weight for m in modules.values()):
            losses = loss_fn(model, batch)
            flat = [y for name in names for y in outputs[name]]
            if not flat:
                raise RuntimeError(f"matrix: the forward pass never called {list(names)[:3]}")
            grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    result: dict[str, LayerIO] = {}
    position = 0
    for name in names:
        xs, dys = [], []
        for y in outputs[name]:
            g = grads[position]
            position += 1
            dys.append(torch.zeros_like(y) if g is None else g.detach())
        for x in inputs[name]:
            xs.append(x)
        x_all = torch.cat([x.reshape(x.shape[0], -1, x.shape[-1]) for x in xs], dim=1)
        dy_all = torch.cat([d.reshape(d.shape[0], -1, d.shape[-1]) for d in dys], dim=1)
        result[name] = LayerIO(x_all, dy_all)
    return result, losses.detach()


def per_sample_gradients(
    model: nn.Module,
    batch: Any,
    names: Sequence[str] | str,
    loss_fn: Callable[[nn.Module, Any], Tensor] = lm_sample_losses,
) -> dict[str, Tensor]:
    """Explicit per-sample gradients ``{name: [B, m, n]}`` of the per-sample losses, from one backward pass.

    ``G_t = dY_t^T X_t`` from the layer hooks. Materializes ``B`` gradients of each named matrix: meant for
    checks and small matrices (the energy diagnostic uses the factored form instead).
    """
    names = [names] if isinstance(names, str) else list(names)
    with eval_mode(model):
        io, _ = capture_layer_io(model, batch, names, loss_fn)
    return {name: torch.einsum("bsm,bsn->bmn", part.dy, part.x) for name, part in io.items()}


# --------------------------------------------------------------------------------------------- energy


class EnergyAccumulator:
    """Accumulates ``sum_t |U^T G_t V|^2`` (R x R, float64) and ``sum_t ||G_t||_F^2`` from factors."""

    def __init__(self, u: Tensor, v: Tensor) -> None:
        self.u = u.to(torch.float64)  # m x R
        self.v = v.to(torch.float64)  # n x R
        rank = u.shape[1]
        self.block = torch.zeros(rank, rank, dtype=torch.float64, device=u.device)
        self.total = 0.0
        self.n_samples = 0

    def add_factors(self, dy: Tensor, x: Tensor) -> None:
        """One sample's ``dY_t`` [S, m] and ``X_t`` [S, n] (``G_t = dY_t^T X_t``)."""
        dy = dy.to(device=self.u.device, dtype=torch.float64)
        x = x.to(device=self.u.device, dtype=torch.float64)
        projected = (dy @ self.u).transpose(0, 1) @ (x @ self.v)  # U^T G V, R x R
        self.block += projected.square()
        self.total += float(((dy @ dy.transpose(0, 1)) * (x @ x.transpose(0, 1))).sum())
        self.n_samples += 1

    def add_gradient(self, grad: Tensor) -> None:
        """One explicit per-sample gradient ``G_t`` [m, n]."""
        g = grad.to(device=self.u.device, dtype=torch.float64)
        self.block += (self.u.transpose(0, 1) @ g @ self.v).square()
        self.total += float(g.square().sum())
        self.n_samples += 1

    def curve(self) -> Tensor:
        """``y(r)`` for r = 1..R: the 2-D prefix sums of the block energies on the diagonal, over the total."""
        prefix = self.block.cumsum(0).cumsum(1)
        captured = torch.diagonal(prefix)
        return captured / self.total if self.total > 0 else torch.zeros_like(captured)


def suggested_rank(y: Sequence[float] | Tensor, target: float = DEFAULT_TARGET) -> tuple[int, bool]:
    """Smallest r (1-based) with ``y(r) >= target``; ``(R, False)`` when the curve never reaches it."""
    values = torch.as_tensor(y, dtype=torch.float64)
    hits = torch.nonzero(values >= target - 1e-12).flatten()
    if hits.numel() == 0:
        return int(values.numel()), False
    return int(hits[0]) + 1, True


@dataclass
class EnergyCurve:
    """The energy curve of one matrix and its suggested rank."""

    name: str
    shape: tuple[int, int]
    rank: int  # R = min(m, n)
    y: list[float]  # y(r), r = 1..R
    target: float
    suggested_rank: int
    reached: bool  # False when even r = R stays below target (possible for non-square W)
    n_samples: int
    n_tokens: int = 0

    @property
    def x(self) -> list[float]:
        return [(r / self.rank) ** 2 for r in range(1, self.rank + 1)]

    @property
    def fraction(self) -> float:
        """Suggested rank as a fraction of this matrix's rank (usable as ``k``)."""
        return self.suggested_rank / self.rank

    @property
    def block_fraction(self) -> float:
        """``x(r)`` at the suggested rank: the share of the R x R block that is protected."""
        return (self.suggested_rank / self.rank) ** 2

    def energy_at(self, r: int) -> float:
        return 0.0 if r <= 0 else self.y[min(r, self.rank) - 1]

    def to_dict(self, points: int | None = None) -> dict[str, Any]:
        ranks = list(range(1, self.rank + 1))
        if points is not None and self.rank > points:
            ranks = sorted({round(1 + i * (self.rank - 1) / (points - 1)) for i in range(points)})
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "target": self.target,
            "suggested_rank": self.suggested_rank,
            "fraction": self.fraction,
            "block_fraction": self.block_fraction,
            "energy_at_suggested": self.energy_at(self.suggested_rank),
            "reached": self.reached,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "r": ranks,
            "x": [(r / self.rank) ** 2 for r in ranks],
            "y": [self.y[r - 1] for r in ranks],
        }


@dataclass
class EnergyReport:
    curves: dict[str, EnergyCurve]
    target: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k_fraction(self) -> float:
        """Model-wide k as a rank fraction: the median of the probed matrices' fractions."""
        fractions = sorted(c.fraction for c in self.curves.values())
        mid = len(fractions) // 2
        return fractions[mid] if len(fractions) % 2 else (fractions[mid - 1] + fractions[mid]) / 2

    def to_dict(self, points: int | None = None) -> dict[str, Any]:
        return {
            "target": self.target,
            "k_fraction": self.k_fraction,
            "seconds": self.seconds,
            "matrices": {name: curve.to_dict(points) for name, curve in self.curves.items()},
            **self.extra,
        }


def full_bases(weight: Tensor) -> tuple[Tensor, Tensor]:
    """All R = min(m, n) left/right singular vectors of ``weight`` (exact SVD in float64)."""
    w = weight.detach().to(torch.float64)
    return top_k_bases(w, min(w.shape), method="exact")


def gradient_energy(
    model: nn.Module,
    names: Sequence[str] | str,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] = lm_sample_losses,
    valid_fn: Callable[[Any], Tensor] | None = _lm_valid,
    target: float = DEFAULT_TARGET,
) -> EnergyReport:
    """Energy curves of the named linear layers' per-sample gradients over ``batches``.

    ``loss_fn(model, batch)`` returns per-sample losses ``[B]``; ``valid_fn(batch)`` (optional) marks the
    samples to count (the LM default drops samples without a labelled token). Layer inputs and output
    gradients of all named matrices are captured in one backward pass per batch; the projection runs one
    matrix at a time.
    """
    started = time.perf_counter()
    names = [names] if isinstance(names, str) else list(names)
    params = {name: linear_module(model, name).weight for name in names}
    accumulators = {}
    for name, weight in params.items():
        u, v = full_bases(weight)
        accumulators[name] = EnergyAccumulator(u.to(weight.device), v.to(weight.device))
    n_tokens = 0
    with eval_mode(model):
        for batch in batches:
            io, _ = capture_layer_io(model, batch, names, loss_fn)
            valid = valid_fn(batch) if valid_fn is not None else None
            if isinstance(batch, dict) and "labels" in batch:
                n_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            for name in names:
                part = io[name]
                for t in range(part.x.shape[0]):
                    if valid is not None and not bool(valid[t]):
                        continue
                    dy, x = part.dy[t], part.x[t]
                    if mask is not None and mask.shape[1] == x.shape[0]:
                        keep = mask[t].bool()  # padding rows carry no gradient; drop them
                        dy, x = dy[keep], x[keep]
                    accumulators[name].add_factors(dy, x)
            del io
    curves = {}
    for name, acc in accumulators.items():
        y = acc.curve()
        r, reached = suggested_rank(y, target)
        curves[name] = EnergyCurve(
            name=name,
            shape=tuple(params[name].shape),
            rank=int(y.numel()),
            y=[float(v) for v in y],
            target=target,
            suggested_rank=r,
            reached=reached,
            n_samples=acc.n_samples,
            n_tokens=n_tokens,
        )
        if acc.n_samples == 0:
            raise ValueError("energy: no sample with a scored token. Fix: give prompts with tokens to score")
    return EnergyReport(curves, target, time.perf_counter() - started)


def probe_names(model: nn.Module, matrices: Any = None) -> list[str]:
    """Parameter names to probe: default the layer-1 ``q_proj``; a name, a comma list, names, or a spec."""
    if matrices is None:
        matrices = DEFAULT_PROBE
    if isinstance(matrices, str):
        parts = [p.strip() for p in matrices.split(",") if p.strip()]
        named = dict(model.named_parameters(remove_duplicate=False))
        if all(p in named for p in parts):
            return parts
        from rpsft.core.selection import PRESETS

        if matrices in PRESETS:
            return resolve_names(model, matrices)
        missing = [p for p in parts if p not in named]
        raise KeyError(
            f"matrix: no parameter named {missing[0]!r}. Fix: e.g. model.layers.1.self_attn.q_proj.weight"
        )
    return resolve_names(model, matrices)


def energy_curves(
    model: nn.Module,
    tokenizer,
    examples,
    matrices: Any = None,
    *,
    target: float = DEFAULT_TARGET,
    batch_size: int = 4,
    max_length: int = 256,
    limit: int | None = None,
) -> EnergyReport:
    """Energy curves of ``matrices`` (default: layer-1 ``q_proj``) on prompts/conversations ``examples``.

    Each example is scored on its reference reply when it has one, else as language modelling of the prompt
    (see :mod:`rpsft.core.prompts`).
    """
    from rpsft.core.data import collate_features
    from rpsft.core.prompts import as_prompt_examples, batches, gradient_features

    examples = as_prompt_examples(examples)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError("energy: no examples. Fix: pass a few OOD prompts")
    features = gradient_features(examples, tokenizer, max_length)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = (
        {key: value.to(device) for key, value in collate_features(chunk, pad).items()}
        for chunk in batches(features, batch_size)
    )
    return gradient_energy(model, probe_names(model, matrices), loader, target=target)


def resolve_auto_k(
    model: nn.Module,
    tokenizer,
    spec: Any = "auto",
    ood_examples=None,
    *,
    matrices: Any = None,
    batch_size: int = 4,
    max_length: int = 256,
    limit: int | None = 16,
    return_report: bool = False,
):
    """Resolve a ``k`` spec: ints and fractions pass through; ``auto`` / ``auto@x`` run the energy rule.

    The rule probes ``matrices`` (default layer-1 ``q_proj``) on ``ood_examples`` (a few OOD prompts, e.g.
    :func:`~rpsft.core.prompts.load_prompt_examples` of a GPQA file) and returns the suggested
    rank as a fraction of the matrix rank, ``r / R`` (a float in (0, 1], which ``resolve_k`` turns into each
    matrix's own rank). With ``return_report=True`` returns ``(k, EnergyReport | None)``.
    """
    parsed = parse_k_spec(spec)
    if not isinstance(parsed, AutoK):
        return (parsed, None) if return_report else parsed
    if ood_examples is None:
        raise ValueError(f"k: {spec!r} needs OOD prompts to measure gradient energy. Fix: pass ood_examples")
    report = energy_curves(
        model,
        tokenizer,
        ood_examples,
        matrices,
        target=parsed.target,
        batch_size=batch_size,
        max_length=max_length,
        limit=limit,
    )
    k = float(report.k_fraction)
    return (k, report) if return_report else k


def resolve_k_from_prompts(
    model: nn.Module, tokenizer, spec: Any, source: str, *, limit: int = AUTO_K_PROMPTS
) -> int | float:
    """Resolve ``spec`` on the base ``model``: ``auto`` / ``auto@x`` read the first ``limit`` OOD prompts of
    ``source`` (a JSONL path, ``demo-math[:N]`` or ``hf:<id>[:split]``); numbers pass through unread.

    Both ``rpsft train --k auto`` and a sweep's ``k: auto`` resolve through this, once, before training.
    """
    from rpsft.core.prompts import load_prompt_examples

    if not isinstance(parse_k_spec(spec), AutoK):
        return parse_k_spec(spec)
    _, prompts = load_prompt_examples(source, limit=limit)
    k = float(resolve_auto_k(model, tokenizer, spec, prompts))
    model.zero_grad(set_to_none=True)
    return k
