"""The memory preflight of a training run: its estimate from a :class:`~rpsft.core.config.TrainConfig`, the
check against the device's memory, and the refusal (:class:`MemoryPreflightError`) with the fixes."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch
from rpsft.core.errors import ConfigError
from rpsft.core.memory.dims import (
    BASES_DTYPE_BYTES,
    ModelDims,
    bases_bytes,
    model_dims_for,
    protected_shapes,
    refuse_missing_local_model,
)
from rpsft.core.memory.estimate import DTYPE_BYTES, Strategy, estimate_worker_memory
from rpsft.core.memory.fixes import MAX_SUGGESTED_WORKERS, MemoryFix, suggest_fixes
from rpsft.core.memory.report import MemoryEstimate, first_line, refusal_message

if TYPE_CHECKING:
    from rpsft.core.config import TrainConfig

AUTO_K_FRACTION = 0.25  # the rank fraction a k: auto spec is estimated at (the energy rule resolves it later)
_OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw_fused",
    "sgd": "sgd",
    "adafactor": "adafactor",
}


class MemoryPreflightWarning(UserWarning):
    """The memory preflight was skipped (model sizes or device memory unknown); training goes on."""


def _planned_precision(config: TrainConfig) -> str:
    """``mixed_precision`` as the run will resolve it: ``auto`` is bf16 on GPUs, and on CPUs what this
    machine's CPU supports natively (:func:`rpsft.core.precision.resolve_mixed_precision`)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if config.resources.gpus_per_process > 0:
        return "bf16"
    from rpsft.core.precision import resolve_mixed_precision

    return resolve_mixed_precision("auto", "cpu")


def estimate_train_memory(
    config: TrainConfig, dims: ModelDims, *, auto_k: int | float = AUTO_K_FRACTION
) -> MemoryEstimate:
    """:func:`estimate_worker_memory` for one training run: the strategy from ``resources`` (``workers: 1`` is
    ``single``), ``dtype``, ``mixed_precision``, ``batch_size`` (per worker), ``grad_accum``, ``max_length``,
    ``activation_checkpointing`` and ``optimizer``; the bases of the ``layers`` selection at the method's
    ``k`` (a ``k: auto`` counts as ``auto_k``, the energy rule resolves it later); a LoRA method trains
    ``lora_r (m + n)`` parameters per selected matrix; ``iw`` keeps a reference model."""
    from rpsft.core.k_spec import is_auto_k

    resources = config.resources
    strategy: Strategy = resources.strategy if resources.distributed else "single"
    spec = config.spec
    k = config.effective_k
    if is_auto_k(k):
        k = auto_k
    shapes = protected_shapes(dims, config.layers)
    w0_bytes = BASES_DTYPE_BYTES if strategy == "fsdp2" else DTYPE_BYTES[config.dtype]
    total, replicated = bases_bytes(shapes, k, w0_bytes=w0_bytes) if spec.uses_bases and k else (0, 0)
    trainable = None
    if spec.adapter == "lora":
        trainable = sum(config.lora_r * (rows + cols) for rows, cols in shapes.values())
    return estimate_worker_memory(
        dims,
        workers=resources.workers,
        strategy=strategy,
        param_dtype=config.dtype,
        mixed_precision=_planned_precision(config),
        batch_size=config.batch_size,
        max_length=config.max_length,
        activation_checkpointing=config.activation_checkpointing,
        bases_bytes_total=total,
        bases_replicated_bytes=replicated,
        optimizer=_OPTIMIZERS.get(config.optimizer, config.optimizer),  # type: ignore[arg-type]
        grad_accum=config.grad_accum,
        trainable_params=trainable,
        with_reference_model=spec.reference_model,
    )


