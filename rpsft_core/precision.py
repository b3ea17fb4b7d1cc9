"""Which mixed precision a run computes in on the hardware it runs on (``mixed_precision: auto``).

bfloat16 autocast is fast only where the hardware multiplies bfloat16 natively: GPUs that support it, and CPUs
with AVX512-BF16 or AMX. Elsewhere PyTorch emulates it, and a training step on an AVX2 CPU takes about 20 times
as long as in float32 (``benchmarks/bench_precision.py``). ``auto`` therefore picks bf16 only where it is native.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Literal

import torch

MixedPrecisionSetting = Literal["no", "bf16", "fp16", "auto"]
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        cpuinfo = Path("/proc/cpuinfo")
        flags = cpuinfo.read_text().split() if cpuinfo.is_file() else []
        return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` (cuda / cpu) computes bfloat16 natively."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_native_bf16()


def resolve_mixed_precision(setting: str, device: str | torch.device) -> Literal["no", "bf16", "fp16"]:
    """The precision a run with ``mixed_precision: setting`` computes in on ``device``: ``auto`` is bf16 where
    bf16 is native, else no autocast. An explicit ``bf16`` on a CPU that emulates it runs, with a warning."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "no"
    if setting == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "mixed_precision: bf16 on a CPU without AVX512-BF16/AMX is emulated and about 20x slower than float32. "
            "Fix: mixed_precision: auto (or no)",
            RuntimeWarning,
            stacklevel=2,
        )
    if setting not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision: {setting!r}. Fix: no, bf16, fp16 or auto")
    return setting  # type: ignore[return-value]
