"""What the memory preflight reports: :class:`MemoryEstimate` (the per-worker parts, the phase peaks and the
inputs, with its table in GiB) and the text of the refusal with its fixes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rpsft.core.memory.dims import ModelDims
    from rpsft.core.memory.estimate import MixedPrecision, Optimizer, ParamDtype, Strategy
    from rpsft.core.memory.fixes import MemoryFix

GIB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class EstimateInputs:
    """What one estimate is for: the model's sizes and the run's settings (checked by
    :func:`rpsft.core.memory.estimate.estimate_worker_memory`)."""

    dims: ModelDims
    workers: int
    strategy: Strategy
    param_dtype: ParamDtype
    mixed_precision: MixedPrecision | None
    batch_size: int
    max_length: int
    activation_checkpointing: bool
    bases_bytes_total: int
    bases_replicated_bytes: int
    optimizer: Optimizer
    grad_accum: int
    trainable_params: int
    with_reference_model: bool
    repeat_kv: bool


@dataclass(frozen=True)
class MemoryEstimate(EstimateInputs):
    """Per-worker memory of one training step, in bytes, with the inputs it was estimated for.

    The parts (:meth:`breakdown`) are each alive in some phases of the run; ``load_peak``,
    ``forward_backward_peak``, ``backward_end_peak`` and ``optimizer_step_peak`` are the phases' sums (see
    :mod:`rpsft.core.memory.estimate`) and ``total`` is the largest of them."""

    weights: int
    grads: int
    optimizer_states: int
    bases: int
    reference_model: int
    activations: int
    recomputed_block: int
    logits: int
    buffers: int
    cast_cache: int
    root_reduce: int
    grad_buckets: int
    step_temporaries: int
    forward_backward_peak: int
    backward_end_peak: int
    optimizer_step_peak: int
    load_peak: int
    total: int

    PARTS = (
        "weights",
        "grads",
        "optimizer_states",
        "bases",
        "reference_model",
        "activations",
        "recomputed_block",
        "logits",
        "buffers",
        "cast_cache",
        "root_reduce",
        "grad_buckets",
        "step_temporaries",
    )
    PHASES = (
        ("model load", "load_peak"),
        ("forward/backward peak", "forward_backward_peak"),
        ("end of backward", "backward_end_peak"),
        ("optimizer step", "optimizer_step_peak"),
    )

    def breakdown(self) -> dict[str, int]:
        """The byte counts of the parts by name, ``total`` last."""
        return {name: getattr(self, name) for name in (*self.PARTS, "total")}

    def describe(self) -> str:
        """The inputs in one line, named as the config names them."""
        if self.strategy == "single":
            where = "resources.workers 1 (one process)"
        else:
            where = f"resources.workers {self.workers}, resources.strategy {self.strategy}"
        accum = f" (train.grad_accum {self.grad_accum})" if self.grad_accum > 1 else ""
        return (
            f"{where}, train.dtype {self.param_dtype}, train.mixed_precision {self.mixed_precision or 'no'}, "
            f"train.batch_size {self.batch_size}{accum} x train.max_length {self.max_length}, "
            f"train.activation_checkpointing {str(self.activation_checkpointing).lower()}"
        )

    def table(self) -> str:
        """The non-zero parts and the phase peaks in GiB, one per line (what the preflight prints)."""
        parts = [(name, value) for name, value in self.breakdown().items() if value and name != "total"]
        phases = [(label, getattr(self, field)) for label, field in self.PHASES if getattr(self, field)]
        last = ("total (largest phase)", self.total)
        width = max(len(name) for name, _ in [*parts, *phases, last]) + 2
        lines = [f"  {'part':<{width}}{'GiB':>8}"]
        lines += [f"  {name:<{width}}{value / GIB:>8.2f}" for name, value in parts]
        lines.append("  " + "-" * (width + 8))
        lines += [f"  {name:<{width}}{value / GIB:>8.2f}" for name, value in [*phases, last]]
        return "\n".join(lines)



def refusal_message(
    estimate: MemoryEstimate,
    device_bytes: int,
    budget: int,
    fixes: list[MemoryFix],
    *,
    device: str,
    scope: str,
    subject: str,
) -> str:
    """What :class:`rpsft.core.memory.preflight.MemoryPreflightError` says: the estimate against the usable
    memory, the per-worker table, each fix with the total it gives, and what is left when none fits
    (``scope``: how far the fixes looked)."""
    lines = [
        f"memory preflight: {subject} needs an estimated {_gib(estimate.total)} but {_gib(budget)} is usable "
        f"({budget / device_bytes:.0%} of {_gib(device_bytes)} {device}), for {estimate.describe()}.",
        "Per worker:",
        estimate.table(),
    ]
    if fixes:
        lines.append("Fix (the estimated total per worker with each change):")
        lines += [
            f"  {fix.describe()} -> {_gib(fix.estimate.total)}{' (fits)' if fix.fits else ' (not enough)'}"
            for fix in fixes
        ]
    if not any(fix.fits for fix in fixes):
        lines.append(
            f"  {'none of these fits' if fixes else 'no config change fits'} {scope}: shorten "
            "train.max_length, or use a smaller model or a device with more memory"
        )
    return "\n".join(lines)