class MemoryPreflightError(ConfigError):
    """A training config whose estimated per-worker memory exceeds the usable memory of its device.

    ``estimate``, ``device_bytes``, ``budget`` (``headroom * device_bytes``) and ``fixes`` hold the numbers
    the message shows; ``device`` names the memory (``GPU memory``, ``node memory per process``)."""

    def __init__(
        self,
        estimate: MemoryEstimate,
        device_bytes: int,
        budget: int,
        fixes: list[MemoryFix],
        device: str = "GPU memory",
        more_workers: bool = True,
        subject: str = "a worker",
    ):
        self.estimate, self.device_bytes, self.budget, self.fixes = estimate, device_bytes, budget, fixes
        self.device = device
        scope = f"up to {MAX_SUGGESTED_WORKERS} FSDP2 workers" if more_workers else "on this memory"
        super().__init__(
            refusal_message(
                estimate, device_bytes, budget, fixes, device=device, scope=scope, subject=subject
            )
        )


def check_fits(
    estimate: MemoryEstimate,
    device_bytes: int,
    *,
    headroom: float = 0.9,
    device: str = "GPU memory",
    more_workers: bool = True,
    subject: str = "a worker",
) -> None:
    """Raise :class:`MemoryPreflightError` when ``estimate.total > headroom * device_bytes``.

    The headroom keeps room for what the estimate leaves out (CUDA context, NCCL, allocator fragmentation).
    ``device`` names the memory in the message, ``subject`` what needs it; a change to more workers is
    suggested when ``more_workers`` (each worker with a GPU of its own when ``device`` is a GPU's memory)."""
    if device_bytes <= 0:
        raise ConfigError(f"device memory: {device_bytes} bytes. Fix: the device's total memory in bytes")
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom: {headroom}. Fix: a fraction in (0, 1]")
    budget = int(headroom * device_bytes)
    if estimate.total > budget:
        gpu = device.startswith("GPU")
        fixes = suggest_fixes(estimate, budget, more_workers=more_workers, gpu=gpu)
        raise MemoryPreflightError(estimate, device_bytes, budget, fixes, device, more_workers, subject)


def local_memory_bytes() -> int:
    """Memory a new process on this machine can use: the available memory (``psutil``), else the total."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def preflight_train_memory(
    config: TrainConfig,
    device_bytes: int | None = None,
    *,
    dims: ModelDims | None = None,
    headroom: float = 0.9,
) -> MemoryEstimate | None:
    """The memory preflight of one training run (``rpsft train``), before the model is loaded.

    The model's sizes come from its config only (:func:`model_dims_for`, offline: an embedded name, a local
    directory, a ``.gguf`` file or a hub id in the local HF cache); when they cannot be read, a
    :class:`MemoryPreflightWarning` says so and ``None`` is returned. ``device_bytes`` defaults to the
    memory of GPU 0 when CUDA is available (where :func:`rpsft.core.train.train` runs), else to this
    machine's available memory shared by ``resources.workers`` processes. Returns the estimate when it
    fits; raises :class:`MemoryPreflightError` (a ``ConfigError``) with the numbers and the fixes when not."""
    if dims is None:
        refuse_missing_local_model(config.model)  # a path that is not there fails here, not after a warning
        try:
            dims = model_dims_for(config.model, cache_dir=config.cache_dir, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  # the preflight never stops a run it cannot size
            warnings.warn(
                f"memory preflight skipped: the sizes of model {config.model!r} are not available offline "
                f"({first_line(exc)})",
                MemoryPreflightWarning,
                stacklevel=2,
            )
            return None
    estimate = estimate_train_memory(config, dims)
    device = "GPU memory"
    if device_bytes is None:
        if torch.cuda.is_available():
            device_bytes = int(torch.cuda.get_device_properties(0).total_memory)
        else:
            workers = config.resources.workers
            device_bytes = local_memory_bytes() // workers
            device = "memory per process" if workers == 1 else f"memory per process ({workers} processes)"
    # more CPU processes on this machine share its memory: more workers only help with a GPU each
    check_fits(estimate, device_bytes, headroom=headroom, device=device, more_workers=device == "GPU memory")
    return estimate
