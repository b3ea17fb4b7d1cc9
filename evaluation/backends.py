"""Which lm-eval model generates: Hugging Face (``HFLM``, any device, in-memory models) or vLLM (``VLLM``).

``backend: auto`` (the default) uses vLLM when it is installed, a CUDA GPU is present and the model is named by
path or name (vLLM loads its own copy); otherwise, and for an in-memory model (a sweep's trials), Hugging Face.
``hf`` and ``vllm`` force one; ``vllm`` without vLLM, or with an in-memory model, is refused with the fix.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from rpsft.evaluation.benchmarks import EvalConfigError

Backend = Literal["auto", "hf", "vllm"]
VLLM_GPU_MEMORY_UTILIZATION = 0.9


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(requested: Backend, model: Any) -> Literal["hf", "vllm"]:
    """The backend that scores ``model`` (a name or path, an in-memory model, or an lm-eval ``LM``)."""
    by_name = isinstance(model, (str, Path))
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        if not vllm_installed():
            raise EvalConfigError(
                "backend: vllm is not installed. Fix: pip install vllm, or use --backend hf"
            )
        if not by_name:
            raise EvalConfigError(
                "backend: vllm loads the model from a path; an in-memory model needs the hf backend. "
                "Fix: pass a model name/path, or use --backend hf"
            )
        return "vllm"
    return "vllm" if by_name and vllm_installed() and cuda_gpus() > 0 else "hf"


def vllm_arguments(model_dir: str, settings: Any) -> dict[str, Any]:
    """The arguments of lm-eval's ``VLLM`` model: one GPU (the models rpsft tunes fit one; tensor parallelism
    needs a head count the GPU count divides), vLLM's own batching and the settings' seed. Generation lengths
    stay the tasks' own (``max_gen_toks`` in their ``generation_kwargs``; lm-eval's default of 256 otherwise, as
    for Hugging Face), so both backends generate the same lengths."""
    return {
        "pretrained": model_dir,
        "dtype": "auto",
        "batch_size": "auto",
        "seed": settings.seed,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION,
    }
