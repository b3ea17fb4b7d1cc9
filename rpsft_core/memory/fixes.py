"""The config changes that make a memory estimate fit: :func:`suggest_fixes`, each with the estimate it gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rpsft.core.memory.estimate import estimate_worker_memory
from rpsft.core.memory.report import MemoryEstimate

MAX_SUGGESTED_WORKERS = 64


@dataclass(frozen=True)
class MemoryFix:
    """A config change, as ``{config field: new value}``, with the estimate it gives and whether that fits."""

    changes: dict[str, str]
    estimate: MemoryEstimate
    fits: bool

    def describe(self) -> str:
        """``field: value, ...`` as one line."""
        return ", ".join(f"{field}: {value}" for field, value in self.changes.items())


_ESTIMATE_INPUTS = (
    "workers",
    "strategy",
    "param_dtype",
    "mixed_precision",
    "batch_size",
    "max_length",
    "activation_checkpointing",
    "bases_bytes_total",
    "bases_replicated_bytes",
    "optimizer",
    "grad_accum",
    "trainable_params",
    "with_reference_model",
    "repeat_kv",
)


def _reestimate(estimate: MemoryEstimate, **changes: object) -> MemoryEstimate:
    inputs = {name: getattr(estimate, name) for name in _ESTIMATE_INPUTS}
    inputs.update(changes)
    return estimate_worker_memory(estimate.dims, **inputs)  # type: ignore[arg-type]


def _describe_changes(estimate: MemoryEstimate, changes: dict[str, Any], gpu: bool) -> dict[str, str]:
    described: dict[str, str] = {}
    if "workers" in changes:
        described["resources.workers"] = str(changes["workers"])
        if estimate.strategy != "fsdp2":
            described["resources.strategy"] = "fsdp2"
        if gpu and estimate.workers == 1:
            described["resources.gpus_per_worker"] = "1"
            described["resources.gpus"] = "0"
    if "mixed_precision" in changes:
        described["train.mixed_precision"] = str(changes["mixed_precision"])
    if "param_dtype" in changes:
        described["train.dtype"] = str(changes["param_dtype"])
    if "activation_checkpointing" in changes:
        described["train.activation_checkpointing"] = str(changes["activation_checkpointing"]).lower()
    if "batch_size" in changes:
        described["train.batch_size"] = str(changes["batch_size"])
        if changes.get("grad_accum", estimate.grad_accum) != estimate.grad_accum:
            described["train.grad_accum"] = f"{changes['grad_accum']} (the same sequences per step)"
    return described


def _fix(estimate: MemoryEstimate, budget: int, gpu: bool, changes: dict[str, Any]) -> MemoryFix:
    changed = _reestimate(estimate, **changes)
    return MemoryFix(_describe_changes(estimate, changes, gpu), changed, changed.total <= budget)


def _batch_changes(estimate: MemoryEstimate, size: int) -> dict[str, int]:
    """A smaller ``batch_size`` that divides the sequences of an optimizer step, with ``grad_accum`` raised to
    keep them."""
    sequences = estimate.batch_size * estimate.grad_accum
    return {"batch_size": size, "grad_accum": sequences // size}


def _fewest_fsdp2_workers(estimate: MemoryEstimate, budget: int) -> int | None:
    """The smallest FSDP2 worker count up to 64, above the current one, at which ``estimate`` fits."""
    start = estimate.workers + 1 if estimate.strategy == "fsdp2" else 2
    for workers in range(start, MAX_SUGGESTED_WORKERS + 1):
        if _reestimate(estimate, strategy="fsdp2", workers=workers).total <= budget:
            return workers
    return None


def _largest_batch(estimate: MemoryEstimate, budget: int) -> int | None:
    """The largest batch size below the current one that divides the sequences per step and at which
    ``estimate`` fits (``grad_accum`` raised to keep those sequences); ``None`` when none does."""
    sequences = estimate.batch_size * estimate.grad_accum
    for size in range(estimate.batch_size - 1, 0, -1):
        if sequences % size == 0 and _reestimate(estimate, **_batch_changes(estimate, size)).total <= budget:
            return size
    return None


def _changes_alone(estimate: MemoryEstimate, budget: int, more_workers: bool) -> list[dict[str, Any]]:
    """The single changes :func:`suggest_fixes` tries, as estimate inputs."""
    alone: list[dict[str, Any]] = []
    if more_workers:
        workers = _fewest_fsdp2_workers(estimate, budget)
        if workers is not None:
            alone.append({"strategy": "fsdp2", "workers": workers})
    if estimate.mixed_precision is None and estimate.param_dtype == "float32":
        alone.append({"mixed_precision": "bf16"})
    if estimate.param_dtype == "float32":
        alone.append({"param_dtype": "bfloat16"})
    if not estimate.activation_checkpointing:
        alone.append({"activation_checkpointing": True})
    batch = _largest_batch(estimate, budget)
    if batch is not None:
        alone.append(_batch_changes(estimate, batch))
    return alone


def _combined_changes(estimate: MemoryEstimate, budget: int, more_workers: bool) -> dict[str, Any]:
    """bf16 mixed precision and activation checkpointing, then also bfloat16 parameters if that is not
    enough, each with the fewest FSDP2 workers and the largest batch size that fit: the first attempt that
    fits, or the last one."""
    toggles: dict[str, Any] = {}
    if estimate.mixed_precision is None and estimate.param_dtype == "float32":
        toggles["mixed_precision"] = "bf16"
    if not estimate.activation_checkpointing:
        toggles["activation_checkpointing"] = True
    attempts = [toggles]
    if estimate.param_dtype == "float32":
        attempts.append({**toggles, "param_dtype": "bfloat16"})
    for attempt in attempts:
        changes = dict(attempt)
        if more_workers:
            at_batch_1 = _reestimate(estimate, **changes, **_batch_changes(estimate, 1))
            if at_batch_1.total > budget:
                workers = _fewest_fsdp2_workers(at_batch_1, budget)
                if workers is None and at_batch_1.workers < MAX_SUGGESTED_WORKERS:
                    workers = MAX_SUGGESTED_WORKERS
                if workers is not None:
                    changes.update(strategy="fsdp2", workers=workers)
        trial = _reestimate(estimate, **changes)
        if trial.total > budget and trial.batch_size > 1:
            changes.update(_batch_changes(trial, _largest_batch(trial, budget) or 1))
        if _reestimate(estimate, **changes).total <= budget:
            break
    return changes


def suggest_fixes(
    estimate: MemoryEstimate, budget: int, *, more_workers: bool = True, gpu: bool = True
) -> list[MemoryFix]:
    """The config changes that reduce ``estimate``, each applied alone, and one combination when none fits alone.

    Alone: the smallest FSDP2 ``resources.workers`` up to 64 that fits (if any, and ``more_workers``);
    ``train.mixed_precision: bf16`` and ``train.dtype: bfloat16`` when the run is in float32 without them;
    ``train.activation_checkpointing: true`` when off; the largest smaller ``train.batch_size`` that fits
    (if any; ``train.grad_accum`` raised to keep the sequences per step). A change that does not lower the
    estimate is left out. When none of these fits, the combination of bf16 mixed precision, activation
    checkpointing and the fewest FSDP2 workers is added, with the largest batch size, and bfloat16
    parameters if that is still not enough. ``gpu``: a change to more workers names
    ``resources.gpus_per_worker``."""
    fixes = [
        _fix(estimate, budget, gpu, changes) for changes in _changes_alone(estimate, budget, more_workers)
    ]
    fixes = [fix for fix in fixes if fix.estimate.total < estimate.total]
    if any(fix.fits for fix in fixes):
        return fixes
    changes = _combined_changes(estimate, budget, more_workers)
    combined = _fix(estimate, budget, gpu, changes)
    if (
        len(set(changes) - {"strategy", "grad_accum"}) > 1
        and combined.estimate.total < estimate.total
        and all(combined.changes != fix.changes for fix in fixes)
    ):
        fixes.append(combined)
    return fixes
